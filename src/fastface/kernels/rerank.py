"""Exact re-scoring of candidate lists against stored vectors (Numba).

The gathered half of :mod:`fastface.kernels.exact`, the library's one exact
scorer: these kernels score each query against its own candidate rows and
keep the best ``k``; :func:`fastface.kernels.exact.scores` scores blocks.

The stored vectors may be a read-only memory map: the kernels read only the
rows named by ``rows``, so resident memory stays bounded by the rows touched.
Numba has no float16 arithmetic on the CPU, so float16 storage is passed as
its ``uint16`` bit pattern and widened exactly by integer operations
(:func:`widen_f16`; every float16 is a float32); sums accumulate in float32.

Result order: best score first; equal scores keep the lower id first.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import numpy.typing as npt
from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = [
    "F16_SCALE",
    "rerank_f16",
    "rerank_f32",
    "widen_f16",
]

#: Candidates ahead whose rows are prefetched while the current one is scored.
PREFETCH_AHEAD = 4


def _prefetch_codegen(typingctx: Any, arr: Any, r: Any, j: Any) -> Any:
    """``prefetch(arr, r, j)``: hint the CPU to load ``arr[r, j]``'s cache line (LLVM prefetch).

    Re-ranking reads rows scattered over a memory map: each is a cache and TLB
    miss. Asking for the next candidates' rows while scoring the current one
    overlaps those misses. A prefetch never faults and changes no result.
    """
    sig = numba.types.void(arr, r, j)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(
            context, builder, aryty, ary, [args[1], args[2]], wraparound=False
        )
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        # read, high temporal locality, data cache
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


def _no_prefetch(arr: Any, r: Any, j: Any) -> None:
    """Pure-Python twin (``NUMBA_DISABLE_JIT=1``): a hint has nothing to do there."""


_prefetch: Any = (
    _no_prefetch if numba.config.DISABLE_JIT else intrinsic(_prefetch_codegen)  # type: ignore[attr-defined]
)


@numba.njit(cache=True, nogil=True)
def _prefetch_row(base: Any, rows: npt.NDArray[np.int64], i: int, c: int) -> None:
    """Prefetch the whole row of candidate ``c`` of query ``i`` (if any), 64 bytes apart."""
    if c < rows.shape[1]:
        r = rows[i, c]
        if r >= 0:
            step = max(1, 64 // base.itemsize)
            for j in range(0, base.shape[1], step):
                _prefetch(base, r, j)


# Sums over finite values only (stored vectors are checked finite and in float16 range
# when added): reassociation lets LLVM vectorise them. No "nnan"/"ninf": the selection
# below compares against the -inf/+inf padding sentinels, which those flags would break.
_SUM_FLAGS = {"reassoc", "contract", "nsz", "arcp"}


@numba.njit(cache=True, nogil=True, fastmath=_SUM_FLAGS)
def _score(
    q: npt.NDArray[np.float32], v: npt.NDArray[np.float32], qq: np.float32, l2: bool
) -> np.float32:
    """Inner product of ``q`` and ``v``, or their squared L2 distance (``qq = |q|^2``)."""
    dot = np.float32(0.0)
    if not l2:
        for j in range(q.shape[0]):
            dot += q[j] * v[j]
        return dot
    sq = np.float32(0.0)
    for j in range(q.shape[0]):
        dot += q[j] * v[j]
        sq += v[j] * v[j]
    return qq - np.float32(2.0) * dot + sq


@numba.njit(cache=True, nogil=True, fastmath=_SUM_FLAGS)
def _sqnorm(q: npt.NDArray[np.float32]) -> np.float32:
    qq = np.float32(0.0)
    for j in range(q.shape[0]):
        qq += q[j] * q[j]
    return qq


@numba.njit(cache=True, nogil=True, fastmath=_SUM_FLAGS)
def widen_f16(bits: npt.NDArray[np.uint16], out_bits: npt.NDArray[np.uint32]) -> None:
    """float16 bit patterns to float32 bit patterns, scaled down by 2**112.

    Moving the float16 exponent and mantissa into float32 position gives a
    float32 equal to the value times ``2**-112`` (float16 subnormals included,
    as float32 subnormals); multiplying by :data:`F16_SCALE` restores it
    exactly. Integer operations only, so the loop vectorises. Inf and NaN are
    not handled: stored vectors are checked finite when added.
    """
    for j in range(bits.shape[0]):
        h = np.uint32(bits[j])
        out_bits[j] = ((h & np.uint32(0x7FFF)) << np.uint32(13)) | (
            (h & np.uint32(0x8000)) << np.uint32(16)
        )


#: Multiplier that completes :func:`widen_f16` (``2**112``, exact in float32).
F16_SCALE = np.float32(2.0**112)


@numba.njit(cache=True, nogil=True)
def _insert(
    out_D: npt.NDArray[np.float32],
    out_I: npt.NDArray[np.int64],
    s: np.float32,
    i: np.int64,
    larger: bool,
) -> None:
    """Insert ``(s, i)`` into a row kept sorted best-first (ties: lower id first).

    ``out_I == -1`` marks empty slots; an empty slot loses to any candidate.
    """
    k = out_D.shape[0]
    last = k - 1
    # does (s, i) beat the current last entry?
    if out_I[last] >= 0:
        t = out_D[last]
        if larger:
            if s < t or (s == t and i > out_I[last]):
                return
        elif s > t or (s == t and i > out_I[last]):
            return
    p = last
    while p > 0:
        j = out_I[p - 1]
        if j >= 0:
            t = out_D[p - 1]
            better = s > t or (s == t and i < j) if larger else s < t or (s == t and i < j)
            if not better:
                break
        out_D[p] = out_D[p - 1]
        out_I[p] = j
        p -= 1
    out_D[p] = s
    out_I[p] = i


@numba.njit(cache=True, parallel=True, nogil=True)
def rerank_f32(
    q: npt.NDArray[np.float32],
    base: npt.NDArray[np.float32],
    rows: npt.NDArray[np.int64],
    cand: npt.NDArray[np.int64],
    l2: bool,
    out_D: npt.NDArray[np.float32],
    out_I: npt.NDArray[np.int64],
) -> None:
    """Exact top-``k`` of each query's candidates, float32 storage.

    ``rows[i, c]`` is the row of ``base`` holding candidate id ``cand[i, c]``
    (``-1``: skip). ``out_D``/``out_I`` (``(nq, k)``) must arrive filled with
    the padding (``-inf``/``+inf`` and ``-1``); each query writes only its row.
    """
    for i in numba.prange(q.shape[0]):
        qq = _sqnorm(q[i])
        for c in range(min(PREFETCH_AHEAD, rows.shape[1])):
            _prefetch_row(base, rows, i, c)
        for c in range(rows.shape[1]):
            _prefetch_row(base, rows, i, c + PREFETCH_AHEAD)
            r = rows[i, c]
            if r < 0:
                continue
            s = _score(q[i], base[r], qq, l2)
            _insert(out_D[i], out_I[i], s, cand[i, c], not l2)


@numba.njit(cache=True, parallel=True, nogil=True)
def rerank_f16(
    q: npt.NDArray[np.float32],
    base: npt.NDArray[np.uint16],
    rows: npt.NDArray[np.int64],
    cand: npt.NDArray[np.int64],
    l2: bool,
    out_D: npt.NDArray[np.float32],
    out_I: npt.NDArray[np.int64],
) -> None:
    """As :func:`rerank_f32`, for float16 storage passed as its ``uint16`` bits (finite)."""
    for i in numba.prange(q.shape[0]):
        # q is pre-multiplied by 2**112 (exact: a power of two), which completes the
        # float16 widening (see widen_f16) without a multiply per element
        qs = q[i] * F16_SCALE
        qq = _sqnorm(q[i])
        bits = np.empty(q.shape[1], np.uint32)
        v = bits.view(np.float32)
        for c in range(min(PREFETCH_AHEAD, rows.shape[1])):
            _prefetch_row(base, rows, i, c)
        for c in range(rows.shape[1]):
            _prefetch_row(base, rows, i, c + PREFETCH_AHEAD)
            r = rows[i, c]
            if r < 0:
                continue
            widen_f16(base[r], bits)
            if l2:
                # scale v back instead (L2 needs |v|^2 too)
                for j in range(v.shape[0]):
                    v[j] *= F16_SCALE
                s = _score(q[i], v, qq, l2)
            else:
                s = _score(qs, v, qq, l2)
            _insert(out_D[i], out_I[i], s, cand[i, c], not l2)
