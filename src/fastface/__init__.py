"""fastface: face search at scale, with data-subject rights built in."""

from __future__ import annotations

__version__ = "0.1.0"

from . import datasets, errors, eval, faces
from ._native import build_info
from .index import IVFPQIndex, IVFPQParams, ShardedIndex

__all__ = [
    "IVFPQIndex",
    "IVFPQParams",
    "ShardedIndex",
    "__version__",
    "build_info",
    "datasets",
    "errors",
    "eval",
    "faces",
]
