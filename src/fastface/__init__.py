"""fastface: face search at scale, with data-subject rights built in."""

from __future__ import annotations

__version__ = "0.1.0"

from . import datasets, errors, eval
from ._native import build_info
from ._dedup import DedupResult, dedup, dedup_vectors
from .index import IVFPQIndex, IVFPQParams, ShardedIndex

__all__ = [
    "DedupResult",
    "IVFPQIndex",
    "IVFPQParams",
    "ShardedIndex",
    "__version__",
    "build_info",
    "datasets",
    "dedup",
    "dedup_vectors",
    "errors",
    "eval",
]
