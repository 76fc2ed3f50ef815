"""Array kinds in and out: NumPy, CuPy, ``__cuda_array_interface__`` and DLPack.

Results come back as the kind of array the caller passed: NumPy in, NumPy
out; CuPy in, CuPy out; a PyTorch CUDA tensor (DLPack) in, a tensor out; a
Numba device array (``__cuda_array_interface__``) in, a Numba device array out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["is_device_array", "kind_of", "to_backend", "to_kind"]


def kind_of(x: Any) -> str:
    """``"numpy"``, ``"cupy"``, ``"torch"``, ``"cai"`` or ``"dlpack"`` (other DLPack producers)."""
    if isinstance(x, np.ndarray):
        return "numpy"
    mod = type(x).__module__.split(".")[0]
    if mod == "cupy":
        return "cupy"
    if mod == "torch":
        return "torch" if getattr(x, "is_cuda", False) else "numpy"
    if hasattr(x, "__cuda_array_interface__"):
        return "cai"
    if hasattr(x, "__dlpack__"):
        return "dlpack"
    return "numpy"


def is_device_array(x: Any) -> bool:
    return kind_of(x) in ("cupy", "torch", "cai", "dlpack")


def to_backend(backend: Any, x: Any, dtype: Any = None) -> Any:
    """``x`` as a C-contiguous array of ``backend`` (zero-copy where the kind allows)."""
    kind = kind_of(x)
    if backend.is_device:
        cp = backend.xp
        if kind == "torch" or kind == "dlpack":
            x = cp.from_dlpack(x)
        elif kind == "numpy" and type(x).__module__.split(".")[0] == "torch":
            x = x.numpy()
        return backend.asarray(x, dtype)
    if kind in ("cupy", "torch", "cai", "dlpack"):
        raise TypeError(
            f"got a device array ({type(x).__name__}) but the backend is {backend.kind!r}; "
            "pass a NumPy array or use device='cuda'"
        )
    if type(x).__module__.split(".")[0] == "torch":
        x = x.numpy()
    return backend.asarray(x, dtype)


def to_kind(backend: Any, y: Any, kind: str) -> Any:
    """A backend result ``y`` as the array kind ``kind`` of the caller's input."""
    if kind == "numpy":
        return backend.to_host(y)
    if kind == "cupy":
        return y
    if kind == "torch":
        import torch

        return torch.from_dlpack(y)
    if kind == "cai":
        from numba import cuda

        return cuda.as_cuda_array(y)
    return y  # other DLPack producers: CuPy arrays speak DLPack too
