"""Face alignment on the GPU: the CPU ``faces.align`` semantics, one thread per pixel."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ..faces.align import DLIB_CHIP_SIZE, AlignResult, estimate_similarity
from ..faces.align import template as named_template
from ._arrays import kind_of, to_backend, to_kind
from ._backend import get_backend

__all__ = ["align", "warp"]


def _invert(A: np.ndarray) -> np.ndarray:
    L = np.linalg.inv(A[:, :, :2])
    out = np.empty_like(A)
    out[:, :, :2] = L
    out[:, :, 2] = -np.einsum("fij,fj->fi", L, A[:, :, 2])
    return np.ascontiguousarray(out)


def _pack_images(backend: Any, images: Any) -> tuple[Any, np.ndarray, str]:
    """One uint8 buffer on the backend and (N, 4) int64 rows (offset, height, width, stride)."""
    xp = backend.xp

    def check(shape: tuple[int, ...], dtype: Any, where: str) -> None:
        if np.dtype(dtype) != np.uint8:
            raise TypeError(f"images{where}: expected uint8 pixels, got {dtype}")
        if len(shape) != 3 or shape[2] != 3 or shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"images{where}: expected (H, W, 3) RGB, got shape {tuple(shape)}")

    if isinstance(images, Sequence) and not hasattr(images, "shape"):
        if len(images) == 0:
            raise ValueError("images: empty list")
        kind = kind_of(images[0])
        arrs = [to_backend(backend, im) for im in images]
        for i, im in enumerate(arrs):
            check(im.shape, im.dtype, f"[{i}]")
        sizes = np.array([im.size for im in arrs], np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        buf = xp.concatenate([im.ravel() for im in arrs])
        meta = np.array(
            [
                [o, im.shape[0], im.shape[1], im.shape[1] * 3]
                for o, im in zip(offsets, arrs, strict=True)
            ],
            np.int64,
        ).reshape(-1, 4)
        return buf, meta, kind
    kind = kind_of(images)
    arr = to_backend(backend, images)
    if arr.ndim != 4:
        raise ValueError(
            f"images: expected a batch (N, H, W, 3) or a list of (H, W, 3), got shape "
            f"{tuple(arr.shape)}"
        )
    check(arr.shape[1:], arr.dtype, "")
    n, h, w = arr.shape[:3]
    meta = np.empty((n, 4), np.int64)
    meta[:, 0] = np.arange(n, dtype=np.int64) * h * w * 3
    meta[:, 1:] = (h, w, w * 3)
    return arr.reshape(-1), meta, kind


def warp(
    images: Any,
    M: npt.ArrayLike,
    image_index: npt.ArrayLike,
    size: tuple[int, int],
    *,
    output: Literal["uint8", "float32_nchw"] = "uint8",
    mean: Sequence[float] = (127.5, 127.5, 127.5),
    std: Sequence[float] = (127.5, 127.5, 127.5),
    channel: Sequence[int] = (0, 1, 2),
    kernel: Literal["float", "fixed"] = "float",
    device: str = "cuda",
    stream: Any = None,
) -> Any:
    """Warp faces with forward matrices ``M`` ``(F, 2, 3)`` out of ``images`` (any sizes).

    The kernel behind :func:`align`; ``image_index[f]`` names the image of face ``f``.
    Returns crops of the same array kind as ``images``.
    """
    backend = get_backend(device)
    xp = backend.xp
    with backend.stream_context(stream):
        buf, meta, kind = _pack_images(backend, images)
        Mh = np.ascontiguousarray(M, dtype=np.float64)
        idx = np.ascontiguousarray(image_index, dtype=np.int64)
        F = idx.shape[0]
        if Mh.shape != (F, 2, 3):
            raise ValueError(f"M: expected shape ({F}, 2, 3), got {Mh.shape}")
        if F and (idx.min() < 0 or idx.max() >= meta.shape[0]):
            raise ValueError(f"image_index: values must lie in [0, {meta.shape[0]})")
        out_h, out_w = (int(v) for v in size)
        d_meta = backend.asarray(meta.T.copy())  # (4, N): offset, height, width, stride rows
        d_idx = backend.asarray(idx)
        d_M = backend.asarray(Mh)
        if output == "uint8":
            out = xp.empty((F, out_h, out_w, 3), np.uint8)
            u8, f32 = out, None
        elif output == "float32_nchw":
            out = xp.empty((F, 3, out_h, out_w), np.float32)
            u8, f32 = None, out
        else:
            raise ValueError(f"output: expected 'uint8' or 'float32_nchw', got {output!r}")
        if kernel not in ("float", "fixed"):
            raise ValueError(f"kernel: expected 'float' or 'fixed', got {kernel!r}")
        if F:
            row = d_meta.strides[0]
            base = backend.ptr(d_meta)
            backend.native.align(
                backend.ptr(buf),
                base,
                base + row,
                base + 2 * row,
                base + 3 * row,
                backend.ptr(d_idx),
                backend.ptr(d_M),
                F,
                out_h,
                out_w,
                kernel == "fixed",
                backend.ptr(u8),
                backend.ptr(f32),
                [float(v) for v in mean],
                [float(v) for v in std],
                [int(c) for c in channel],
                backend.stream_ptr(stream),
            )
    return to_kind(backend, out, kind)


def align(
    images: Any,
    landmarks: npt.ArrayLike,
    *,
    image_index: npt.ArrayLike | None = None,
    template: str | npt.ArrayLike = "arcface",
    size: int | None = None,
    output: Literal["uint8", "float32_nchw"] = "uint8",
    mean: float | Sequence[float] = 127.5,
    std: float | Sequence[float] = 127.5,
    rgb: bool = True,
    kernel: Literal["float", "fixed"] = "float",
    device: str = "cuda",
    stream: Any = None,
) -> AlignResult:
    """:func:`fastface.faces.align` on the GPU: same arguments, same crops.

    ``images`` may be NumPy arrays (copied to the device) or device arrays
    (CuPy, PyTorch CUDA tensors, anything with ``__cuda_array_interface__`` or
    DLPack), as one ``(N, H, W, 3)`` batch or a list of ``(H, W, 3)`` images of
    different sizes. Crops come back as the same kind of array; ``M`` is NumPy.
    ``device="emulate"`` runs the kernel's code on the CPU (for tests).
    """
    if isinstance(template, str):
        dst = named_template(template, size)
        size = (112 if template == "arcface" else DLIB_CHIP_SIZE) if size is None else size
    else:
        dst = np.asarray(template, dtype=np.float64)
        if dst.shape != (5, 2) or not np.isfinite(dst).all():
            raise ValueError(f"template: expected a finite (5, 2) array, got shape {dst.shape}")
        size = 112 if size is None else size
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"size: expected a positive int, got {size!r}")
    lm_in: Any = landmarks
    if kind_of(lm_in) != "numpy":
        lm_in = get_backend(device).to_host(to_backend(get_backend(device), lm_in))
    lm = np.asarray(lm_in, dtype=np.float64)
    if lm.ndim != 3 or lm.shape[1:] != dst.shape:
        raise ValueError(f"landmarks: expected shape (F, 5, 2), got {tuple(lm.shape)}")
    if not np.isfinite(lm).all():
        raise ValueError("landmarks: NaN or inf coordinates")
    n_images = len(images) if not hasattr(images, "shape") else int(images.shape[0])
    F = lm.shape[0]
    if image_index is None:
        if n_images != F:
            raise ValueError(
                f"landmarks: {F} faces for {n_images} images; pass image_index when an image "
                "holds several faces or none"
            )
        idx = np.arange(F, dtype=np.int64)
    else:
        idx = np.asarray(image_index)
        if idx.dtype.kind not in "iu" or idx.shape != (F,):
            raise ValueError(f"image_index: expected {F} integers, got {idx.dtype} {idx.shape}")
    if F and isinstance(template, str) and template == "dlib":
        M = _invert(estimate_similarity(np.broadcast_to(dst, lm.shape), lm))
    elif F:
        M = np.ascontiguousarray(estimate_similarity(lm, dst))
    else:
        M = np.empty((0, 2, 3))
    m3 = [float(v) for v in np.broadcast_to(np.asarray(mean, np.float32), (3,))]
    s3 = [float(v) for v in np.broadcast_to(np.asarray(std, np.float32), (3,))]
    if output == "float32_nchw" and any(v == 0 for v in s3):
        raise ValueError(f"std: must be non-zero, got {s3}")
    crops = warp(
        images,
        M,
        idx,
        (int(size), int(size)),
        output=output,
        mean=m3,
        std=s3,
        channel=(0, 1, 2) if rgb else (2, 1, 0),
        kernel=kernel,
        device=device,
        stream=stream,
    )
    return AlignResult(crops, M)
