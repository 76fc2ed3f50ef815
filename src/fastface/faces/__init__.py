"""Faces: detection (MTCNN, ONNX Runtime), landmarks (dlib) and batched alignment."""

from __future__ import annotations

from .align import (
    ARCFACE_TEMPLATE,
    DLIB_TEMPLATE,
    AlignResult,
    align,
    estimate_similarity,
    template,
)

templates = {"arcface": ARCFACE_TEMPLATE, "dlib": DLIB_TEMPLATE}

__all__ = [
    "ARCFACE_TEMPLATE",
    "DLIB_TEMPLATE",
    "AlignResult",
    "align",
    "estimate_similarity",
    "template",
    "templates",
]
