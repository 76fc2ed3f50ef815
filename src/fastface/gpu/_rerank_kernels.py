# mypy: ignore-errors
# (Numba CUDA kernel source: typed by Numba at compile time, not by annotations)
"""Numba CUDA kernels of :mod:`fastface.gpu.rerank` (imported on first use).

Kept in their own module with ``cuda`` as a module global: Numba's CUDA
simulator runs kernels by swapping that global for its own implementation.
"""

from __future__ import annotations

from numba import cuda, float32

__all__ = ["score_kernel", "select_kernel"]


@cuda.jit(cache=False)
def score_kernel(q, base, rows, l2, out):
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
def select_kernel(scores, rows, cand, larger, out_D, out_I):
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
                beats = s > t if larger else s < t
                if not (beats or (s == t and idv < j)):
                    break
            out_D[i, p] = out_D[i, p - 1]
            out_I[i, p] = j
            p -= 1
        out_D[i, p] = s
        out_I[i, p] = idv
