"""What a face model expects and what an array holds: alignment specs, typed points and crops.

An embedder is trained on crops made one way: a template (where the eyes,
nose and mouth land), a crop size, a colour order and a normalisation. Feed
it crops made another way and it still returns a unit vector, just a wrong
one. So here every embedder describes its input (:class:`ModelSpec`, with
an :class:`AlignSpec`), :func:`~fastface.faces.align` stamps the crops it
makes with the spec that made them (:class:`Crops`), and detectors stamp
their points with the landmark convention they follow (:class:`Landmarks`).
``align(..., for_model=embedder)`` reads the spec; an embedder refuses crops
stamped with another.

Two 5-point conventions exist and look alike (``(F, 5, 2)`` floats):

``"mtcnn5"``
    Eye centres (left, then right, as seen in the image), nose tip, mouth
    corners (left, right): MTCNN, RetinaFace and InsightFace. The ArcFace
    template takes these.
``"dlib5"``
    dlib's 5-point shape predictor: outer and inner corner of the eye on the
    image's right, outer and inner corner of the other eye, base of the nose.
    dlib's chip template takes these.

Plain NumPy arrays carry no stamp and are trusted as given; operations that
compute new values (arithmetic, ``np.concatenate``) return plain arrays,
while slices and copies keep the stamp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "CONVENTIONS",
    "AlignSpec",
    "Crops",
    "Landmarks",
    "ModelSpec",
    "template_convention",
]

#: The 5-point landmark conventions, by name.
CONVENTIONS = {
    "mtcnn5": "eye centres (left, right as seen), nose tip, mouth corners (left, right): "
    "MTCNN / RetinaFace / InsightFace",
    "dlib5": "dlib's 5 points: outer and inner corner of the eye on the image's right, outer "
    "and inner corner of the other eye, base of the nose",
}

_TEMPLATE_CONVENTION = {"arcface": "mtcnn5", "dlib": "dlib5"}


def template_convention(template: str) -> str | None:
    """The landmark convention a named template takes (None for a custom template).

    Examples
    --------
    >>> template_convention("arcface"), template_convention("dlib")
    ('mtcnn5', 'dlib5')
    """
    return _TEMPLATE_CONVENTION.get(template)


def _check_convention(convention: str | None) -> str | None:
    if convention is not None and convention not in CONVENTIONS:
        raise ValueError(
            f"convention: expected one of {sorted(CONVENTIONS)} or None, got {convention!r}"
        )
    return convention


class _Stamped(np.ndarray):
    """An ndarray carrying one extra attribute through views, slices and copies.

    Ufunc results (arithmetic, reductions) are plain arrays: new values are
    no longer what the stamp describes.
    """

    _stamp_name = ""

    def __array_finalize__(self, obj: Any) -> None:
        setattr(self, self._stamp_name, self._inherit(obj))

    def _inherit(self, obj: Any) -> Any:
        return getattr(obj, self._stamp_name, None)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        inputs = tuple(np.asarray(x) if isinstance(x, _Stamped) else x for x in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(
                np.asarray(x) if isinstance(x, _Stamped) else x for x in kwargs["out"]
            )
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __reduce__(self) -> Any:
        fn, args, state = super().__reduce__()  # type: ignore[str-unpack]
        return fn, args, (state, getattr(self, self._stamp_name, None))

    def __setstate__(self, state: Any) -> None:
        base, stamp = state
        super().__setstate__(base)
        setattr(self, self._stamp_name, stamp)


class Landmarks(_Stamped):
    """``(..., 5, 2)`` float32 points that know their convention (``"mtcnn5"`` or ``"dlib5"``).

    What :func:`~fastface.faces.detect` and
    :func:`~fastface.faces.dlib_landmarks` return, so that
    :func:`~fastface.faces.align` can refuse points meant for another
    template. ``np.asarray(points)`` drops the stamp.

    Examples
    --------
    >>> pts = Landmarks(np.zeros((2, 5, 2)), "dlib5")
    >>> pts.convention, pts[:1].convention, type(pts + 1).__name__
    ('dlib5', 'dlib5', 'ndarray')
    """

    _stamp_name = "convention"
    convention: str | None

    def __new__(cls, points: Any, convention: str | None) -> Landmarks:
        obj = np.array(points, dtype=np.float32, copy=True).view(cls)
        obj.convention = _check_convention(convention)
        return obj

    def __repr__(self) -> str:
        return f"{np.asarray(self)!r} ({self.convention} landmarks)"


@dataclass(frozen=True)
class AlignSpec:
    """How crops are made: what a model expects, and what a batch of crops records.

    Attributes
    ----------
    template : str
        ``"arcface"``, ``"dlib"`` or ``"custom"`` (a ``(5, 2)`` array).
    size : int
        Crop side in pixels.
    landmarks : str or None
        The point convention the template takes (``"mtcnn5"``, ``"dlib5"``;
        None for a custom template).
    output : {"uint8", "float32_nchw"}
        ``(F, size, size, 3)`` uint8 RGB, or the fused model input
        ``(F, 3, size, size)`` float32, ``(pixel - mean) / std``.
    mean, std : 3 floats
        Per-channel normalisation of the model input (in ``rgb`` order).
    rgb : bool
        Channel order of the model input (False: BGR).
    """

    template: str
    size: int
    landmarks: str | None
    output: str = "uint8"
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)
    rgb: bool = True

    def __post_init__(self) -> None:
        if self.output not in ("uint8", "float32_nchw"):
            raise ValueError(f"output: expected 'uint8' or 'float32_nchw', got {self.output!r}")
        _check_convention(self.landmarks)

    def align_options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`~fastface.faces.align` that make these crops."""
        opts: dict[str, Any] = {"template": self.template, "size": self.size}
        opts["output"] = self.output
        if self.output == "float32_nchw":
            opts.update(mean=self.mean, std=self.std, rgb=self.rgb)
        return opts

    def describe(self) -> str:
        text = f"template {self.template!r} at {self.size} x {self.size}"
        if self.output == "float32_nchw":
            order = "RGB" if self.rgb else "BGR"
            text += f", {order} (x - {_fmt(self.mean)}) / {_fmt(self.std)}"
        return text

    def mismatch(self, crops: AlignSpec) -> str | None:
        """Why crops made by ``crops`` are wrong input for a model expecting ``self``, or None."""
        if crops.template != self.template or crops.size != self.size:
            return "template or size differ"
        if crops.output == "float32_nchw" and (
            not _close(crops.mean, self.mean)
            or not _close(crops.std, self.std)
            or crops.rgb != self.rgb
        ):
            return "normalisation or channel order differ"
        return None


