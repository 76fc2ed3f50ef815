"""Batched face alignment: similarity transform per face, warp in the native core.

The recipe is InsightFace's: a similarity transform from the 5 detected
landmarks to a fixed template, estimated by the Umeyama method (as
``skimage.transform.SimilarityTransform`` computes it, reflection guard
included), then a bilinear warp with border 0 (as ``cv2.warpAffine``). Here
the estimate is vectorised over faces and the warp runs in C++, parallel over
faces with the GIL released.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from .. import _native as _C

if TYPE_CHECKING:
    from .spec import AlignSpec

__all__ = [
    "ARCFACE_TEMPLATE",
    "DLIB_TEMPLATE",
    "AlignResult",
    "align",
    "estimate_similarity",
    "template",
]

#: ArcFace's 5-point template for 112 x 112 crops, in pixels: left eye, right
#: eye, nose tip, left and right mouth corner, as seen in the image.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)

#: dlib's 5-point chip template on the unit square before padding, in the
#: order of dlib's 5-point shape predictor: outer and inner corner of the eye
#: on the image's right, outer and inner corner of the eye on the image's
#: left, base of the nose. These are the positions ``dlib.get_face_chip``
#: uses; each lies within 0.004 of the matching point (45, 42, 36, 39, 33) of
#: dlib's 68-point mean face.
DLIB_TEMPLATE = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ],
    dtype=np.float64,
)

#: dlib's face recognition model takes 150 x 150 chips with padding 0.25.
DLIB_CHIP_SIZE = 150
DLIB_CHIP_PADDING = 0.25


class AlignResult(NamedTuple):
    """Aligned crops and the 2 x 3 matrices that made them.

    ``crops`` is ``(F, size, size, 3)`` uint8 or ``(F, 3, size, size)``
    float32, a :class:`~fastface.faces.Crops` array that records how it was
    made (``crops.spec``, also ``result.spec``); ``M[f]`` maps image points
    of face ``f`` to crop points (the matrix ``cv2.warpAffine`` takes), so
    ``cv2.invertAffineTransform(M[f])`` maps crop points back to the image.
    """

    crops: np.ndarray
    M: np.ndarray

    @property
    def spec(self) -> AlignSpec | None:
        """How the crops were made (template, size, output, normalisation)."""
        return getattr(self.crops, "spec", None)


def template(name: str = "arcface", size: int | None = None) -> np.ndarray:
    """The 5 target points of a named template, in pixels of a ``size`` crop.

    Parameters
    ----------
    name : {"arcface", "dlib"}
        ``"arcface"``: the ArcFace template for 112 (default size), scaled for
        multiples of 112; for other sizes it is scaled from the 128 variant
        (x shifted by +8 at 128), as InsightFace does. ``"dlib"``: dlib's
        5-point chip template with padding 0.25, for 150 by default.
    size : int, optional
        Crop side in pixels.

    Examples
    --------
    >>> template("arcface", 128)[0].round(4).tolist()
    [46.2946, 51.6963]
    >>> template("dlib").round(3)[4].tolist()
    [73.511, 87.28]
    """
    if name == "arcface":
        size = 112 if size is None else _positive_size(size)
        if size % 112 == 0:
            return ARCFACE_TEMPLATE * (size / 112.0)
        ratio = size / 128.0
        out = ARCFACE_TEMPLATE * ratio
        out[:, 0] += 8.0 * ratio
        return out
    if name == "dlib":
        size = DLIB_CHIP_SIZE if size is None else _positive_size(size)
        pad = DLIB_CHIP_PADDING
        return (DLIB_TEMPLATE + pad) / (2 * pad + 1) * size - 0.5
    raise ValueError(f"template: unknown name {name!r}; use 'arcface', 'dlib' or a (5, 2) array")


_named_template = template  # align's `template` argument shadows the function


def _positive_size(size: Any, name: str = "size") -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"{name}: expected a positive int, got {size!r}")
    return int(size)


def estimate_similarity(src: npt.ArrayLike, dst: npt.ArrayLike) -> np.ndarray:
    """Least-squares similarity transforms from ``src`` to ``dst`` points, batched.

    The result of Umeyama's method as ``skimage.transform.SimilarityTransform``
    computes it (its guard against reflections and its rank-deficient branch
    included), in closed form and vectorised over faces.

    Parameters
    ----------
    src : (F, K, 2) array
        Points per face (landmarks in the image).
    dst : (K, 2) or (F, K, 2) array
        Target points (a template), shared or per face.

    Returns
    -------
    (F, 2, 3) float64
        Forward matrices; ``M[f] @ [x, y, 1]`` maps ``src`` to ``dst``.

    Raises
    ------
    ValueError
        Naming the first face whose points are degenerate (all equal).

    Examples
    --------
    >>> src = template("arcface")[None] * 2 + 10
    >>> (estimate_similarity(src, template("arcface")).round(6) + 0.0).tolist()  # no -0.0
    [[[0.5, 0.0, -5.0], [0.0, 0.5, -5.0]]]
    """
    s = np.asarray(src, dtype=np.float64)
    d = np.broadcast_to(np.asarray(dst, dtype=np.float64), s.shape)
    s_mean = s.mean(axis=1)
    d_mean = d.mean(axis=1)
    s_dm = s - s_mean[:, None]
    d_dm = d - d_mean[:, None]
    # In 2-D, Umeyama's SVD solution with skimage's reflection guard is the
    # best proper rotation and scale, which has a closed form: with
    # A = sum_k d_k s_k^T, the matrix scale * R is [[c, -t], [t, c]] with
    # c = (A00 + A11) / var and t = (A10 - A01) / var. (When det(A) < 0 the
    # guard's scale is (S1 - S2) / var = hypot(c, t); for collinear points
    # S2 = 0 and both branches agree.) No SVD: 2x2 per face, vectorised.
    sx, sy = s_dm[..., 0], s_dm[..., 1]
    dx, dy = d_dm[..., 0], d_dm[..., 1]
    var = (sx * sx + sy * sy).sum(axis=1)
    if (var == 0).any():
        bad = int(np.flatnonzero(var == 0)[0])
        raise ValueError(
            f"landmarks: face {bad} is degenerate (all points equal); a similarity "
            "transform needs at least two distinct points"
        )
    c = (sx * dx + sy * dy).sum(axis=1) / var
    t = (sx * dy - sy * dx).sum(axis=1) / var
    M = np.empty((s.shape[0], 2, 3))
    M[:, 0, 0] = c
    M[:, 0, 1] = -t
    M[:, 1, 0] = t
    M[:, 1, 1] = c
    M[:, 0, 2] = d_mean[:, 0] - (c * s_mean[:, 0] - t * s_mean[:, 1])
    M[:, 1, 2] = d_mean[:, 1] - (t * s_mean[:, 0] + c * s_mean[:, 1])
    return M


def _check_images(
    images: Any, gray_to_rgb: bool
) -> tuple[np.ndarray | list[np.ndarray], list[tuple[int, int]]]:
    """Images as a C-contiguous (N, H, W, 3) uint8 array or a list of (H, W, 3)."""

    def one(im: Any, where: str) -> np.ndarray:
        if not isinstance(im, np.ndarray):
            raise TypeError(f"images{where}: expected a numpy uint8 array, got {type(im).__name__}")
        if im.dtype != np.uint8:
            raise TypeError(f"images{where}: expected uint8 pixels, {pixel_hint(im)}")
        if im.ndim == 2 or (im.ndim == 3 and im.shape[2] == 1):
            if not gray_to_rgb:
                raise ValueError(
                    f"images{where}: expected 3 channels (H, W, 3), got grayscale "
                    f"{tuple(im.shape)}; pass gray_to_rgb=True to replicate the channel"
                )
            im = np.repeat(im.reshape(im.shape[0], im.shape[1], 1), 3, axis=2)
        if im.ndim != 3 or im.shape[2] != 3:
            raise ValueError(
                f"images{where}: expected (H, W, 3) RGB, got shape {tuple(im.shape)}"
                + ("; drop the alpha channel: im[..., :3]" if im.ndim == 3 else "")
            )
        if im.shape[0] == 0 or im.shape[1] == 0:
            raise ValueError(f"images{where}: empty image of shape {tuple(im.shape)}")
        return np.ascontiguousarray(im)

    if isinstance(images, np.ndarray) and images.ndim == 4:
        if images.dtype != np.uint8:
            raise TypeError(f"images: expected uint8 pixels, {pixel_hint(images)}")
        if images.shape[3] == 1 and gray_to_rgb:
            images = np.repeat(images, 3, axis=3)
        if images.shape[3] != 3:
            raise ValueError(
                f"images: expected (N, H, W, 3), got shape {tuple(images.shape)}"
                + ("; pass gray_to_rgb=True" if images.shape[3] == 1 else "")
            )
        batch = np.ascontiguousarray(images)
        return batch, [(batch.shape[1], batch.shape[2])] * batch.shape[0]
    if isinstance(images, np.ndarray):
        if images.ndim in (2, 3):
            raise ValueError(
                f"images: expected a batch (N, H, W, 3) or a list of images, got one array of "
                f"shape {tuple(images.shape)}; pass images[None] or [image]"
            )
        raise ValueError(f"images: expected (N, H, W, 3), got shape {tuple(images.shape)}")
    if not isinstance(images, Sequence):
        raise TypeError(
            f"images: expected an (N, H, W, 3) uint8 array or a list of (H, W, 3) arrays, "
            f"got {type(images).__name__}"
        )
    out = [one(im, f"[{i}]") for i, im in enumerate(images)]
    return out, [(im.shape[0], im.shape[1]) for im in out]


def pixel_hint(x: np.ndarray) -> str:
    """``"got <dtype> ...; convert with ..."``: the conversion to uint8 that keeps the picture.

    Float images come in two conventions: scikit-image's [0, 1] and OpenCV's
    [0, 255]. The advice depends on the values, so that following it never
    turns an image black (clipping [0, 1] floats to uint8 gives 0 and 1).

    Examples
    --------
    >>> pixel_hint(np.full((2, 2, 3), 0.5))
    'got float64 values in [0.5, 0.5], a [0, 1] image (scikit-image convention); convert with skimage.util.img_as_ubyte(x) or (x * 255).round().astype(np.uint8)'
    """  # noqa: E501
    got = f"got {x.dtype}"
    if x.dtype == np.bool_:
        return f"{got}; convert with x.astype(np.uint8) * 255"
    if x.dtype.kind not in "fiu" or x.size == 0:
        return f"{got}; decode the image to uint8 RGB"
    finite = x[np.isfinite(x)] if x.dtype.kind == "f" else x
    if finite.size == 0:
        return f"{got} with no finite value; not an image"
    lo, hi = float(finite.min()), float(finite.max())
    got += f" values in [{lo:g}, {hi:g}]"
    if x.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
        return (
            f"{got}, a [0, 1] image (scikit-image convention); convert with "
            "skimage.util.img_as_ubyte(x) or (x * 255).round().astype(np.uint8)"
        )
    if x.dtype.kind == "f" and lo >= -1.0 and hi <= 1.0:
        return f"{got}, a [-1, 1] image; convert with ((x + 1) * 127.5).round().astype(np.uint8)"
    if x.dtype == np.uint16 and hi > 255:
        return f"{got}, a 16-bit image; convert with (x // 257).astype(np.uint8)"
    if lo >= 0 and hi <= 255:
        rnd = ".round()" if x.dtype.kind == "f" else ""
        return f"{got}, a [0, 255] image; convert with x{rnd}.astype(np.uint8)"
    rnd = ".round()" if x.dtype.kind == "f" else ""
    return (
        f"{got}, outside [0, 255]; rescale it to [0, 255] first (np.clip(x, 0, 255){rnd}"
        ".astype(np.uint8) cuts off what lies outside)"
    )


def _check_landmarks(landmarks: Any, k: int) -> np.ndarray:
    lm = np.asarray(landmarks)
    if lm.dtype.kind not in "fiu":
        raise TypeError(f"landmarks: expected float coordinates, got {lm.dtype}")
    if lm.ndim != 3 or lm.shape[1:] != (k, 2):
        raise ValueError(
            f"landmarks: expected shape (F, {k}, 2) (x, y per point), got {tuple(lm.shape)}"
            + ("; for one face pass landmarks[None]" if lm.shape == (k, 2) else "")
        )
    lm = lm.astype(np.float64, copy=False)
    finite = np.isfinite(lm).all(axis=(1, 2))
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"landmarks: face {bad} has NaN or inf coordinates "
            f"({int((~finite).sum())} face(s) in all); drop or re-detect them"
        )
    return lm


def align(
    images: np.ndarray | Sequence[np.ndarray],
    landmarks: Any,
    *,
    image_index: npt.ArrayLike | None = None,
    for_model: Any = None,
    template: str | npt.ArrayLike | None = None,
    size: int | None = None,
    output: Literal["uint8", "float32_nchw"] | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    rgb: bool | None = None,
    kernel: Literal["float", "fixed"] = "float",
    gray_to_rgb: bool = False,
    threads: int | None = None,
    device: str | None = None,
    stream: Any = None,
) -> AlignResult:
    """Aligned face crops from images and 5 landmarks per face.

    Parameters
    ----------
    images : (N, H, W, 3) uint8 array, or list of (H, W, 3) uint8 arrays
        Decoded RGB images; a list may mix sizes.
    landmarks : (F, 5, 2) float, or list of Detections (one per image)
        Points per face in the template's convention. Points from
        :func:`~fastface.faces.detect` (``"mtcnn5"``) and
        :func:`~fastface.faces.dlib_landmarks` (``"dlib5"``) carry their
        convention, and points of the wrong one raise ``ValueError``; a
        plain array is taken as given. With ``detect``'s output itself
        (a list of :class:`~fastface.faces.Detections`) ``image_index`` is
        implied, and for the ``"dlib"`` template dlib's 5 points are found
        inside the detected boxes. Points outside the image are fine: what
        falls outside reads 0.
    image_index : (F,) int, optional
        The image each face comes from; by default face ``f`` is in image
        ``f`` (then F must equal N).
    for_model : embedder or ModelSpec, optional
        Make the crops this model takes: its template, size, normalisation
        and channel order (``embedder.spec.alignment``). Excludes
        ``template``, ``size``, ``mean``, ``std`` and ``rgb``; ``output``
        may still choose uint8 crops for a model that takes float input
        (the embedder normalises them itself).
    template : "arcface", "dlib" or (5, 2) array
        Target points (default "arcface"); an array is taken in pixels of
        the output size.
    size : int, optional
        Crop side; default 112 for "arcface" and custom templates, 150 for "dlib".
    output : {"uint8", "float32_nchw"}
        ``"uint8"`` (default): ``(F, size, size, 3)`` crops.
        ``"float32_nchw"``: the model input ``(F, 3, size, size)`` float32,
        ``(x - mean) / std`` per channel, fused into the warp (identical to
        normalising the uint8 crop).
    mean, std : float or 3 floats
        Normalisation for ``"float32_nchw"`` (default 127.5, 127.5: ArcFace's).
    rgb : bool
        Channel order of the ``"float32_nchw"`` output (default True); False gives BGR.
    kernel : {"float", "fixed"}
        Bilinear arithmetic. ``"float"`` matches ``cv2.warpAffine`` of OpenCV
        4.11 and later (float32 coordinates and weights); ``"fixed"`` that of
        OpenCV 4.10 and earlier (1/32-pixel fixed point), which made the
        crops most ArcFace-family models were trained on.
    gray_to_rgb : bool
        Replicate single-channel images to 3 channels instead of raising.
    threads : int, optional
        Threads for the warp (default: OpenMP's, i.e. ``OMP_NUM_THREADS`` or
        all cores). Batches under about 16 crops run on the calling thread.
    device : str, optional
        ``"cuda"`` (or ``"cuda:N"``) warps on the GPU (:func:`fastface.gpu.align`,
        same crops); images may then be device arrays and crops come back as
        the same kind. ``None`` or ``"cpu"``: the CPU warp.
    stream : optional
        CUDA stream for ``device="cuda"``.

    Returns
    -------
    AlignResult
        ``(crops, M)``: ``crops`` a :class:`~fastface.faces.Crops` array
        stamped with how it was made (``crops.spec``), ``M`` the
        ``(F, 2, 3)`` float64 image-to-crop matrices.

    Raises
    ------
    ValueError
        Landmarks of another convention than the template's; ``for_model``
        together with template options; bad shapes.

    Examples
    --------
    >>> import numpy as np
    >>> from fastface.faces import align, template
    >>> img = np.zeros((1, 250, 250, 3), np.uint8)
    >>> lm = template("arcface")[None] * 1.5 + 20
    >>> crops, M = align(img, lm)
    >>> crops.shape, M.shape, crops.spec.template
    ((1, 112, 112, 3), (1, 2, 3), 'arcface')
    >>> x, _ = align(img, lm, output="float32_nchw")
    >>> x.shape, float(x[0, 0, 0, 0])
    ((1, 3, 112, 112), -1.0)
    """
    from .spec import AlignSpec, Crops, template_convention

    if for_model is not None:
        given = {"template": template, "size": size, "mean": mean, "std": std, "rgb": rgb}
        clash = [k for k, v in given.items() if v is not None]
        if clash:
            raise ValueError(
                f"for_model sets the template, size and normalisation; drop {', '.join(clash)} "
                "(or drop for_model)"
            )
        want = model_alignment(for_model)
        if output == "float32_nchw" and want.output == "uint8":
            raise ValueError(
                "output: this model takes uint8 crops, not float32_nchw; leave output out"
            )
        template, size, mean, std, rgb = want.template, want.size, want.mean, want.std, want.rgb
        output = want.output if output is None else output  # type: ignore[assignment]
    template = "arcface" if template is None else template
    output = "uint8" if output is None else output
    mean = 127.5 if mean is None else mean
    std = 127.5 if std is None else std
    rgb = True if rgb is None else bool(rgb)
    if output not in ("uint8", "float32_nchw"):
        raise ValueError(f"output: expected 'uint8' or 'float32_nchw', got {output!r}")
    if kernel not in ("float", "fixed"):
        raise ValueError(f"kernel: expected 'float' or 'fixed', got {kernel!r}")
    if isinstance(template, str):
        dst = _named_template(template, size)
        size = 112 if size is None and template == "arcface" else size
        size = DLIB_CHIP_SIZE if size is None else size
        name, convention = template, template_convention(template)
    else:
        dst = np.asarray(template, dtype=np.float64)
        if dst.shape != (5, 2) or not np.isfinite(dst).all():
            raise ValueError(
                f"template: expected a finite (5, 2) array in output pixels, got shape {dst.shape}"
            )
        size = 112 if size is None else size
        name, convention = "custom", None
    size = _positive_size(size)
    n_threads = 0 if threads is None else _positive_size(threads, "threads")
    if _is_detection_list(landmarks):
        if image_index is not None:
            raise ValueError(
                "image_index: implied by a list of Detections (one per image); leave it out"
            )
        landmarks, image_index = _points_from_detections(images, landmarks, convention, name)
    _check_convention_matches(landmarks, convention, name)
    if device not in (None, "cpu"):
        if gray_to_rgb:
            raise ValueError("gray_to_rgb: not supported with device=; pass 3-channel images")
        from ..gpu import align as gpu_align

        res = gpu_align(images, np.asarray(landmarks), image_index=image_index,
                        template=template, size=size, output=output, mean=mean, std=std,
                        rgb=rgb, kernel=kernel, device=device, stream=stream)  # fmt: skip
        if isinstance(res.crops, np.ndarray):  # device arrays carry no stamp
            m3, s3 = _three(mean, "mean"), _three(std, "std")
            spec = AlignSpec(name, size, convention, output, (m3[0], m3[1], m3[2]),
                             (s3[0], s3[1], s3[2]), rgb)  # fmt: skip
            return AlignResult(Crops.stamp(res.crops, spec), res.M)
        return res
    imgs, shapes = _check_images(images, gray_to_rgb)
    lm = _check_landmarks(landmarks, dst.shape[0])
    F, N = lm.shape[0], len(shapes)
    if image_index is None:
        if F != N:
            raise ValueError(
                f"landmarks: {F} faces for {N} images; pass image_index (which image each "
                "face comes from) when an image holds several faces or none"
            )
        idx = np.arange(F, dtype=np.int64)
    else:
        idx = np.asarray(image_index)
        if idx.dtype.kind not in "iu" or idx.shape != (F,):
            raise ValueError(
                f"image_index: expected {F} integers (one per face), got {idx.dtype} "
                f"{tuple(idx.shape)}"
            )
        idx = np.ascontiguousarray(idx, dtype=np.int64)
        if F and (idx.min() < 0 or idx.max() >= N):
            bad = int(np.flatnonzero((idx < 0) | (idx >= N))[0])
            raise ValueError(
                f"image_index: face {bad} points to image {int(idx[bad])}, but there are {N}"
            )
    m3 = _three(mean, "mean")
    s3 = _three(std, "std")
    if any(v == 0 for v in s3):
        raise ValueError(f"std: must be non-zero, got {s3}")
    spec = AlignSpec(
        name,
        size,
        convention,
        output,
        (m3[0], m3[1], m3[2]),
        (s3[0], s3[1], s3[2]),
        rgb,
    )
    if F == 0:
        empty = (0, size, size, 3) if output == "uint8" else (0, 3, size, size)
        dtype = np.uint8 if output == "uint8" else np.float32
        return AlignResult(Crops.stamp(np.empty(empty, dtype), spec), np.empty((0, 2, 3)))
    if isinstance(template, str) and template == "dlib":
        # dlib fits the chip-to-image transform (template -> landmarks); least
        # squares is not symmetric, so fit that direction too and invert it.
        M = _invert_affine(estimate_similarity(np.broadcast_to(dst, lm.shape), lm))
    else:
        M = np.ascontiguousarray(estimate_similarity(lm, dst))
    fixed = kernel == "fixed"
    if output == "uint8":
        crops = _C.warp_affine_u8(imgs, idx, M, size, size, fixed, n_threads)
        return AlignResult(Crops.stamp(crops, spec), M)
    channel = [0, 1, 2] if rgb else [2, 1, 0]
    crops = _C.warp_affine_f32_nchw(imgs, idx, M, size, size, m3, s3, channel, fixed, n_threads)
    return AlignResult(Crops.stamp(crops, spec), M)


def model_alignment(model: Any) -> AlignSpec:
    """The :class:`AlignSpec` of an embedder, a ModelSpec or an AlignSpec."""
    from .spec import AlignSpec, spec_of

    if isinstance(model, AlignSpec):
        return model
    return spec_of(model, "for_model").alignment


def _is_detection_list(x: Any) -> bool:
    from .spec import Detections

    return isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], Detections)


def _points_from_detections(
    images: Any, detections: Sequence[Any], convention: str | None, template: str
) -> tuple[Any, np.ndarray]:
    """Stacked points for ``template`` from detections: their own points when the
    conventions agree, dlib's 5 points found in their boxes for the dlib template."""
    from .spec import Landmarks, stack_landmarks

    lm, image_index = stack_landmarks(detections)
    if convention is None or lm.convention == convention:
        return lm, image_index
    if convention == "dlib5":
        from .landmarks import dlib_landmarks

        pts = dlib_landmarks(images, [d.boxes for d in detections])
        return Landmarks(np.concatenate(pts), "dlib5"), image_index
    _check_convention_matches(lm, convention, template)
    return lm, image_index  # not reached: the check raises


def _check_convention_matches(landmarks: Any, convention: str | None, template: str) -> None:
    from .spec import CONVENTIONS

    have = getattr(landmarks, "convention", None)
    if have is None or convention is None or have == convention:
        return
    fix = (
        "find dlib's points inside the boxes with dlib_landmarks(images, detections), or "
        "pass the detections themselves: align(images, detections, for_model=embedder)"
        if convention == "dlib5"
        else "use a detector that gives them (fastface.faces.detect), or the template made "
        "for these points"
    )
    raise ValueError(
        f"landmarks: {have} points ({CONVENTIONS[have]}) given to the {template!r} template, "
        f"which takes {convention} points ({CONVENTIONS[convention]}); the crop would be "
        f"rotated and mirrored. Fix: {fix}"
    )


def _invert_affine(A: np.ndarray) -> np.ndarray:
    """Inverses of (F, 2, 3) affine matrices."""
    L = np.linalg.inv(A[:, :, :2])
    out = np.empty_like(A)
    out[:, :, :2] = L
    out[:, :, 2] = -np.einsum("fij,fj->fi", L, A[:, :, 2])
    return np.ascontiguousarray(out)


def _three(v: float | Sequence[float], name: str) -> list[float]:
    arr = np.broadcast_to(np.asarray(v, dtype=np.float32), (3,))
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: expected finite values, got {v!r}")
    return [float(x) for x in arr]
