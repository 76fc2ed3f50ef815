"""The library's one exact scorer: the score of a query against a stored vector.

Every exact score in fastface comes from here: ground truth
(:func:`fastface.eval.ground_truth`), re-ranking (``search(..., rerank=f)``
and :meth:`IVFPQIndex.rescore <fastface.IVFPQIndex.rescore>`), dedup and the
gallery's exact comparisons. The score is

- metric ``"ip"``: the inner product ``q . v``;
- metric ``"l2"``: the squared distance, as ``|q|^2 - 2 q . v + |v|^2``;

summed in float32, with float16 storage widened exactly to float32 first.
Two access patterns share that definition: :func:`scores` scores a block of
vectors against a block of queries (a BLAS product: fast for everything
against everything); :func:`rescore` scores each query against its own
candidate rows and keeps the best ``k`` (the native kernel of
``csrc/rerank.cpp``: it gathers rows of a memory map without reading the
rest, prefetching the next candidates' rows, widens float16 in registers and
keeps the top ``k`` in a heap, all in one pass per query). The two sum the
same products in different orders, so they agree to float32 rounding (about
``1e-6`` relative), not bit for bit; each is deterministic.

:func:`rescore`'s sum order is fixed (:func:`lane_score` is its NumPy twin,
to the bit): products rounded to float32, added into 32 lanes (term ``j``
into lane ``j % 32``, in order), the lanes then added pairwise
``a[l] + a[l + h]`` for ``h = 16, 8, 4, 2, 1``; every instruction-set level
of the native module returns the same bits. The Numba kernels of
:mod:`fastface.kernels.rerank` compute the same scores with LLVM's order
(the CPU reference of the GPU kernels).

Results are ordered by one rule everywhere: better score first, equal
scores by lower id (:func:`topk`).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = ["lane_score", "rescore", "rescore_ids", "scores", "topk"]

Metric = Literal["ip", "l2"]


def scores(
    q: npt.NDArray[Any], x: npt.NDArray[Any], metric: Metric = "ip"
) -> npt.NDArray[np.float32]:
    """Exact scores of every query row against every vector row, ``(nq, n)`` float32.

    ``q`` and ``x`` may be float16, float32 or float64 (cast to float32
    first; float16 widening is exact). ``x`` may be a memory map: pass it in
    blocks to bound memory.
    """
    q = np.asarray(q, dtype=np.float32)
    x = np.asarray(x, dtype=np.float32)
    s = q @ x.T
    if metric == "ip":
        return np.ascontiguousarray(s, dtype=np.float32)
    if metric != "l2":
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
    qq = np.einsum("ij,ij->i", q, q)[:, None]
    xx = np.einsum("ij,ij->i", x, x)[None, :]
    out = qq - np.float32(2.0) * s
    out += xx
    return np.ascontiguousarray(out, dtype=np.float32)


def topk(
    S: npt.NDArray[np.float32],
    ids: npt.NDArray[np.int64],
    k: int,
    *,
    larger_is_better: bool,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Best ``k`` of each row of ``S`` (scores of ``ids``), padded: better score, then lower id.

    ``ids`` is 1-D (one id per column) or shaped like ``S``; ids ``-1`` are
    skipped. Rows with fewer than ``k`` entries are padded with ``-1`` and
    ``-inf`` (``+inf`` when smaller is better).
    """
    I_all = np.broadcast_to(ids, S.shape) if ids.ndim == 1 else ids
    key = -S if larger_is_better else S
    pad = -np.inf if larger_is_better else np.inf
    valid = I_all >= 0
    key = np.where(valid, key, np.inf)
    # lexsort's last key is the primary one: score, then id; padding sorts last
    order = np.lexsort((np.where(valid, I_all, np.iinfo(np.int64).max), key), axis=1)[:, :k]
    D = np.take_along_axis(S, order, 1).astype(np.float32)
    I = np.take_along_axis(np.asarray(I_all), order, 1).astype(np.int64)
    missing = ~np.take_along_axis(valid, order, 1)
    D[missing] = pad
    I[missing] = -1
    if D.shape[1] < k:
        D = np.pad(D, ((0, 0), (0, k - D.shape[1])), constant_values=pad)
        I = np.pad(I, ((0, 0), (0, k - I.shape[1])), constant_values=-1)
    return D, I


def rescore(
    q: npt.NDArray[np.float32],
    base: npt.NDArray[Any],
    rows: npt.NDArray[np.int64],
    ids: npt.NDArray[np.int64],
    k: int,
    *,
    metric: Metric = "ip",
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Exact top-``k`` of each query's candidates: ``ids[i, c]`` is stored at ``base[rows[i, c]]``.

    ``q``: (nq, d) float32, C-contiguous. ``base``: (n, d) float16 or float32,
    C-contiguous (a memory map is read only at the rows named). ``rows`` /
    ``ids``: (nq, m) int64, C-contiguous; a row of ``-1`` skips the candidate.
    Returns ``(D, I)`` shaped ``(nq, k)`` ordered by :func:`topk`'s rule, padded.
    """
    from .._native import rerank

    return rerank(q, base, ids, k, l2=metric == "l2", rows=rows)


def rescore_ids(
    q: npt.NDArray[np.float32],
    base: npt.NDArray[Any],
    ids: npt.NDArray[np.int64],
    k: int,
    *,
    lo: int,
    span: int,
    table: npt.NDArray[np.int64] | None = None,
    metric: Metric = "ip",
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """As :func:`rescore`, each candidate's row found from its id inside the kernel.

    Candidate ``x`` is at row ``table[x - lo]`` (``-1``: not stored), or at row
    ``x - lo`` when ``table`` is ``None`` (ids ``lo, lo + 1, ...`` in row
    order); ids outside ``lo .. lo + span - 1`` are skipped. Saves a pass over
    the candidates in NumPy: the look-ups overlap with the scoring.
    """
    from .._native import rerank

    return rerank(q, base, ids, k, l2=metric == "l2", lo=lo, span=span, table=table)


def lane_score(q: npt.NDArray[Any], v: npt.NDArray[Any], metric: Metric = "ip") -> np.float32:
    """The score :func:`rescore` computes for one query and one vector, to the bit (NumPy).

    The slow, obviously-right twin of the native kernel: float32 products,
    32 lanes summed in order, lanes added pairwise; L2 as
    ``(|q|^2 - 2 q.v) + |v|^2`` with each term summed the same way.
    """
    q = np.asarray(q, np.float32)
    d = q.shape[0]
    dp = -(-d // 32) * 32
    qp = np.zeros(dp, np.float32)
    qp[:d] = q
    vp = np.zeros(dp, np.float32)
    vp[:d] = np.asarray(v).astype(np.float32)

    def lanes(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> np.float32:
        prod = a * b  # float32 products
        acc = np.zeros(32, np.float32)
        for blk in range(dp // 32):
            acc = acc + prod[32 * blk : 32 * blk + 32]
        h = 16
        while h >= 1:
            acc[:h] = acc[:h] + acc[h : 2 * h]
            h //= 2
        return np.float32(acc[0])

    s = lanes(qp, vp)
    if metric == "ip":
        return s
    return np.float32(np.float32(lanes(qp, qp) - np.float32(2.0) * s) + lanes(vp, vp))
