"""Comparing faces: cosine similarity, and same-person decisions at a model's threshold."""

from __future__ import annotations

from typing import Any

import numpy as np

from .spec import ModelSpec, spec_of

__all__ = ["compare", "verify"]


def _vectors(x: Any, name: str) -> tuple[np.ndarray, bool]:
    """``x`` as float64 unit rows ``(n, d)``, and whether it was one vector."""
    emb = getattr(x, "embedding", None)
    if emb is not None:
        x = emb
    elif isinstance(x, (list, tuple)) and x and hasattr(x[0], "embedding"):
        x = np.stack([f.embedding for f in x])
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected embeddings (float array or Face), got {arr.dtype}")
    one = arr.ndim == 1
    if arr.ndim not in (1, 2) or arr.shape[-1] == 0:
        raise ValueError(f"{name}: expected a (d,) or (n, d) embedding array, got {arr.shape}")
    rows = np.atleast_2d(arr).astype(np.float64)
    if not np.isfinite(rows).all():
        raise ValueError(f"{name}: contains NaN or inf")
    norm = np.linalg.norm(rows, axis=1)
    if (norm == 0).any():
        bad = int(np.flatnonzero(norm == 0)[0])
        raise ValueError(f"{name}: row {bad} is all zeros; a zero vector has no direction")
    return rows / norm[:, None], one


def compare(a: Any, b: Any) -> Any:
    """Cosine similarity of face embeddings (1: same direction; unrelated faces lie lower).

    Rows are scaled to unit norm first, so dlib's raw descriptors
    (``normalize=False``) compare like unit ones.

    Parameters
    ----------
    a, b : (d,) or (n, d) arrays, Face, or lists of Face
        Embeddings of one model.

    Returns
    -------
    float or ndarray
        A float for two vectors; ``(n,)`` for rows against a vector (either
        way round); ``(n, m)`` for rows against rows.

    Examples
    --------
    >>> import numpy as np
    >>> compare(np.array([1.0, 0.0]), np.array([[3.0, 0.0], [1.0, 1.0]])).round(3).tolist()
    [1.0, 0.707]
    """
    x, x_one = _vectors(a, "a")
    y, y_one = _vectors(b, "b")
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"a and b: embeddings of different sizes ({x.shape[1]} and {y.shape[1]}); "
            "compare vectors of one model"
        )
    s = np.clip(x @ y.T, -1.0, 1.0)
    if x_one and y_one:
        return float(s[0, 0])
    if x_one:
        return s[0]
    if y_one:
        return s[:, 0]
    return s


def verify(
    a: Any, b: Any, *, model: Any = None, threshold: float | None = None
) -> bool | np.ndarray:
    """Same person? ``compare(a, b) >= threshold``, the threshold being the model's.

    Parameters
    ----------
    a, b : (d,) or (n, d) arrays, Face, or lists of Face
        Embeddings made by ``model``.
    model : embedder or ModelSpec
        The model that made them; its ``spec.threshold`` (calibrated, see
        :data:`~fastface.faces.DLIB_THRESHOLD`) decides.
    threshold : float, optional
        A cosine similarity to use instead (e.g. a stricter one for access
        control); needed when the model has no calibrated threshold.

    Returns
    -------
    bool or bool ndarray
        Shaped as :func:`compare`'s result.

    Examples
    --------
    >>> import numpy as np
    >>> verify(np.array([1.0, 0.0]), np.array([0.9, 0.1]), threshold=0.95)
    True
    """
    spec: ModelSpec | None = None if model is None else spec_of(model)
    if threshold is None:
        if spec is None:
            raise ValueError(
                "verify needs model= (an embedder or its spec, whose calibrated threshold "
                "decides) or threshold= (a cosine similarity)"
            )
        if spec.threshold is None:
            raise ValueError(
                f"model {spec.name!r} has no calibrated threshold; pass threshold= (a cosine "
                "similarity measured on your data)"
            )
        threshold = spec.threshold
    if not (np.isfinite(threshold) and -1.0 <= threshold <= 1.0):
        raise ValueError(f"threshold: expected a cosine similarity in [-1, 1], got {threshold!r}")
    s = compare(a, b)
    d = _vectors(a, "a")[0].shape[1]
    if spec is not None and d != spec.d:
        raise ValueError(
            f"a and b: {d}-d embeddings, but model {spec.name!r} makes {spec.d}-d ones"
        )
    if isinstance(s, float):
        return bool(s >= threshold)
    return np.asarray(s >= threshold)
