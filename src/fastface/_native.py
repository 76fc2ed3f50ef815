"""The one door to the compiled core ``fastface._C``.

Every use of native code goes through this module: the index (top-k merge,
8-bit IVF-PQ scan, list layout), alignment and detection (affine warps) and
:func:`build_info`. The wrappers here take arrays that the calling layer has
validated; they only make them contiguous with the dtype the core expects
(no value changes) and check the shapes the core relies on. The core
releases the GIL for every call that does real work.
"""

from __future__ import annotations

import importlib
import platform
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

_C: Any = importlib.import_module("._C", __package__)  # the compiled extension (csrc/)

__all__ = [
    "ListRun",
    "build_info",
    "copy_segments",
    "ivfpq8_search",
    "merge_topk",
    "rerank",
    "warp_affine_f32_nchw",
    "warp_affine_u8",
]

#: Inverted lists of one run held in place (see ``csrc/ivfpq.h``):
#: ``ListRun(codes, ids, codes_off, ids_off, count, code_size)`` with ``codes``
#: and ``ids`` 1-D uint8 buffers and per-list int64 byte offsets and counts.
#: The constructor checks that every list lies inside its buffers.
ListRun = _C.ListRun

#: Batched affine warps (``csrc/align.h``); inputs validated by :mod:`fastface.faces`.
warp_affine_u8 = _C.warp_affine_u8
warp_affine_f32_nchw = _C.warp_affine_f32_nchw


def build_info() -> dict[str, Any]:
    """What this installation was built with.

    Returns
    -------
    dict
        ``version``, ``python``, ``numpy``, ``faiss``, ``compiler``,
        ``cxx_flags``, ``build_type``, ``simd`` (highest SIMD level compiled
        in), ``openmp_version``, ``omp_max_threads``, ``cuda_built`` (whether
        the separate CUDA module ``fastface._cuda`` was built),
        ``cuda_version`` and ``cuda_archs`` (nvcc and architectures it was
        built with), ``cuda_device_count`` (``-1`` when the CUDA module is
        not built or cannot load) and ``pybind11_version``.

    Examples
    --------
    >>> import fastface
    >>> info = fastface.build_info()
    >>> sorted(k for k in ("simd", "cuda_built", "omp_max_threads") if k in info)
    ['cuda_built', 'omp_max_threads', 'simd']
    """
    from ._version import __version__

    info: dict[str, Any] = {
        "version": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": np.__version__,
    }
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:  # pragma: no cover - faiss is a hard dependency
        info["faiss"] = None
    info.update(_C.build_info())
    info["cuda_device_count"] = -1
    if info["cuda_built"]:
        try:  # a separate module: _C imports where the CUDA runtime cannot load
            from . import _cuda

            info["cuda_device_count"] = int(_cuda.device_count())
        except ImportError:
            pass
    return info


def merge_topk(
    D: npt.ArrayLike, I: npt.ArrayLike, k: int, *, larger_is_better: bool
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Top-``k`` of result lists shaped ``(nparts, nq, k_in)``, as ``(nq, k)``.

    The one merge of the library: better score first (larger when
    ``larger_is_better``, else smaller), **equal scores by lower id**; ids
    ``-1`` are padding and are skipped; missing results are padded with
    ``-1`` and ``-inf`` (``+inf``). The input lists need not be sorted and the
    parts may come in any order: the result is the same. Runs in C++ with the
    GIL released, parallel over queries.
    """
    D = np.asarray(D)
    I = np.asarray(I)
    if D.ndim != 3 or D.shape != I.shape:
        raise ValueError(
            f"merge_topk: expected D and I of equal shape (nparts, nq, k_in), got "
            f"{D.shape} and {I.shape}"
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"merge_topk: k must be a positive int, got {k!r}")
    D = np.ascontiguousarray(D, dtype=np.float32)
    I = np.ascontiguousarray(I, dtype=np.int64)
    out_D, out_I = _C.merge_topk(D, I, int(k), bool(larger_is_better))
    return out_D, out_I


def ivfpq8_search(
    q: npt.NDArray[np.float32],
    pq_t: npt.NDArray[np.float32],
    coarse: npt.NDArray[np.float32],
    inner_product: bool,
    assign_D: npt.NDArray[np.float32],
    assign_I: npt.NDArray[np.int64],
    runs: Sequence[Any],
    exclude: npt.NDArray[np.int64],
    k: int,
    max_copies: int = 1,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Exact top-``k`` of 8-bit PQ codes over the probed lists of ``runs`` (``csrc/ivfpq.h``).

    ``pq_t`` is the PQ codebook transposed to ``(M, dsub, 256)``; ``coarse`` the
    ``(nlist, d)`` centroids; ``exclude`` sorted ids never returned;
    ``max_copies`` (1 or 2) the most entries one id has (2: spilled
    assignment); each id is returned once, with its best score. The caller
    (:mod:`fastface.index`) has validated everything.
    """
    out: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]] = _C.ivfpq8_search(
        q,
        pq_t,
        coarse,
        bool(inner_product),
        assign_D,
        assign_I,
        list(runs),
        exclude,
        int(k),
        int(max_copies),
    )
    return out


_NO_ROWS = np.empty((0, 0), np.int64)
_NO_TABLE = np.empty(0, np.int64)


def rerank(
    q: npt.NDArray[np.float32],
    base: npt.NDArray[Any],
    cand: npt.NDArray[np.int64],
    k: int,
    *,
    l2: bool,
    rows: npt.NDArray[np.int64] | None = None,
    lo: int = 0,
    span: int = 0,
    table: npt.NDArray[np.int64] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Exact top-``k`` of each query's candidates ``cand`` (``(nq, m)``; ``csrc/rerank.h``).

    ``base``: ``(n, d)`` float32 or float16 (C-contiguous; may be a memory
    map, read only at the rows named). A candidate's row is ``rows[i, c]``
    when ``rows`` is given, else ``table[id - lo]`` (or ``id - lo`` without a
    table) for ids in ``lo .. lo + span - 1``; candidates without a row are
    skipped. Results best first, equal scores by lower id, padded. The caller
    (:mod:`fastface.kernels.exact`) has validated everything.
    """
    if base.dtype == np.float16:
        base = base.view(np.uint16)
    out: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]] = _C.rerank(
        q,
        base,
        cand,
        _NO_ROWS if rows is None else rows,
        int(lo),
        int(span),
        _NO_TABLE if table is None else table,
        bool(l2),
        int(k),
    )
    return out


def copy_segments(
    src: npt.NDArray[np.uint8],
    dst: npt.NDArray[np.uint8],
    src_off: npt.NDArray[np.int64],
    dst_off: npt.NDArray[np.int64],
    nbytes: npt.NDArray[np.int64],
) -> None:
    """Copy ``nbytes[i]`` bytes from ``src[src_off[i]:]`` to ``dst[dst_off[i]:]`` (1-D uint8)."""
    _C.copy_segments(src, dst, src_off, dst_off, nbytes)
