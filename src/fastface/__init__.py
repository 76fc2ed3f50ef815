"""fastface: face search at scale, with data-subject rights built in."""

from __future__ import annotations

__version__ = "0.1.0"

from . import datasets, errors, eval, faces
from ._dedup import DedupResult, dedup, dedup_vectors
from ._native import build_info
from .gallery import ErasureReceipt, Gallery, SubjectExport
from .index import IVFPQIndex, IVFPQParams, ShardedIndex

__all__ = [
    "DedupResult",
    "ErasureReceipt",
    "Gallery",
    "IVFPQIndex",
    "IVFPQParams",
    "ShardedIndex",
    "SubjectExport",
    "__version__",
    "build_info",
    "datasets",
    "dedup",
    "dedup_vectors",
    "errors",
    "eval",
    "faces",
]
