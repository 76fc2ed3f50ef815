"""IVF-PQ shards and sharded indexes.

Layers, bottom up: :mod:`~fastface.index.params` (parameters, index specs
and the trained codec), :mod:`~fastface.index.train` (training stages),
:mod:`~fastface.index.auto` (choosing a spec),
:mod:`~fastface.index.faiss_format` (the file format, checked before
FAISS reads a byte), :mod:`~fastface.index.lists` (inverted lists in place,
the native scan), :mod:`~fastface.index.storage` (atomic owner-only writes,
verified reads, sealed manifests), :mod:`~fastface.index.ivfpq` (one shard:
the shard contract) and :mod:`~fastface.index.sharded` (a directory of
shards).
"""

from .auto import AutoSpec, auto_spec
from .ivfpq import IdSet, IVFPQIndex
from .lists import ListRun
from .params import Codec, FlatParams, IVFPQParams, SpecError, parse_spec
from .sharded import ShardedIndex

__all__ = [
    "AutoSpec",
    "Codec",
    "FlatParams",
    "IVFPQIndex",
    "IVFPQParams",
    "IdSet",
    "ListRun",
    "ShardedIndex",
    "SpecError",
    "auto_spec",
    "parse_spec",
]
