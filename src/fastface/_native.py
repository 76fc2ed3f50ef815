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
    "coarse_topk",
    "copy_segments",
    "ivfpq8_search",
    "merge_topk",
    "rerank",
    "select_topk",
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


def coarse_topk(
    q: npt.NDArray[np.float32],
    centroids_t: npt.NDArray[np.float32],
    k: int,
    *,
    centroid_norms: npt.NDArray[np.float32] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The ``k`` best of ``n`` centroids for each query, scored exhaustively (``csrc/coarse.h``).

    ``q`` ``(nq, d)`` and the centroids transposed, ``(d, n)``, float32 and
    C-contiguous. Inner product, larger first; with ``centroid_norms`` (``(n,)``,
    squared) the squared L2 distance ``max(|q|^2 + |c|^2 - 2 q.c, 0)``, smaller
    first. Equal scores by lower centroid; ``-1`` pads when ``k > n``. The sums
    run in a fixed order (the same bits on every instruction-set level), in
    fastface's own threads, without BLAS.
    """
    if q.ndim != 2 or centroids_t.ndim != 2 or q.shape[1] != centroids_t.shape[0]:
        raise ValueError(
            f"coarse_topk: queries {q.shape} and transposed centroids {centroids_t.shape} "
            "do not match"
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"coarse_topk: k must be a positive int, got {k!r}")
    norms = np.empty(0, np.float32) if centroid_norms is None else centroid_norms
    out: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]] = _C.coarse_topk(
        np.ascontiguousarray(q, np.float32),
        np.ascontiguousarray(centroids_t, np.float32),
        np.ascontiguousarray(norms, np.float32),
        int(k),
    )
    return out


def select_topk(
    S: npt.ArrayLike,
    k: int,
    *,
    larger_is_better: bool,
    l2_norms: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Top-``k`` columns of each row of a score matrix ``S`` ``(nq, n)``, as ``(nq, k)``.

    Scores and column numbers, better first (larger when ``larger_is_better``),
    **equal scores by lower column** (the order of :func:`merge_topk`); rows
    with fewer than ``k`` columns are padded with ``-1`` and ``-inf``
    (``+inf``). With ``l2_norms=(row_norms, col_norms)`` (squared norms,
    ``(nq,)`` and ``(n,)``), ``S`` holds inner products and the scores are the
    squared distances ``max(row + col - 2 S, 0)``, computed as FAISS's flat
    search computes them. C++ with the GIL released, parallel over rows.
    """
    S = np.ascontiguousarray(S, dtype=np.float32)
    if S.ndim != 2:
        raise ValueError(f"select_topk: expected a 2-D score matrix, got shape {S.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"select_topk: k must be a positive int, got {k!r}")
    empty = np.empty(0, np.float32)
    rn, cn = empty, empty
    if l2_norms is not None:
        rn = np.ascontiguousarray(l2_norms[0], dtype=np.float32)
        cn = np.ascontiguousarray(l2_norms[1], dtype=np.float32)
        if rn.shape != (S.shape[0],) or cn.shape != (S.shape[1],):
            raise ValueError(
                f"select_topk: norms shaped {rn.shape} and {cn.shape} do not match S {S.shape}"
            )
    if S.shape[1] >= 2**32:
        raise ValueError("select_topk: at most 2**32 - 1 columns")
    out_D, out_I = _C.select_topk(S, int(k), bool(larger_is_better), rn, cn)
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
