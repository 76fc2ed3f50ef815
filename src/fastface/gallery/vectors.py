"""Where the gallery's vectors live: the index, flat (exact) while small, IVF-PQ once it grows.

The vectors are stored once, in a :class:`~fastface.ShardedIndex` directory
(``index-<n>/``), with their raw values (float16 by default, float32 for
bit-exact exports); the database holds only records. This module is the one
place that knows which kind of index a gallery has:

``flat``
    Below :data:`DEFAULT_FLAT_LIMIT` vectors IVF-PQ is pointless (it needs
    thousands of training vectors and only approximates), so a new gallery
    searches exactly: every stored vector is scored (:mod:`fastface.kernels.exact`,
    BLAS blocks) and the best ``k`` kept under the library's tie rule. No
    training. The vectors sit in a sharded index with the index layer's flat
    codec (:class:`~fastface.index.FlatParams`: ids and stored vectors, no
    codes), so shards, tombstones, compaction, crash safety and file checks
    are the index's own.
``ivfpq``
    IVF-PQ candidates (``nprobe`` lists) re-scored exactly from the stored
    vectors (``rerank``), or PQ estimates when the caller asks for them.

A gallery moves from flat to IVF-PQ (:meth:`VectorStore.reencode`) by
training a codec (on a sample the operator gives, or on its own stored
vectors) and re-adding the stored vectors, ids unchanged, into a new index
directory; the switch is one atomic write of the gallery's configuration.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .._native import merge_topk
from ..errors import CorruptIndexError, EmptyIndexError
from ..index import FlatParams, IVFPQParams, ShardedIndex
from ..index.ivfpq import MAX_CANDIDATES
from ..kernels.exact import scores as exact_scores
from ..kernels.exact import topk

__all__ = ["DEFAULT_FLAT_LIMIT", "FLAT", "IVFPQ", "VectorStore", "default_params", "flat_params"]

FLAT = "flat"
IVFPQ = "ivfpq"
#: A flat gallery moves to IVF-PQ when it grows past this many vectors.
DEFAULT_FLAT_LIMIT = 50_000
#: Exact candidates per query when re-ranking IVF-PQ results: at least this many, and 10 per result.
MIN_CANDIDATES = 100
_BLOCK = 32_768  # vectors scored per BLAS block


def flat_params(d: int, store_vectors: Literal["float16", "float32"]) -> FlatParams:
    """The index layer's flat (exact, untrained) codec parameters for a gallery's vectors."""
    return FlatParams(d, metric="ip", store_vectors=store_vectors)


def is_flat(index: ShardedIndex) -> bool:
    """Whether ``index`` is flat (ids and stored vectors, no codes)."""
    return isinstance(index.params, FlatParams)


def default_params(n: int, d: int, store_vectors: str | None) -> IVFPQParams:
    """IVF-PQ parameters for ``n`` vectors: about ``4 sqrt(n)`` lists (a power of two with at
    least 39 training vectors each), 8 dimensions per 8-bit sub-quantizer."""
    nlist = 1
    while nlist * 2 <= min(4 * math.sqrt(max(n, 1)), n / 39):
        nlist *= 2
    m = max(1, d // 8)
    while d % m:
        m -= 1
    return IVFPQParams(d, nlist, m, nbits=8, metric="ip", store_vectors=store_vectors)  # type: ignore[arg-type]


def _block_topk(
    S: npt.NDArray[np.float32], ids: npt.NDArray[np.int64], k: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Best ``k`` of each row of ``S`` (larger is better, equal scores by lower id), padded."""
    n = S.shape[1]
    if n <= k + 1:
        return topk(S, ids, k, larger_is_better=True)
    part = np.argpartition(-S, k, axis=1)[:, : k + 1]  # the k+1 best, unordered
    Sp = np.take_along_axis(S, part, 1)
    D, I = topk(Sp, ids[part], k, larger_is_better=True)
    # exact unless a score equal to the k-th best was left outside the k+1 kept
    outside = np.sort(Sp, axis=1)[:, 0]  # the (k+1)-th best score of each row
    tie = outside >= D[:, -1]
    for r in np.flatnonzero(tie):
        D[r], I[r] = topk(S[r : r + 1], ids, k, larger_is_better=True)
    return D, I


