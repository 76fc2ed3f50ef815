"""Exact re-ranking on the GPU with Numba CUDA kernels.

Two kernels: one thread per (query, candidate) scores the candidate's stored
vector (float32 sums over the dimensions, float16 storage widened exactly),
then one thread per query keeps the best ``k`` by insertion (score, then lower
id: the library's one tie rule), the same insertion as the CPU kernel
:func:`fastface.kernels.rerank.rerank_f32`. Stored vectors live in GPU memory,
or stay in host memory and only the candidates' rows travel, through a pinned
buffer, per batch of queries.

The kernels run in Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) on NumPy
arrays: the tests check them there against the CPU kernels. Without the
simulator, the CPU emulation backend uses the CPU kernels themselves.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

__all__ = ["rerank", "rerank_arrays", "simulator_enabled"]


def simulator_enabled() -> bool:
    """Whether Numba runs CUDA kernels in its simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    from numba import config

    return bool(getattr(config, "ENABLE_CUDASIM", False))


def _kernels() -> tuple[Any, Any]:
    # a module of its own: Numba's simulator swaps the `cuda` global of kernel modules
    from ._rerank_kernels import score_kernel, select_kernel

    return score_kernel, select_kernel


def rerank_arrays(
    q: Any,
    base: Any,
    rows: Any,
    cand: Any,
    k: int,
    *,
    l2: bool,
    xp: Any = np,
    stream: Any = None,
) -> tuple[Any, Any]:
    """Exact top-``k`` of candidate ids ``cand`` ``(nq, C)`` whose vectors are ``base[rows]``.

    ``rows[i, c] < 0`` skips a candidate. Arrays are CuPy (device) or NumPy
    (then the simulator must be enabled). Returns ``(D, I)`` ``(nq, k)``, padded.
    """
    score_kernel, select_kernel = _kernels()
    nq, C = rows.shape
    scores = xp.empty((nq, C), np.float32)
    out_D = xp.full((nq, k), -np.inf if not l2 else np.inf, np.float32)
    out_I = xp.full((nq, k), -1, np.int64)
    if nq == 0:
        return out_D, out_I
    launch_stream = 0
    if stream and xp is not np:  # 0: the default stream, Numba's default too
        from numba import cuda

        launch_stream = cuda.external_stream(int(stream))
    tx, ty = 8, 32
    grid = (math.ceil(nq / tx), math.ceil(C / ty))
    with warnings.catch_warnings():
        # small batches make small grids; Numba's under-utilisation notice is not an error
        from numba.core.errors import NumbaPerformanceWarning

        warnings.simplefilter("ignore", NumbaPerformanceWarning)
        score_kernel[grid, (tx, ty), launch_stream](q, base, rows, bool(l2), scores)
        select_kernel[math.ceil(nq / 128), 128, launch_stream](
            scores, rows, cand, not l2, out_D, out_I
        )
    return out_D, out_I


def rerank(index: Any, q: Any, cand: Any, k: int, *, stream: Any = None) -> tuple[Any, Any]:
    """Exact top-``k`` of candidate ids ``cand`` of a :class:`GpuIVFPQ` (its stored vectors)."""
    be = index.backend
    xp = be.xp
    l2 = index.metric == "l2"
    if be.is_device:
        srt, order = index._vec_sorted_ids, index._vec_order
    else:
        srt, order = index._vec_sorted_host, index._vec_order_host
    n = srt.shape[0]
    pos = xp.searchsorted(srt, cand)
    pos_c = xp.minimum(pos, n - 1)
    valid = (cand >= 0) & (srt[pos_c] == cand)
    rows = xp.where(valid, order[pos_c], -1)
    if not be.is_device:
        if simulator_enabled():
            return rerank_arrays(q, index._vec, rows, cand, k, l2=l2)
        from ..kernels.rerank import rerank_f16, rerank_f32

        D = np.full((q.shape[0], k), np.inf if l2 else -np.inf, np.float32)
        I = np.full((q.shape[0], k), -1, np.int64)
        base = index._vec
        if base.dtype == np.float16:
            rerank_f16(q, base.view(np.uint16), rows, cand, l2, D, I)
        else:
            rerank_f32(q, np.ascontiguousarray(base, np.float32), rows, cand, l2, D, I)
        return D, I
    sp = be.stream_ptr(stream)
    if index.vectors_on == "device":
        return rerank_arrays(q, index._vec, rows, cand, k, l2=l2, xp=xp, stream=sp)
    # host-resident vectors: gather the candidates' rows into pinned memory, copy them over
    import cupyx

    rows_h = xp.asnumpy(rows)
    flat = rows_h.reshape(-1)
    pinned = cupyx.empty_pinned((flat.size, index.d), dtype=index._vec.dtype)
    np.take(index._vec, np.maximum(flat, 0), axis=0, out=pinned)
    gathered = xp.asarray(pinned)
    local = np.where(flat >= 0, np.arange(flat.size), -1).reshape(rows_h.shape)
    return rerank_arrays(q, gathered, xp.asarray(local), cand, k, l2=l2, xp=xp, stream=sp)
