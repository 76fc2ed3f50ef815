"""IVF-PQ shards and sharded indexes."""

from .ivfpq import IVFPQIndex, IVFPQParams
from .sharded import ShardedIndex

__all__ = ["IVFPQIndex", "IVFPQParams", "ShardedIndex"]
