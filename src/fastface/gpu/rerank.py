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
from functools import lru_cache
from typing import Any

import numpy as np

__all__ = ["rerank", "rerank_arrays", "simulator_enabled"]


def simulator_enabled() -> bool:
    """Whether Numba runs CUDA kernels in its simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    from numba import config

    return bool(getattr(config, "ENABLE_CUDASIM", False))


@lru_cache(maxsize=None)
def _kernels() -> tuple[Any, Any]:
    from numba import cuda, float32

    @cuda.jit(cache=False)
    def score_kernel(q, base, rows, l2, out):  # type: ignore[no-untyped-def]
        i, c = cuda.grid(2)
        if i >= rows.shape[0] or c >= rows.shape[1]:
            return
        r = rows[i, c]
        if r < 0:
            out[i, c] = 0.0
            return
        dot = float32(0.0)
        sq = float32(0.0)
        qq = float32(0.0)
        for j in range(q.shape[1]):
            v = float32(base[r, j])
            x = q[i, j]
            dot += x * v
            if l2:
                sq += v * v
                qq += x * x
        if l2:
            out[i, c] = qq - float32(2.0) * dot + sq
        else:
            out[i, c] = dot

    @cuda.jit(cache=False)
    def select_kernel(scores, rows, cand, larger, out_D, out_I):  # type: ignore[no-untyped-def]
        i = cuda.grid(1)
        if i >= rows.shape[0]:
            return
        k = out_D.shape[1]
        last = k - 1
        for c in range(rows.shape[1]):
            if rows[i, c] < 0:
                continue
            s = scores[i, c]
            idv = cand[i, c]
            if out_I[i, last] >= 0:
                t = out_D[i, last]
                if larger:
                    if s < t or (s == t and idv > out_I[i, last]):
                        continue
                elif s > t or (s == t and idv > out_I[i, last]):
                    continue
            p = last
            while p > 0:
                j = out_I[i, p - 1]
                if j >= 0:
                    t = out_D[i, p - 1]
                    if larger:
                        better = s > t or (s == t and idv < j)
                    else:
                        better = s < t or (s == t and idv < j)
                    if not better:
                        break
                out_D[i, p] = out_D[i, p - 1]
                out_I[i, p] = j
                p -= 1
            out_D[i, p] = s
            out_I[i, p] = idv

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
    if stream is not None and xp is not np:
        from numba import cuda

        launch_stream = cuda.external_stream(int(stream))
    tx, ty = 8, 32
    grid = (math.ceil(nq / tx), math.ceil(C / ty))
    score_kernel[grid, (tx, ty), launch_stream](q, base, rows, bool(l2), scores)
    select_kernel[math.ceil(nq / 128), 128, launch_stream](
        scores, rows, cand, not l2, out_D, out_I
    )
    return out_D, out_I


def rerank(index: Any, q: Any, cand: Any, k: int, *, stream: Any = None) -> tuple[Any, Any]:
    """Exact top-``k`` among candidate ids ``cand`` of a :class:`GpuIVFPQ`, from its stored vectors."""
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
