"""fastface: face search at scale, with data-subject rights built in.

``import fastface`` is light: it loads the version and names only. Each
public name imports its module on first use (the index needs FAISS, dedup
and re-ranking Numba, the face pipeline ONNX Runtime).

One process-wide default is set here: ``OMP_WAIT_POLICY=PASSIVE``, unless
the environment already sets it. FAISS ships its own OpenMP runtime and
fastface's native code (and Numba) use the system's; with the default
policy, each runtime's idle threads spin for a while after every parallel
call and steal the cores the other one needs next (a search calls both).
Sleeping idle threads cost a few microseconds per call instead. It takes
effect only if fastface is imported before FAISS or Numba start their
runtimes; set the variable yourself to choose otherwise.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import TYPE_CHECKING, Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ._version import __version__

# Libraries log, applications decide where it goes: messages of every fastface
# module go to the "fastface" logger, silent unless the application configures it
# (the fastface command does, on stderr: warnings, or more with -v).
logging.getLogger("fastface").addHandler(logging.NullHandler())

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from . import datasets, errors, eval, faces, io
    from ._dedup import DedupPlan, DedupResult, dedup, dedup_vectors
    from ._native import build_info
    from .gallery import ErasureReceipt, Gallery, SubjectExport
    from .index import (
        AutoSpec,
        Codec,
        FlatParams,
        IVFPQIndex,
        IVFPQParams,
        ShardedIndex,
        auto_spec,
        parse_spec,
    )

__all__ = [
    "AutoSpec",
    "Codec",
    "DedupPlan",
    "DedupResult",
    "ErasureReceipt",
    "FlatParams",
    "Gallery",
    "IVFPQIndex",
    "IVFPQParams",
    "ShardedIndex",
    "SubjectExport",
    "__version__",
    "auto_spec",
    "build_info",
    "datasets",
    "dedup",
    "dedup_vectors",
    "errors",
    "eval",
    "faces",
    "io",
    "parse_spec",
]

# name -> (module, attribute); attribute None: the module itself
_LAZY: dict[str, tuple[str, str | None]] = {
    "AutoSpec": (".index", "AutoSpec"),
    "Codec": (".index", "Codec"),
    "FlatParams": (".index", "FlatParams"),
    "auto_spec": (".index", "auto_spec"),
    "parse_spec": (".index", "parse_spec"),
    "IVFPQIndex": (".index", "IVFPQIndex"),
    "IVFPQParams": (".index", "IVFPQParams"),
    "ShardedIndex": (".index", "ShardedIndex"),
    "DedupPlan": ("._dedup", "DedupPlan"),
    "DedupResult": ("._dedup", "DedupResult"),
    "dedup": ("._dedup", "dedup"),
    "dedup_vectors": ("._dedup", "dedup_vectors"),
    "build_info": ("._native", "build_info"),
    "ErasureReceipt": (".gallery", "ErasureReceipt"),
    "Gallery": (".gallery", "Gallery"),
    "SubjectExport": (".gallery", "SubjectExport"),
    "datasets": (".datasets", None),
    "errors": (".errors", None),
    "eval": (".eval", None),
    "faces": (".faces", None),
    "io": (".io", None),
}


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'fastface' has no attribute {name!r}") from None
    mod = importlib.import_module(module, __name__)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
