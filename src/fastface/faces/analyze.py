"""One call from images to faces with embeddings: :func:`analyze`."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .pipeline import Face, FacePipeline, ImageError
from .spec import Crops, Landmarks, ModelSpec

__all__ = ["Analysis", "analyze", "default_embedder"]


@functools.lru_cache(maxsize=1)
def default_embedder() -> Any:
    """The embedder :func:`analyze` uses by default: dlib's ResNet in ONNX Runtime (128-d).

    Made once per process (converting dlib's file to ONNX takes about a second).
    """
    from .dlib_onnx import dlib_onnx_embedder

    return dlib_onnx_embedder(providers="auto")


@dataclass(frozen=True)
class Analysis:
    """The faces found in a list of images, and the images that gave none.

    Iterating gives the :class:`Face` items (image order, best face first
    within an image); the properties stack their fields for all faces.

    Attributes
    ----------
    faces : list of Face
        Every face: ``image`` (position in the input), ``face`` (rank in
        its image), ``box``, ``score``, ``landmarks``, ``embedding`` and,
        when asked for, ``crop``.
    errors : list of ImageError
        One per image without a face: unreadable (``"decode"``), too small,
        no face found, or a stage failed on it.
    spec : ModelSpec
        The embedding model (name, version, threshold) to store with the vectors.
    n_images : int
        Images in the input.
    """

    faces: list[Face]
    errors: list[ImageError]
    spec: ModelSpec
    n_images: int

    def __len__(self) -> int:
        return len(self.faces)

    def __iter__(self) -> Iterator[Face]:
        return iter(self.faces)

    def __getitem__(self, i: int) -> Face:
        return self.faces[i]

    @property
    def embeddings(self) -> np.ndarray:
        """``(F, d)`` float32, one row per face."""
        if not self.faces:
            return np.zeros((0, self.spec.d), np.float32)
        return np.stack([f.embedding for f in self.faces]).astype(np.float32, copy=False)

    @property
    def image(self) -> np.ndarray:
        """``(F,)`` int64: the input position of each face's image."""
        return np.asarray([f.image for f in self.faces], np.int64)

    @property
    def boxes(self) -> np.ndarray:
        """``(F, 4)`` float32 ``x1, y1, x2, y2``."""
        return np.asarray([f.box for f in self.faces], np.float32).reshape(-1, 4)

    @property
    def scores(self) -> np.ndarray:
        """``(F,)`` float32 detector confidences."""
        return np.asarray([f.score for f in self.faces], np.float32)

    @property
    def landmarks(self) -> Landmarks:
        """``(F, 5, 2)`` points the faces were aligned with (their convention stamped)."""
        pts = np.asarray([f.landmarks for f in self.faces], np.float32).reshape(-1, 5, 2)
        return Landmarks(pts, self.spec.alignment.landmarks)

    @property
    def crops(self) -> Crops | None:
        """``(F, size, size, 3)`` uint8 aligned crops, if asked for (``crops=True``)."""
        if any(f.crop is None for f in self.faces):
            return None
        a = self.spec.alignment
        if not self.faces:
            arr = np.zeros((0, a.size, a.size, 3), np.uint8)
        else:
            arr = np.stack([np.asarray(f.crop) for f in self.faces])
        from .spec import AlignSpec

        stamp = AlignSpec(a.template, a.size, a.landmarks, "uint8", a.mean, a.std, a.rgb)
        return Crops.stamp(arr, stamp)

    def per_image(self) -> list[list[Face]]:
        """The faces of each input image (empty lists for images without one)."""
        out: list[list[Face]] = [[] for _ in range(self.n_images)]
        for f in self.faces:
            out[f.image].append(f)
        return out


def analyze(
    images: Any,
    *,
    embedder: Any = None,
    detector: Any = None,
    crops: bool = False,
    max_faces: int | None = None,
    min_face_size: float = 20,
    batch_size: int = 8,
    workers: int = 2,
    detect_threads: int = 2,
    progress: bool = False,
) -> Analysis:
    """Detect, align and embed every face in ``images``: one call, batched and threaded.

    The work runs in a :class:`FacePipeline` (decoding, detection,
    alignment for the embedder and embedding overlap on threads), so the
    results are those of ``detect`` -> ``align(..., for_model=embedder)``
    -> ``embedder.embed`` done one image at a time, only faster.

    Parameters
    ----------
    images : list of paths, encoded bytes or (H, W, 3) uint8 RGB arrays
        Or one such item, or an ``(N, H, W, 3)`` uint8 batch.
    embedder : embedder, optional
        Default: dlib's ResNet in ONNX Runtime (:func:`default_embedder`,
        128-d, calibrated threshold :data:`~fastface.faces.DLIB_THRESHOLD`).
    detector : MTCNN or callable, optional
        Default: the pipelines' shared :class:`~fastface.faces.MTCNN`.
    crops : bool
        Also return each face's aligned uint8 crop (``Face.crop``, ``.crops``).
    max_faces : int, optional
        Keep the best ``max_faces`` faces of each image.
    min_face_size : float
        Smallest face side to look for, in pixels.
    batch_size, workers, detect_threads : int
        See :class:`FacePipeline`.
    progress : bool
        Show a progress bar over images.

    Returns
    -------
    Analysis
        ``.faces`` (image index, box, score, landmarks, embedding, crop),
        ``.errors`` (images without a face and why), ``.embeddings`` etc.

    Examples
    --------
    >>> from skimage import data
    >>> from fastface import faces
    >>> res = faces.analyze([data.astronaut(), data.coffee()], max_faces=1)
    >>> len(res), res[0].image, res.embeddings.shape, [e.kind for e in res.errors]
    (1, 0, (1, 128), ['no_face'])
    >>> bool(faces.verify(res[0], res[0], model=res.spec))
    True
    """
    items = _as_items(images)
    emb = default_embedder() if embedder is None else embedder
    pipe = FacePipeline(
        detector,
        emb,
        batch_size=batch_size,
        workers=workers,
        detect_threads=detect_threads,
        min_face_size=min_face_size,
        max_faces=max_faces,
        progress=progress,
        keep_crops=crops,
    )
    found: list[Face] = []
    errors: list[ImageError] = []
    for item in pipe.run(items):
        (found if isinstance(item, Face) else errors).append(item)  # type: ignore[arg-type]
    return Analysis(found, errors, pipe.spec, len(items))


def _as_items(images: Any) -> Sequence[Any]:
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)):
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim in (2, 3):
            return [images]
        if images.ndim == 4:
            return list(images)
        raise ValueError(
            f"images: expected (H, W, 3), (H, W) or (N, H, W, 3) arrays, got shape {images.shape}"
        )
    if isinstance(images, Sequence):
        return images
    try:
        return list(images)
    except TypeError:
        raise TypeError(
            f"images: expected a list of paths, bytes or arrays, got {type(images).__name__}"
        ) from None