def _close(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6) for x, y in zip(a, b, strict=True))


def _fmt(v: tuple[float, float, float]) -> str:
    return f"{v[0]:g}" if v[0] == v[1] == v[2] else "(" + ", ".join(f"{x:g}" for x in v) + ")"


class Crops(_Stamped):
    """Aligned crops that remember how they were made (:class:`AlignSpec`, ``.spec``).

    What :func:`~fastface.faces.align` returns; embedders compare ``.spec``
    with their own and refuse a mismatch. Slices along the first axis and
    copies keep the spec; a change of dtype or of the per-crop shape, or any
    arithmetic, gives an array without it. ``np.asarray(crops)`` drops it
    on purpose.
    """

    _stamp_name = "spec"
    spec: AlignSpec | None

    def _inherit(self, obj: Any) -> Any:
        spec = getattr(obj, "spec", None)
        if spec is None or obj.dtype != self.dtype or obj.shape[1:] != self.shape[1:]:
            return None
        return spec

    @classmethod
    def stamp(cls, crops: np.ndarray, spec: AlignSpec) -> Crops:
        obj = crops.view(cls)
        obj.spec = spec
        return obj


@dataclass(frozen=True)
class ModelSpec:
    """What a face model is and what it expects; stored with the vectors it makes.

    Attributes
    ----------
    name, version : str
        Model id and version (a digest of the weights).
    d : int
        Embedding dimension.
    alignment : AlignSpec
        The crops it takes.
    threshold : float or None
        Cosine similarity (inner product of unit embeddings) at or above
        which two faces are the same person, for :func:`~fastface.faces.verify`;
        None when nobody has calibrated the model.
    threshold_source : str
        How the threshold was obtained.
    normalized : bool
        Whether the embedder returns unit rows.
    """

    name: str
    version: str
    d: int
    alignment: AlignSpec
    threshold: float | None = None
    threshold_source: str = field(default="", compare=False)
    normalized: bool = True

    def __post_init__(self) -> None:
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ValueError(
                f"threshold: expected a cosine similarity in [-1, 1], got {self.threshold!r}"
            )

    def record(self) -> dict[str, Any]:
        """This description as JSON-ready metadata (stored with embeddings by ``fastface embed``
        and ``fastface.distributed.embed_images`` as ``fastface.model``)."""
        a = self.alignment
        return {
            "name": self.name,
            "version": self.version,
            "d": self.d,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "normalized": self.normalized,
            "alignment": {
                "template": a.template,
                "size": a.size,
                "landmarks": a.landmarks,
                "mean": list(a.mean),
                "std": list(a.std),
                "rgb": a.rgb,
            },
        }


