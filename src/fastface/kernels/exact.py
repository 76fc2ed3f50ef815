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
candidate rows and keeps the best ``k`` (Numba kernels in
:mod:`fastface.kernels.rerank`: gathers rows of a memory map without reading
the rest). The two sum the same products in different orders, so they agree
to float32 rounding (about ``1e-6`` relative), not bit for bit; each is
deterministic.

Results are ordered by one rule everywhere: better score first, equal
scores by lower id (:func:`topk`).
"""

from __future__ import annotations

import threading
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = ["rescore", "scores", "topk"]

Metric = Literal["ip", "l2"]
# Numba's parallel kernels may not be entered from several threads at once with
# its default ("workqueue") threading layer: searches on several threads take turns
# here (each call already uses every core).
_KERNEL_LOCK = threading.Lock()


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

    ``q``: (nq, d) float32, C-contiguous. ``base``: (n, d) float16 or float32
    (a memory map is read only at the rows named). ``rows`` / ``ids``: (nq, m)
    int64, C-contiguous; a row of ``-1`` skips the candidate. Returns
    ``(D, I)`` shaped ``(nq, k)`` ordered by :func:`topk`'s rule, padded.
    """
    from . import rerank as kern

    larger = metric == "ip"
    D = np.full((q.shape[0], k), -np.inf if larger else np.inf, np.float32)
    I = np.full((q.shape[0], k), -1, np.int64)
    with _KERNEL_LOCK:
        if base.dtype == np.float16:
            kern.rerank_f16(q, base.view(np.uint16), rows, ids, not larger, D, I)
        else:
            kern.rerank_f32(q, base, rows, ids, not larger, D, I)
    return D, I
