"""dlib's 5-point shape predictor, for the ``"dlib"`` alignment template.

The model file (``shape_predictor_5_face_landmarks.dat``) ships in the
``face_recognition_models`` package; it is located on disk with
``importlib.util.find_spec`` instead of importing that package (its
``pkg_resources`` import fails on current setuptools). dlib comes from
``dlib-bin``.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .align import _check_images
from .spec import Landmarks

__all__ = ["dlib_landmarks", "dlib_shape_predictor_path"]


def face_recognition_models_file(name: str, what: str) -> Path:
    """Path of ``models/<name>`` inside ``face_recognition_models``, found, not imported.

    That package's own import fails on current setuptools (``pkg_resources``),
    so the file is located through its import spec. ``what`` names the model
    in the errors.

    Raises
    ------
    FileNotFoundError
        When the package or the file is missing.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{what} not found: `pip install face_recognition_models dlib-bin` "
            "(or the fastface[models] extra)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / "models" / name
    if not path.is_file():
        raise FileNotFoundError(f"{what} missing: {path}; reinstall face_recognition_models")
    return path


def dlib_shape_predictor_path() -> Path:
    """Path of dlib's 5-point shape predictor inside ``face_recognition_models``.

    Raises
    ------
    FileNotFoundError
        When the package or the file is missing.
    """
    return face_recognition_models_file(
        "shape_predictor_5_face_landmarks.dat", "dlib's shape predictor"
    )


@functools.lru_cache(maxsize=1)
def _predictor() -> Any:
    import dlib

    return dlib.shape_predictor(str(dlib_shape_predictor_path()))


def dlib_landmarks(
    images: np.ndarray | Sequence[np.ndarray], boxes: Sequence[Any], *, gray_to_rgb: bool = False
) -> list[Landmarks]:
    """dlib's 5 landmarks for each face box.

    Parameters
    ----------
    images : (N, H, W, 3) uint8 array, or list of (H, W, 3) uint8 arrays
        Decoded RGB images.
    boxes : list of (n_i, 4) arrays or of Detections, one per image
        Face boxes ``x1, y1, x2, y2`` in pixels (e.g. ``detect(images)``).
    gray_to_rgb : bool
        Replicate single-channel images to 3 channels instead of raising.

    Returns
    -------
    list of (n_i, 5, 2) float32 Landmarks
        Points in dlib's order (outer and inner corner of the eye on the
        image's right, outer and inner corner of the other eye, base of the
        nose), stamped ``"dlib5"``, for ``align(..., template="dlib")``.

    Examples
    --------
    >>> from skimage import data
    >>> import numpy as np
    >>> [pts] = dlib_landmarks([data.astronaut()], [np.array([[180.0, 60, 268, 175]])])
    >>> pts.shape, pts.convention
    ((1, 5, 2), 'dlib5')
    """
    imgs, shapes = _check_images(images, gray_to_rgb)
    if len(boxes) != len(shapes):
        raise ValueError(f"boxes: expected one entry per image ({len(shapes)}), got {len(boxes)}")
    import dlib

    predictor = _predictor()
    out = []
    for i, b in enumerate(boxes):
        arr = np.asarray(getattr(b, "boxes", b), dtype=np.float64)
        if arr.size == 0:
            out.append(Landmarks(np.zeros((0, 5, 2)), "dlib5"))
            continue
        if arr.ndim != 2 or arr.shape[1] != 4 or not np.isfinite(arr).all():
            raise ValueError(
                f"boxes[{i}]: expected finite (n, 4) x1, y1, x2, y2, got shape {arr.shape}"
            )
        img = imgs[i]
        pts = np.empty((len(arr), 5, 2), np.float32)
        for j, (x1, y1, x2, y2) in enumerate(arr):
            rect = dlib.rectangle(round(x1), round(y1), round(x2), round(y2))
            shape = predictor(img, rect)
            pts[j] = [(shape.part(k).x, shape.part(k).y) for k in range(5)]
        out.append(Landmarks(pts, "dlib5"))
    return out