class VectorStore:
    """The gallery's index directory and what the gallery asks of it."""

    def __init__(self, index: ShardedIndex, kind: str, dirname: str) -> None:
        self.index = index
        self.kind = kind
        self.dirname = dirname

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def create_flat(
        cls,
        root: Path,
        dirname: str,
        *,
        d: int,
        store_vectors: Literal["float16", "float32"],
        shard_size: int,
    ) -> VectorStore:
        index = ShardedIndex.create(
            root / dirname, flat_params(d, store_vectors), shard_size=shard_size
        )
        return cls(index, FLAT, dirname)

    @classmethod
    def open(cls, root: Path, dirname: str, kind: str, *, writable: bool) -> VectorStore:
        """The writer loads the index; a reader maps it (fast to reload when the writer
        commits; files the writer deletes stay readable through the mapping)."""
        if writable:
            index = ShardedIndex.open(root / dirname, mode="a")
        else:
            index = ShardedIndex.open(root / dirname, mode="r", mmap=True)
        try:
            flat = is_flat(index)
            if (kind == FLAT) != flat:
                raise CorruptIndexError(
                    f"{root / dirname}: the gallery records a {kind} index, the directory holds "
                    f"{'a flat' if flat else 'an IVF-PQ'} one",
                    str(root / dirname),
                    "codec",
                )
        except BaseException:
            index.close()
            raise
        return cls(index, kind, dirname)

    def reencode(
        self,
        root: Path,
        dirname: str,
        params: IVFPQParams,
        sample: npt.NDArray[np.float32] | None,
        *,
        max_points: int | None = None,
        seed: int = 0,
    ) -> VectorStore:
        """A new IVF-PQ index directory holding this store's vectors (same ids), committed.

        The codec is trained on ``sample`` or, without one, on up to
        ``max_points`` (default ``max(256 * nlist, 65536)``) of the stored
        vectors. The new directory is removed again if anything fails.
        """
        path = root / dirname
        if path.exists():
            shutil.rmtree(path)  # left by an interrupted conversion; never referenced
        new = ShardedIndex.create(path, params, shard_size=self.index.shard_size)
        try:
            if sample is None:
                limit = max_points or max(256 * params.nlist, 65536)
                sample = self.sample(limit, seed)
            new.train(sample, max_points=max_points, seed=seed)
            for ids, x in self.blocks():
                new.add(x, ids, commit=False)
            new.flush()
        except BaseException:
            new.close()
            shutil.rmtree(path, ignore_errors=True)
            raise
        return VectorStore(new, IVFPQ, dirname)

    def sample(self, n: int, seed: int) -> npt.NDArray[np.float32]:
        """Up to ``n`` stored vectors drawn at random (float32)."""
        live = self.index.live_ids()
        if live.size > n:
            live = np.sort(np.random.default_rng(seed).choice(live, n, replace=False))
        if live.size == 0:
            return np.empty((0, self.index.d), np.float32)
        return self.index.get_vectors(live)

    # --- state --------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @property
    def generation(self) -> int:
        return self.index.generation

    @property
    def store_vectors(self) -> str | None:
        return self.index.params.store_vectors

    def live_ids(self) -> npt.NDArray[np.int64]:
        return self.index.live_ids()

    def contains(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        return self.index.contains(ids)

    def stored(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        return self.index.stored(ids)

    def shards_holding(self, ids: npt.NDArray[np.int64]) -> int:
        return sum(1 for shard in self.index.shards() if shard.contains(ids).any())

    def get_vectors(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        return self.index.get_vectors(ids)

    # --- writing ------------------------------------------------------------------------------
    def add(self, x: npt.NDArray[np.float32], ids: npt.NDArray[np.int64]) -> None:
        """Add and commit (nothing changes if this raises)."""
        self.index.add(x, ids)

    def hide(self, ids: npt.NDArray[np.int64]) -> int:
        """Make ``ids`` unsearchable in this process at once (committed by :meth:`purge`)."""
        return self.index.remove(ids, commit=False)

    def purge(self) -> int:
        """Rewrite every shard that holds removed vectors without them, delete the old files;
        returns how many sealed shards were rewritten."""
        stats = self.index.compact()  # commits whatever is pending, the open shard included
        return int(stats["shards_rewritten"])

    # --- search -------------------------------------------------------------------------------
    def blocks(
        self, block: int = _BLOCK
    ) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
        """Every searchable vector as ``(ids, vectors)`` blocks (float32, row order per shard)."""
        for shard, rows in self.index.live_rows():
            vec = shard.vectors
            ids = shard.ids
            assert vec is not None
            contiguous = rows.size == shard.ntotal
            for lo in range(0, rows.size, block):
                if contiguous:
                    hi = min(lo + block, rows.size)
                    yield np.asarray(ids[lo:hi]), np.asarray(vec[lo:hi], np.float32)
                else:
                    r = rows[lo : lo + block]
                    yield np.asarray(ids[r]), np.asarray(vec[r], np.float32)

    def exact_search(
        self, q: npt.NDArray[np.float32], k: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Exact top-``k`` over every stored vector (cosine; equal scores by lower id)."""
        parts_D, parts_I = [], []
        for ids, x in self.blocks():
            D, I = _block_topk(exact_scores(q, x), ids, k)
            parts_D.append(D)
            parts_I.append(I)
        if not parts_D:
            return (
                np.full((q.shape[0], k), -np.inf, np.float32),
                np.full((q.shape[0], k), -1, np.int64),
            )
        if len(parts_D) == 1:
            return parts_D[0], parts_I[0]
        return merge_topk(np.stack(parts_D), np.stack(parts_I), k, larger_is_better=True)

    def search(
        self,
        q: npt.NDArray[np.float32],
        k: int,
        *,
        exact: bool = True,
        nprobe: int | None = None,
        rerank: int | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Top-``k``: exact cosine scores by default; PQ estimates with ``exact=False``.

        A flat store always scores exactly (it has no PQ estimates).
        IVF-PQ: ``nprobe`` lists per query; with ``exact``, the best
        ``k * rerank`` PQ candidates (default at least :data:`MIN_CANDIDATES`
        and ``10 * k``) are re-scored from the stored vectors.
        """
        if self.kind == FLAT:
            if nprobe is not None or rerank is not None:
                raise ValueError(
                    "nprobe/rerank: this gallery is flat (exact search over every vector); they "
                    "apply once it uses IVF-PQ"
                )
            return self.exact_search(q, k)
        if not exact:
            if rerank is not None:
                raise ValueError("rerank: PQ scores (exact=False) are not re-ranked; drop rerank")
            factor = None
        elif rerank is None:
            factor = max(10, -(-MIN_CANDIDATES // k))
            factor = max(1, min(factor, MAX_CANDIDATES // k))
        else:
            factor = rerank
        try:
            return self.index.search(q, k, nprobe=nprobe, rerank=factor)
        except EmptyIndexError:
            return (
                np.full((q.shape[0], k), -np.inf, np.float32),
                np.full((q.shape[0], k), -1, np.int64),
            )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.index.close()


def config_params(obj: Any) -> IVFPQParams | None:
    """IVF-PQ parameters recorded in a gallery's configuration (``None`` if none)."""
    if obj is None:
        return None
    return IVFPQParams.from_dict(obj)
