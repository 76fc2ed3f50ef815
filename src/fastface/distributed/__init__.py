"""fastface on a Ray cluster: shards served by actors, batch builds, embedding and dedup.

Only this package imports Ray (extra ``distributed``: ``pip install
'fastface[distributed]'``), and only when one of its names is used:
``import fastface.distributed`` alone does not. Everything here works on the
same files as the local API: an index directory on storage that every node
sees at the same path.

- :class:`RayShardedIndex`: actors each open some shards of an index
  directory and answer with their top-k; the driver assigns queries once and
  merges: the results of :meth:`ShardedIndex.search
  <fastface.ShardedIndex.search>`, bit for bit.
- :func:`build`: a Ray Data job that encodes and writes the shards of an
  index in parallel from vector files, trained once on the driver, committed
  once at the end, resumable: the files a local build writes.
- :func:`embed_images`: image files to a parquet of face embeddings (the
  format of ``fastface embed``) with actors holding the models.
- :func:`dedup`: near-duplicate groups of an index, the work split over
  actors: the groups :func:`fastface.dedup` finds.
- :func:`init`: join a cluster, or start a local one.

See docs/distributed.md for laying out a large gallery over nodes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ._ray import init
    from .build import build
    from .dedup import dedup
    from .embed import EmbedReport, embed_images
    from .search import IndexChangedError, RayShardedIndex, SearchResult, ShardUnavailableError

__all__ = [
    "EmbedReport",
    "IndexChangedError",
    "RayShardedIndex",
    "SearchResult",
    "ShardUnavailableError",
    "build",
    "dedup",
    "embed_images",
    "init",
]

_LAZY = {
    "init": "._ray",
    "build": ".build",
    "dedup": ".dedup",
    "EmbedReport": ".embed",
    "embed_images": ".embed",
    "IndexChangedError": ".search",
    "RayShardedIndex": ".search",
    "SearchResult": ".search",
    "ShardUnavailableError": ".search",
}


def __getattr__(name: str) -> Any:
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'fastface.distributed' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
