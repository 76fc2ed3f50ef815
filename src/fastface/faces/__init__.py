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
from .detect import MTCNN, Detections, detect, mtcnn_model_paths, stack_landmarks
from .dlib_onnx import dlib_onnx_embedder, dlib_resnet_to_onnx
from .embed import (
    DlibEmbedder,
    Embedder,
    FaceEmbedder,
    dlib_face_model_path,
    l2_normalize,
    resolve_providers,
)
from .landmarks import dlib_landmarks, dlib_shape_predictor_path
from .pipeline import Face, FacePipeline, ImageError, IndexReport, decode_image

templates = {"arcface": ARCFACE_TEMPLATE, "dlib": DLIB_TEMPLATE}

__all__ = [
    "ARCFACE_TEMPLATE",
    "DLIB_TEMPLATE",
    "MTCNN",
    "AlignResult",
    "Detections",
    "DlibEmbedder",
    "Embedder",
    "Face",
    "FaceEmbedder",
    "FacePipeline",
    "ImageError",
    "IndexReport",
    "align",
    "decode_image",
    "detect",
    "dlib_face_model_path",
    "dlib_landmarks",
    "dlib_onnx_embedder",
    "dlib_resnet_to_onnx",
    "dlib_shape_predictor_path",
    "estimate_similarity",
    "l2_normalize",
    "mtcnn_model_paths",
    "resolve_providers",
    "stack_landmarks",
    "template",
    "templates",
]
