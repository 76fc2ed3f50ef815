"""Near-duplicate kernels: pair extraction from similarity blocks, union-find (Numba).

Vectors are numbered by *position* ``0..n-1`` in ascending id order, so the
smallest position in a group is its lowest id, the group's representative.
"""

from __future__ import annotations

import numba
import numpy as np
import numpy.typing as npt

__all__ = ["collect_pairs", "group_labels", "union_find"]


# No fastmath: the comparison with the threshold must be exact (a pair at the
# threshold counts); there is no arithmetic here for fastmath to speed up.
@numba.njit(cache=True, nogil=True)
def collect_pairs(
    S: npt.NDArray[np.float32],
    threshold: np.float32,
    qpos: npt.NDArray[np.int64],
    rpos: npt.NDArray[np.int64],
    ordered: bool,
    out_a: npt.NDArray[np.int64],
    out_b: npt.NDArray[np.int64],
    out_s: npt.NDArray[np.float32],
) -> int:
    """Pairs with ``S[i, j] >= threshold`` as ``(min pos, max pos, score)``.

    Row ``i`` of ``S`` is position ``qpos[i]``, column ``j`` is ``rpos[j]``;
    equal positions are skipped, and with ``ordered`` only ``qpos[i] < rpos[j]``
    counts (each unordered pair of a square block once). Writes at most
    ``out_a.size`` pairs and returns how many there are: when that is larger,
    the caller calls again with room for all.
    """
    cap = out_a.shape[0]
    m = 0
    for i in range(S.shape[0]):
        a = qpos[i]
        for j in range(S.shape[1]):
            if S[i, j] >= threshold:
                b = rpos[j]
                if a == b or (ordered and a > b):
                    continue
                if m < cap:
                    out_a[m] = min(a, b)
                    out_b[m] = max(a, b)
                    out_s[m] = S[i, j]
                m += 1
    return m


@numba.njit(cache=True, nogil=True)
def _find(parent: npt.NDArray[np.int64], x: np.int64) -> np.int64:
    while parent[x] != x:
        parent[x] = parent[parent[x]]  # path halving
        x = parent[x]
    return x


@numba.njit(cache=True, nogil=True)
def union_find(
    a: npt.NDArray[np.int64], b: npt.NDArray[np.int64], parent: npt.NDArray[np.int64]
) -> None:
    """Join ``a[e]`` and ``b[e]`` for every edge; ``parent`` arrives as ``arange(n)``.

    The smaller root always becomes the parent, so on return ``parent[x]`` is
    the smallest position of ``x``'s group (every path is compressed at the end).
    """
    for e in range(a.shape[0]):
        ra = _find(parent, a[e])
        rb = _find(parent, b[e])
        if ra < rb:
            parent[rb] = ra
        elif rb < ra:
            parent[ra] = rb
    for x in range(parent.shape[0]):
        parent[x] = parent[parent[x]]  # roots are smaller than their members


@numba.njit(cache=True, nogil=True)
def group_labels(
    root: npt.NDArray[np.int64], labels: npt.NDArray[np.int64], sizes: npt.NDArray[np.int64]
) -> int:
    """Dense labels in order of first position; returns the number of groups.

    ``labels`` is filled for every position, ``sizes[g]`` counts group ``g``'s
    members (``sizes`` must arrive zeroed, with room for ``n`` groups).
    """
    g = 0
    for x in range(root.shape[0]):
        r = root[x]
        if r == x:
            labels[x] = g
            g += 1
        else:
            labels[x] = labels[r]  # r < x: labelled already
        sizes[labels[x]] += 1
    return g
