"""fastface on the GPU: alignment, IVF-PQ search and encoding, exact re-ranking.

The CUDA kernels are in a separate compiled module (``fastface._cuda``, built
when CMake finds ``nvcc``); arrays are managed with CuPy (extra ``gpu``) and
re-ranking runs in Numba CUDA. Every kernel has a CPU twin: ``device="emulate"``
runs the same per-thread code on the CPU (``fastface._cuda_emu``), which the
tests compare with fastface's CPU paths and FAISS.

Examples
--------
>>> import numpy as np
>>> from fastface import gpu
>>> from fastface.faces import template
>>> img = np.zeros((1, 250, 250, 3), np.uint8)
>>> crops, M = gpu.align(img, template("arcface")[None] * 1.5 + 20, device="emulate")
>>> crops.shape
(1, 112, 112, 3)
"""

from __future__ import annotations

from typing import Any

from ._adapter import add_encoded, from_cpu
from ._backend import available, get_backend
from .align import align, warp
from .ivfpq import GpuIVFPQ, encode

__all__ = [
    "CudaError",
    "GpuIVFPQ",
    "add_encoded",
    "align",
    "available",
    "device_info",
    "encode",
    "from_cpu",
    "get_backend",
    "warp",
]


def __getattr__(name: str) -> Any:
    if name == "CudaError":
        try:
            from .._cuda import CudaError
        except ImportError:
            from .._cuda_emu import CudaError
        return CudaError
    raise AttributeError(name)


def device_info(device: int = 0) -> dict[str, Any]:
    """Name, compute capability, multiprocessors, memory and bandwidth figures of a device."""
    from .. import _cuda

    info: dict[str, Any] = _cuda.device_info(device)
    # double data rate: bytes/s = 2 * clock * bus width / 8
    info["peak_bandwidth_gbs"] = (
        2 * info["memory_clock_khz"] * 1e3 * info["memory_bus_width_bits"] / 8 / 1e9
    )
    return info