@dataclass(frozen=True)
class Detections:
    """Faces found in one image.

    Attributes
    ----------
    boxes : (n, 4) float32
        ``x1, y1, x2, y2`` in image pixels.
    scores : (n,) float32
        Detector confidence, best first.
    landmarks : (n, 5, 2) Landmarks
        ``(x, y)`` per point, stamped with ``convention``.
    convention : str
        The landmarks' convention (``"mtcnn5"`` for MTCNN: left eye, right
        eye, nose, left and right mouth corner as seen in the image).
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray
    convention: str = "mtcnn5"

    def __post_init__(self) -> None:
        _check_convention(self.convention)
        have = getattr(self.landmarks, "convention", None)
        if have is not None and have != self.convention:
            raise ValueError(
                f"landmarks: stamped {have!r}, but the detections say {self.convention!r}"
            )
        object.__setattr__(self, "landmarks", Landmarks(self.landmarks, self.convention))

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def head(self, k: int) -> Detections:
        """The ``k`` best faces."""
        return Detections(self.boxes[:k], self.scores[:k], self.landmarks[:k], self.convention)

    @staticmethod
    def empty(convention: str = "mtcnn5") -> Detections:
        """No face."""
        return Detections(
            np.zeros((0, 4), np.float32),
            np.zeros(0, np.float32),
            np.zeros((0, 5, 2), np.float32),
            convention,
        )


def stack_landmarks(detections: Any) -> tuple[Landmarks, np.ndarray]:
    """All faces' landmarks as one ``(F, 5, 2)`` array and the image each comes from.

    The two arguments :func:`fastface.faces.align` takes after ``images``
    (which also takes the list of detections itself). The points keep their
    convention; detections of different conventions cannot be stacked.

    Examples
    --------
    >>> one = Detections(np.zeros((2, 4)), np.ones(2), np.zeros((2, 5, 2)))
    >>> lm, image_index = stack_landmarks([Detections.empty(), one])
    >>> lm.shape, lm.convention, image_index.tolist()
    ((2, 5, 2), 'mtcnn5', [1, 1])
    """
    detections = list(detections)
    for i, d in enumerate(detections):
        if not isinstance(d, Detections):
            raise TypeError(f"detections[{i}]: expected Detections, got {type(d).__name__}")
    conventions = {d.convention for d in detections}
    if len(conventions) > 1:
        raise ValueError(
            f"detections: mixed landmark conventions {sorted(conventions)}; points of one "
            "convention only can be aligned with one template"
        )
    convention = conventions.pop() if conventions else None
    if not detections:
        return Landmarks(np.zeros((0, 5, 2)), convention), np.zeros(0, np.int64)
    lm = np.concatenate([np.asarray(d.landmarks, np.float32) for d in detections])
    index = np.repeat(np.arange(len(detections)), [len(d) for d in detections])
    return Landmarks(lm, convention), index.astype(np.int64)


def spec_of(model: Any, name: str = "model") -> ModelSpec:
    """The :class:`ModelSpec` of an embedder (``.spec``), or ``model`` itself if it is one.

    An embedder of the older protocol (``d``, ``name``, ``version`` and
    ``align_options()``, no ``spec``) gets one built from those, without a
    threshold.
    """
    if isinstance(model, ModelSpec):
        return model
    spec = getattr(model, "spec", None)
    if isinstance(spec, ModelSpec):
        return spec
    opts = getattr(model, "align_options", None)
    if callable(opts) and hasattr(model, "d"):
        o = dict(opts())
        template = str(o.get("template", "arcface"))
        size = int(o.get("size") or (150 if template == "dlib" else 112))

        def three(v: Any) -> tuple[float, float, float]:
            a = np.broadcast_to(np.asarray(v, np.float64), (3,))
            return (float(a[0]), float(a[1]), float(a[2]))

        return ModelSpec(
            str(getattr(model, "name", type(model).__name__)),
            str(getattr(model, "version", "")),
            int(model.d),
            AlignSpec(
                template,
                size,
                template_convention(template),
                str(o.get("output", "uint8")),
                three(o.get("mean", 127.5)),
                three(o.get("std", 127.5)),
                bool(o.get("rgb", True)),
            ),
        )
    raise TypeError(
        f"{name}: expected an embedder (with .spec) or a ModelSpec, got {type(model).__name__}"
    )
