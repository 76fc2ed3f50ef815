"""Faces: detection (MTCNN, ONNX Runtime), landmarks (dlib), batched alignment and embedding.

Every embedder describes the crops it takes (``embedder.spec``, a
:class:`ModelSpec`); ``align(..., for_model=embedder)``, :class:`FacePipeline`
and :func:`analyze` make them from it, and embedders refuse crops made for
another model. :func:`compare` and :func:`verify` score embeddings, the
latter at the model's calibrated threshold.
"""

from __future__ import annotations

from .align import (
    ARCFACE_TEMPLATE,
    DLIB_TEMPLATE,
    AlignResult,
    align,
    estimate_similarity,
    pixel_hint,
    template,
)
from .analyze import Analysis, analyze, default_embedder
from .compare import compare, verify
from .detect import MTCNN, detect, mtcnn_model_paths
from .dlib_onnx import dlib_onnx_embedder, dlib_resnet_to_onnx
from .embed import (
    DLIB_THRESHOLD,
    DlibEmbedder,
    Embedder,
    FaceEmbedder,
    dlib_face_model_path,
    l2_normalize,
    resolve_providers,
)
from .landmarks import dlib_landmarks, dlib_shape_predictor_path
from .pipeline import Face, FacePipeline, ImageError, IndexReport, decode_image
from .spec import (
    CONVENTIONS,
    AlignSpec,
    Crops,
    Detections,
    Landmarks,
    ModelSpec,
    stack_landmarks,
    template_convention,
)

templates = {"arcface": ARCFACE_TEMPLATE, "dlib": DLIB_TEMPLATE}

__all__ = [
    "ARCFACE_TEMPLATE",
    "CONVENTIONS",
    "DLIB_TEMPLATE",
    "DLIB_THRESHOLD",
    "MTCNN",
    "AlignResult",
    "AlignSpec",
    "Analysis",
    "Crops",
    "Detections",
    "DlibEmbedder",
    "Embedder",
    "Face",
    "FaceEmbedder",
    "FacePipeline",
    "ImageError",
    "IndexReport",
    "Landmarks",
    "ModelSpec",
    "align",
    "analyze",
    "compare",
    "decode_image",
    "default_embedder",
    "detect",
    "dlib_face_model_path",
    "dlib_landmarks",
    "dlib_onnx_embedder",
    "dlib_resnet_to_onnx",
    "dlib_shape_predictor_path",
    "estimate_similarity",
    "l2_normalize",
    "mtcnn_model_paths",
    "pixel_hint",
    "resolve_providers",
    "stack_landmarks",
    "template",
    "template_convention",
    "templates",
    "verify",
]
