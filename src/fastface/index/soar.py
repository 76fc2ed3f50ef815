"""Spilled assignment (SOAR): a second inverted list for every vector.

An IVF search misses a neighbour ``x`` when its list is not among the
``nprobe`` lists nearest the query. That happens when the query lies along
``x``'s residual ``r = x - c`` (``c``: its list's centroid): then ``q . r`` is
large, ``x`` scores well, yet ``c`` scores poorly. Storing ``x`` in a second
list whose residual ``r'`` is nearly orthogonal to ``r`` covers exactly those
queries. SOAR (Sun, Guo and Kumar, "SOAR: improved indexing for approximate
nearest neighbor search", NeurIPS 2023) picks the second list ``c'`` that
minimises

    ``|r'|^2 + lambda * <r', r / |r|>^2``,   ``r' = x - c'``

trading a short residual (first term) against orthogonality (second term).
Here the minimum is taken over the vector's ``SPILL_CANDIDATES`` nearest
lists other than its first (the loss is at least ``|r'|^2``, so a far list
cannot win). Each row's choice is computed from that row alone, so the lists
a vector gets do not depend on how vectors were batched.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .params import Codec

__all__ = ["SPILL_CANDIDATES", "spill_lists"]

#: Lists nearest each vector among which its second list is chosen.
SPILL_CANDIDATES = 32
_BLOCK = 1024


def spill_lists(
    codec: Codec, x: npt.NDArray[np.float32], first: npt.NDArray[np.int64], soar_lambda: float
) -> npt.NDArray[np.int64]:
    """The second list of each row of ``x`` (float32 ``(n, d)``, validated), never ``first``.

    ``first`` is each row's own list (as :meth:`Codec.encode` assigns it).
    Residuals are taken in the codec's space (after its OPQ rotation, if any).
    """
    n = x.shape[0]
    out = np.empty(n, np.int64)
    if n == 0:
        return out
    nlist = codec.params.nlist
    T = min(nlist, SPILL_CANDIDATES + 1)
    C = codec.centroids
    cc = np.einsum("ij,ij->i", C, C)
    lam = np.float32(soar_lambda)
    for lo in range(0, n, _BLOCK):
        fb = first[lo : lo + _BLOCK]
        _, cand = codec.assign(x[lo : lo + _BLOCK], T)
        xb = codec.rotate(x[lo : lo + _BLOCK])  # the centroids' space (OPQ rotates)
        r = xb - C[fb]
        rr = np.einsum("ij,ij->i", r, r)
        inv = np.where(rr > 0, 1.0 / np.maximum(rr, np.finfo(np.float32).tiny), 0.0).astype(
            np.float32
        )
        G = C[np.maximum(cand, 0)]  # (b, T, d) candidate centroids
        # per-row products (a matrix-vector product for each row: no dependence on the batch)
        gx = np.matmul(G, xb[:, :, None])[:, :, 0]
        gr = np.matmul(G, r[:, :, None])[:, :, 0]
        xx = np.einsum("ij,ij->i", xb, xb)
        xr = np.einsum("ij,ij->i", xb, r)
        dist = xx[:, None] - 2 * gx + cc[np.maximum(cand, 0)]  # |x - c'|^2
        proj = xr[:, None] - gr  # <x - c', r>
        loss = dist + lam * proj * proj * inv[:, None]
        loss[(cand == fb[:, None]) | (cand < 0)] = np.inf
        out[lo : lo + xb.shape[0]] = np.take_along_axis(cand, np.argmin(loss, 1)[:, None], 1)[:, 0]
    return out
