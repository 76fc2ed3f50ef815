"""Access to the compiled core and what it was built with."""

from __future__ import annotations

import platform
import sys
from typing import Any

import numpy as np

from . import _C  # type: ignore[attr-defined]

__all__ = ["build_info", "merge_topk"]


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
    from . import __version__

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
    D: np.ndarray, I: np.ndarray, k: int, *, larger_is_better: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard sorted top-k lists, shaped ``(nshards, nq, k_in)``, into ``(nq, k)``.

    Ties keep shard order (a stable sort of the concatenated lists); ids ``-1``
    are padding. Runs in C++ with the GIL released, parallel over queries.
    """
    if D.ndim != 3 or D.shape != I.shape:
        raise ValueError(
            f"merge_topk: expected D and I of equal shape (nshards, nq, k_in), got "
            f"{D.shape} and {I.shape}"
        )
    if k <= 0:
        raise ValueError(f"merge_topk: k must be positive, got {k}")
    D = np.ascontiguousarray(D, dtype=np.float32)
    I = np.ascontiguousarray(I, dtype=np.int64)
    out_D, out_I = _C.merge_topk(D, I, int(k), bool(larger_is_better))
    return out_D, out_I
