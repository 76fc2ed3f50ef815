"""Where GPU kernels run: the CUDA module on a device, or its CPU emulation.

Both backends expose the same launchers (``fastface._cuda`` and
``fastface._cuda_emu`` are one binding compiled twice) and an array module
``xp``: CuPy for ``"cuda"``, NumPy for ``"emulate"``. The Python driver code
(batching, coarse GEMMs, layouts) is written once against this interface, so
running it with ``device="emulate"`` on a CPU executes the same driver and the
same per-thread kernel code as on the GPU, one simulated thread at a time.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

import numpy as np

__all__ = ["Backend", "available", "get_backend"]


class Backend:
    """Array module, native launchers and stream handling of one device kind."""

    def __init__(self, kind: str, xp: Any, native: Any) -> None:
        self.kind = kind
        self.xp = xp
        self.native = native

    @property
    def is_device(self) -> bool:
        return self.kind == "cuda"

    def ptr(self, a: Any) -> int:
        """Address of a contiguous array's first element (0 for ``None``)."""
        if a is None:
            return 0
        if self.is_device:
            return int(a.data.ptr)
        return int(a.ctypes.data)

    def stream_ptr(self, stream: Any) -> int:
        """A ``cudaStream_t`` as an int: from a CuPy/Numba stream, an int, or the current one."""
        if not self.is_device:
            return 0
        if stream is None:
            return int(self.xp.cuda.get_current_stream().ptr)
        if isinstance(stream, int):
            return stream
        for attr in ("ptr", "handle"):
            if hasattr(stream, attr):
                h = getattr(stream, attr)
                return int(getattr(h, "value", h) or 0)
        raise TypeError(
            f"stream: expected a CuPy or Numba stream or a cudaStream_t int, got "
            f"{type(stream).__name__}"
        )

    def stream_context(self, stream: Any) -> Any:
        """Context under which CuPy work goes to ``stream``."""
        import contextlib

        if not self.is_device or stream is None:
            return contextlib.nullcontext()
        cp = self.xp
        if isinstance(stream, cp.cuda.Stream):
            return stream
        return cp.cuda.ExternalStream(self.stream_ptr(stream))

    def asarray(self, x: Any, dtype: Any = None) -> Any:
        """``x`` on this backend, C-contiguous (a copy only where needed)."""
        if self.is_device:
            return self.xp.ascontiguousarray(self.xp.asarray(x, dtype=dtype))
        return np.ascontiguousarray(x, dtype=dtype)

    def to_host(self, x: Any) -> np.ndarray:
        return self.xp.asnumpy(x) if self.is_device else np.asarray(x)

    def synchronize(self, stream: Any = None) -> None:
        self.native.synchronize(self.stream_ptr(stream))

    def sm_count(self) -> int:
        """Multiprocessors of the current device (1 for the emulation)."""
        if not self.is_device:
            return 1
        return _sm_count(self.native, int(self.xp.cuda.Device().id))


@cache
def _sm_count(native: Any, device: int) -> int:
    return int(native.device_info(device)["sm_count"])


def _import(name: str) -> Any:
    return importlib.import_module(f"fastface.{name}")


@cache
def _cuda_status() -> tuple[bool, str]:
    try:
        native = _import("_cuda")
    except ImportError as e:
        return False, f"the CUDA module fastface._cuda is not built or cannot load ({e})"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False, "CuPy is not installed (pip install 'fastface[gpu]')"
    n = native.device_count()
    if n <= 0:
        return False, "no CUDA device is visible (driver missing or no GPU)"
    return True, f"{n} CUDA device(s)"


def available() -> bool:
    """Whether the CUDA path can run here: module built, CuPy installed, a device visible."""
    return _cuda_status()[0]


def get_backend(device: str | None) -> Backend:
    """``"cuda"`` (or ``"cuda:0"``): the GPU; ``"emulate"``: the CPU emulation of the kernels."""
    if device == "emulate":
        return Backend("emulate", np, _import("_cuda_emu"))
    if device is not None and (device == "cuda" or device.startswith("cuda:")):
        ok, why = _cuda_status()
        if not ok:
            raise RuntimeError(f"device={device!r}: {why}")
        import cupy

        if device.startswith("cuda:"):
            cupy.cuda.Device(int(device.split(":", 1)[1])).use()
        return Backend("cuda", cupy, _import("_cuda"))
    raise ValueError(f"device: expected 'cuda', 'cuda:N' or 'emulate', got {device!r}")
