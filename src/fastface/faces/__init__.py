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
from .detect import MTCNN, Detections, detect, mtcnn_model_paths
from .landmarks import dlib_landmarks, dlib_shape_predictor_path

templates = {"arcface": ARCFACE_TEMPLATE, "dlib": DLIB_TEMPLATE}

__all__ = [
    "ARCFACE_TEMPLATE",
    "DLIB_TEMPLATE",
    "MTCNN",
    "AlignResult",
    "Detections",
    "align",
    "detect",
    "dlib_landmarks",
    "dlib_shape_predictor_path",
    "estimate_similarity",
    "mtcnn_model_paths",
    "template",
    "templates",
]
