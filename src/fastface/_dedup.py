"""Near-duplicate detection: transitive groups of vectors closer than a cosine threshold.

How pairs are found
-------------------
Every vector is assigned to its nearest inverted list (the IVF coarse
quantizer) and *probes* its ``nprobe`` nearest lists, as an IVF search would.
For each list, the cosine of every (probing vector, resident vector) pair is
computed exactly, in float32 blocks of at most ``chunk_size`` rows (BLAS),
and pairs at or above ``threshold`` are kept (Numba). This is the IVF
self-search with the product-quantization step left out: PQ would only
*drop* candidates of the same lists, and exact blocks beat per-pair scoring
on a self-join. A pair is missed only when neither vector's list is among the
other's ``nprobe`` nearest; ``nprobe = nlist`` checks every pair.

Pairs are joined into groups by union-find (Numba); each group's
representative is its lowest id. Memory: one block of vectors at a time plus a
few integers per vector (list assignments, labels) and the pairs found.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ._validation import as_ids, as_vectors, check_positive_int
from .errors import EmptyIndexError, NotTrainedError
from .kernels.exact import scores

__all__ = ["DedupPlan", "DedupResult", "dedup", "dedup_vectors"]

log = logging.getLogger("fastface.dedup")


@dataclass(frozen=True)
class DedupResult:
    """Groups of near-duplicate vectors.

    Attributes
    ----------
    ids : ndarray of int64, shape (n,)
        Every vector's id, ascending.
    labels : ndarray of int64, shape (n,)
        Group of each vector (``0..n_groups-1``, numbered by representative);
        a vector with no near duplicate is a group of its own.
    representatives : ndarray of int64, shape (n_groups,)
        The lowest id of each group, ascending.
    sizes : ndarray of int64, shape (n_groups,)
        Members per group.
    pairs : ndarray of int64, shape (m, 2)
        Every checked pair at or above the threshold, as ids ``(a, b)`` with
        ``a < b``, sorted.
    scores : ndarray of float32, shape (m,)
        Exact cosine of each pair.
    threshold : float
    """

    ids: npt.NDArray[np.int64]
    labels: npt.NDArray[np.int64]
    representatives: npt.NDArray[np.int64]
    sizes: npt.NDArray[np.int64]
    pairs: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float32]
    threshold: float

    @property
    def n_groups(self) -> int:
        return int(self.representatives.size)

    def groups(self, min_size: int = 2) -> list[npt.NDArray[np.int64]]:
        """Ids of each group with at least ``min_size`` members, representative first."""
        big = np.flatnonzero(self.sizes >= min_size)
        if big.size == 0:
            return []
        keep = np.isin(self.labels, big)
        lab, ids = self.labels[keep], self.ids[keep]
        order = np.lexsort((ids, lab))
        lab, ids = lab[order], ids[order]
        cuts = np.flatnonzero(np.diff(lab)) + 1
        return list(np.split(ids, cuts))

    def duplicates(self) -> npt.NDArray[np.int64]:
        """Ids that are not their group's representative (what a cleaning pass would drop)."""
        return self.ids[self.ids != self.representatives[self.labels]]

    def __repr__(self) -> str:
        multi = int((self.sizes > 1).sum())
        dups = int(self.ids.size - self.n_groups)
        return (
            f"DedupResult(n={self.ids.size}, threshold={self.threshold}, groups_with_duplicates="
            f"{multi}, duplicates={dups}, pairs={self.pairs.shape[0]})"
        )


def _check_threshold(threshold: Any) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)):
        raise TypeError(f"threshold: expected a float cosine, got {type(threshold).__name__}")
    t = float(threshold)
    if not -1.0 < t <= 1.0:
        raise ValueError(
            f"threshold: a cosine must be in (-1, 1], got {t}; near duplicates are typically "
            "0.9 to 0.98"
        )
    return t


class _Part:
    """Vectors of one shard (or of an array): ``array[rows]`` hold positions ``pos``."""

    __slots__ = ("array", "pos", "rows")

    def __init__(self, array: Any, rows: npt.NDArray[np.int64], pos: npt.NDArray[np.int64]) -> None:
        self.array = array
        self.rows = rows
        self.pos = pos


def _unit_rows(array: Any, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    x = np.asarray(array[rows], dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.maximum(norms, np.float32(1e-30), out=norms)
    x /= norms
    return x


def _iter_blocks(n: int, size: int) -> Iterator[slice]:
    for lo in range(0, n, size):
        yield slice(lo, min(lo + size, n))


class _Joiner:
    """Gathers vectors by position and collects the pairs of similarity blocks."""

    def __init__(self, parts: list[_Part], n: int, threshold: float, chunk_size: int) -> None:
        self.parts = parts
        self.part_of = np.empty(n, np.int32)
        self.row_of = np.empty(n, np.int64)
        for p_i, p in enumerate(parts):
            self.part_of[p.pos] = p_i
            self.row_of[p.pos] = p.rows
        self.threshold = np.float32(threshold)
        self.chunk = chunk_size
        self.a: list[npt.NDArray[np.int64]] = []
        self.b: list[npt.NDArray[np.int64]] = []
        self.s: list[npt.NDArray[np.float32]] = []

    def gather(self, pos: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """Unit float32 rows of positions ``pos`` (read from the shards' files)."""
        out = np.empty((pos.size, self.parts[0].array.shape[1]), np.float32)
        owner = self.part_of[pos]
        for p_i in np.unique(owner):
            sel = np.flatnonzero(owner == p_i)
            rows = self.row_of[pos[sel]]
            order = np.argsort(rows, kind="stable")  # read the file forwards
            out[sel[order]] = _unit_rows(self.parts[p_i].array, rows[order])
        return out

    def block(
        self,
        xq: npt.NDArray[np.float32],
        qpos: npt.NDArray[np.int64],
        xr: npt.NDArray[np.float32],
        rpos: npt.NDArray[np.int64],
        ordered: bool,
    ) -> None:
        from .kernels import dedup as kern

        S = scores(xq, xr, "ip")  # cosines: the rows are unit vectors
        cap = max(4 * S.shape[0], 256)
        while True:
            a = np.empty(cap, np.int64)
            b = np.empty(cap, np.int64)
            s = np.empty(cap, np.float32)
            m = int(kern.collect_pairs(S, self.threshold, qpos, rpos, ordered, a, b, s))
            if m <= cap:
                break
            cap = m
        if m:
            self.a.append(a[:m].copy())
            self.b.append(b[:m].copy())
            self.s.append(s[:m].copy())

    def join(self, res: npt.NDArray[np.int64], vis: npt.NDArray[np.int64]) -> None:
        """Pairs among residents ``res`` and between visitors ``vis`` and residents."""
        c = self.chunk
        for rb in _iter_blocks(res.size, c):
            r_pos = res[rb]
            xr = self.gather(r_pos)
            # residents x residents: each unordered pair once (lower position first)
            for qb in _iter_blocks(res.size, c):
                if qb.stop <= rb.start:
                    continue
                if qb == rb:
                    self.block(xr, r_pos, xr, r_pos, True)
                else:
                    self.block(self.gather(res[qb]), res[qb], xr, r_pos, True)
            for vb in _iter_blocks(vis.size, c):
                self.block(self.gather(vis[vb]), vis[vb], xr, r_pos, False)


def _csr(
    keys: npt.NDArray[np.int64], values: npt.NDArray[np.int64], nkeys: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    order = np.argsort(keys, kind="stable")
    offsets = np.zeros(nkeys + 1, np.int64)
    np.cumsum(np.bincount(keys, minlength=nkeys), out=offsets[1:])
    return offsets, values[order]


class DedupPlan:
    """:func:`dedup` in three steps that may run in different processes.

    1. :meth:`probes`: the ``nprobe`` nearest lists of each vector, shard
       by shard (any subset of the shards at a time);
    2. :meth:`pairs`: the pairs at or above the threshold found from a range
       of inverted lists (each list's residents against its residents and
       visitors), given every vector's probes;
    3. :meth:`result`: the pairs of all ranges, in list order, joined into
       groups.

    Every process that builds the plan from the same index (and the same
    arguments) numbers the vectors alike, so the steps' outputs combine:
    ``dedup(index, ...)`` is ``plan.result([plan.pairs(plan.assemble(plan.probes()))])``
    and :func:`fastface.distributed.dedup` runs the first two steps on Ray
    workers. The blocks scored are the same however the lists are split,
    so the result is the same, bit for bit.

    Parameters
    ----------
    index, threshold, nprobe, chunk_size
        As :func:`dedup`.
    """

    def __init__(
        self, index: Any, threshold: float, *, nprobe: int = 8, chunk_size: int = 4096
    ) -> None:
        from .index import IVFPQIndex, ShardedIndex

        threshold = _check_threshold(threshold)
        nprobe = check_positive_int(nprobe, "nprobe")
        chunk_size = check_positive_int(chunk_size, "chunk_size")
        if not isinstance(index, (ShardedIndex, IVFPQIndex)):
            raise TypeError(
                f"index: expected a ShardedIndex or IVFPQIndex, got {type(index).__name__}; use "
                "dedup_vectors for an array"
            )
        name = str(index.path) if isinstance(index, ShardedIndex) else "index"
        if not index.is_trained:
            raise NotTrainedError(f"{name}: not trained; nothing to deduplicate")
        if index.params.store_vectors is None:
            raise ValueError(
                f"{name}: keeps no raw vectors (store_vectors=None); dedup needs them: create "
                "the index with IVFPQParams(..., store_vectors='float16')"
            )
        if isinstance(index, ShardedIndex):
            shard_rows = list(index.live_rows())
        else:
            shard_rows = [(index, index.live_rows())] if index.ntotal else []
        if not shard_rows:
            raise EmptyIndexError(f"{name}: the index is empty; add vectors before dedup")
        ids_sorted, pos = _positions([s.ids[rows] for s, rows in shard_rows])
        parts = [_Part(s.vectors, rows, p) for (s, rows), p in zip(shard_rows, pos, strict=True)]
        self._setup(parts, ids_sorted, _CodecLists(index.codec), nprobe, threshold, chunk_size)
        self._normalise = False

    @classmethod
    def _of_parts(
        cls,
        parts: list[_Part],
        ids_sorted: npt.NDArray[np.int64],
        quantizer: Any,
        nprobe: int,
        threshold: float,
        chunk_size: int,
        normalise: bool,
    ) -> DedupPlan:
        obj = cls.__new__(cls)
        obj._setup(parts, ids_sorted, quantizer, nprobe, threshold, chunk_size)
        obj._normalise = normalise
        return obj

    def _setup(
        self,
        parts: list[_Part],
        ids_sorted: npt.NDArray[np.int64],
        quantizer: Any,
        nprobe: int,
        threshold: float,
        chunk_size: int,
    ) -> None:
        self._parts = parts
        self.ids = ids_sorted
        self._quantizer = quantizer
        self.threshold = threshold
        self.chunk_size = chunk_size
        if quantizer is None:  # exact: every pair
            self.nlist, self.nprobe = 1, 1
        else:
            self.nlist = int(quantizer.nlist)
            self.nprobe = min(nprobe, self.nlist)
        self._t0 = time.perf_counter()

    @property
    def n(self) -> int:
        """Vectors to deduplicate (positions ``0..n-1`` in ascending id order)."""
        return int(self.ids.size)

    @property
    def nparts(self) -> int:
        """Non-empty shards, numbered ``0..nparts-1`` in shard order (``probes(parts=)``)."""
        return len(self._parts)

    def part_sizes(self) -> list[int]:
        """Vectors of each part."""
        return [int(p.rows.size) for p in self._parts]

    def probes(
        self, parts: Any = None, *, progress: bool = False
    ) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]:
        """The vector positions of each part asked for, and their ``nprobe`` nearest lists."""
        from tqdm.auto import tqdm

        which = range(self.nparts) if parts is None else [int(i) for i in parts]
        out = []
        total = sum(self._parts[i].rows.size for i in which)
        with tqdm(total=total, unit="vec", desc="dedup assign", disable=not progress) as bar:
            for i in which:
                p = self._parts[i]
                lists = np.zeros((p.rows.size, self.nprobe), np.int64)
                if self._quantizer is not None:
                    for blk in _iter_blocks(p.rows.size, self.chunk_size):
                        rows = p.rows[blk]
                        if self._normalise:
                            x = _unit_rows(p.array, rows)
                        else:
                            x = np.ascontiguousarray(p.array[rows], dtype=np.float32)
                        _, lists[blk] = self._quantizer.assign(x, self.nprobe)
                        bar.update(rows.size)
                out.append((p.pos, lists))
        return out

    def assemble(
        self, pieces: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]
    ) -> npt.NDArray[np.int64]:
        """Every vector's probes ``(n, nprobe)`` from :meth:`probes` pieces covering all parts."""
        probes = np.full((self.n, self.nprobe), -2, np.int64)
        for pos, lists in pieces:
            probes[pos] = lists
        if (probes[:, 0] == -2).any():
            raise ValueError("pieces: the probes of some parts are missing")
        return probes

    def pairs(
        self,
        probes: npt.NDArray[np.int64],
        lists: range | None = None,
        *,
        progress: bool = False,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Pairs ``(a, b, cosine)`` (positions, ``a < b``) found from the lists in ``lists``."""
        from tqdm.auto import tqdm

        n, nlist, nprobe = self.n, self.nlist, self.nprobe
        lists = range(nlist) if lists is None else lists
        joiner = _Joiner(self._parts, n, self.threshold, self.chunk_size)
        all_pos = np.arange(n, dtype=np.int64)
        res_off, res_pos = _csr(probes[:, 0], all_pos, nlist)
        if nprobe > 1:
            vis_keys = probes[:, 1:].ravel()
            vis_vals = np.repeat(all_pos, nprobe - 1)
            ok = vis_keys >= 0
            vis_off, vis_pos = _csr(vis_keys[ok], vis_vals[ok], nlist)
        else:
            vis_off, vis_pos = np.zeros(nlist + 1, np.int64), np.empty(0, np.int64)
        total = int(res_off[lists.stop] - res_off[lists.start]) if len(lists) else 0
        with tqdm(total=total, unit="vec", desc="dedup join", disable=not progress) as bar:
            for lst in lists:
                res = res_pos[res_off[lst] : res_off[lst + 1]]
                if res.size:
                    joiner.join(res, vis_pos[vis_off[lst] : vis_off[lst + 1]])
                    bar.update(res.size)
        if not joiner.a:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
        return np.concatenate(joiner.a), np.concatenate(joiner.b), np.concatenate(joiner.s)

    def result(
        self,
        pieces: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32]]],
    ) -> DedupResult:
        """The groups of the pairs of every list (pieces in list order)."""
        from .kernels import dedup as kern

        n = self.n
        a = np.concatenate([p[0] for p in pieces]) if pieces else np.empty(0, np.int64)
        b = np.concatenate([p[1] for p in pieces]) if pieces else np.empty(0, np.int64)
        s = np.concatenate([p[2] for p in pieces]) if pieces else np.empty(0, np.float32)
        if a.size:
            # the same pair may be found from both of its vectors' lists
            key = a * n + b
            key, first = np.unique(key, return_index=True)
            a, b, s = a[first], b[first], s[first]
        root = np.arange(n, dtype=np.int64)
        kern.union_find(a, b, root)
        labels = np.empty(n, np.int64)
        sizes = np.zeros(n, np.int64)
        g = int(kern.group_labels(root, labels, sizes))
        all_pos = np.arange(n, dtype=np.int64)
        reps = self.ids[np.flatnonzero(root == all_pos)]
        log.info(
            "dedup: %d vectors, %d pairs at cosine >= %g, %d groups with duplicates (nprobe %d) "
            "in %.2f s",
            n,
            a.size,
            self.threshold,
            int((sizes[:g] > 1).sum()),
            self.nprobe,
            time.perf_counter() - self._t0,
        )
        ids = self.ids
        pairs = np.stack([ids[a], ids[b]], axis=1) if a.size else np.empty((0, 2), np.int64)
        return DedupResult(
            ids=ids,
            labels=labels,
            representatives=reps,
            sizes=sizes[:g].copy(),
            pairs=pairs,
            scores=s,
            threshold=self.threshold,
        )


def _run(plan: DedupPlan, progress: bool) -> DedupResult:
    probes = plan.assemble(plan.probes(progress=progress))
    return plan.result([plan.pairs(probes, progress=progress)])


def _positions(
    ids_list: list[npt.NDArray[np.int64]],
) -> tuple[npt.NDArray[np.int64], list[npt.NDArray[np.int64]]]:
    """Ascending ids of all parts, and each part's positions in that order."""
    all_ids = np.concatenate(ids_list) if ids_list else np.empty(0, np.int64)
    order = np.argsort(all_ids, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    out, lo = [], 0
    for ids in ids_list:
        out.append(rank[lo : lo + ids.size])
        lo += ids.size
    return all_ids[order], out


def dedup(
    index: Any,
    threshold: float,
    *,
    nprobe: int = 8,
    chunk_size: int = 4096,
    progress: bool = False,
) -> DedupResult:
    """Near-duplicate groups among the searchable vectors of an index.

    Parameters
    ----------
    index : ShardedIndex or IVFPQIndex
        Trained, non-empty, created with ``store_vectors`` set; the stored
        vectors are read shard by shard from their memory-mapped files.
    threshold : float
        Two vectors are duplicates when their cosine is ``>= threshold``, in (-1, 1].
    nprobe : int
        Inverted lists each vector probes for candidates (``nlist`` checks every pair).
    chunk_size : int
        Rows per block of the exact check; bounds the memory used for vectors.
    progress : bool
        Show tqdm progress bars (off by default; the ``fastface dedup`` command shows
        them when stderr is a terminal).

    Returns
    -------
    DedupResult

    Examples
    --------
    >>> import numpy as np
    >>> from fastface import IVFPQIndex, IVFPQParams, dedup
    >>> from fastface.datasets import SyntheticFaces, plant_duplicates
    >>> x, _ = SyntheticFaces(100, 20, 32, seed=0).vectors()
    >>> x, origin = plant_duplicates(x, 0.05, seed=0)
    >>> index = IVFPQIndex(IVFPQParams(32, 8, 8))
    >>> index.train(x)
    >>> _ = index.add(x)
    >>> result = dedup(index, 0.93, nprobe=8, progress=False)
    >>> bool((result.labels == result.labels[origin]).all())
    True
    """
    plan = DedupPlan(index, threshold, nprobe=nprobe, chunk_size=chunk_size)
    return _run(plan, progress)


class _CodecLists:
    """The coarse lists of an index's codec, as :func:`_run` asks for them."""

    def __init__(self, codec: Any) -> None:
        self.codec = codec
        self.nlist = codec.params.nlist

    def assign(self, x: npt.NDArray[np.float32], nprobe: int) -> tuple[Any, npt.NDArray[np.int64]]:
        # an HNSW coarse quantizer is walked as deep as when the vectors were added: a
        # vector's first probe is its resident list here, and a shallower walk than the
        # add's puts near copies in lists that neither one's probes reach
        from .index.params import EF_ADD, hnsw_ef

        return self.codec.assign(x, nprobe, ef_search=max(EF_ADD, hnsw_ef(nprobe)))


class _KMeansLists:
    """Lists of a spherical k-means (FAISS) over an array's rows."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self.nlist = int(index.ntotal)

    def assign(self, x: npt.NDArray[np.float32], nprobe: int) -> tuple[Any, npt.NDArray[np.int64]]:
        D, I = self.index.search(x, nprobe)
        return D, I


def dedup_vectors(
    x: npt.NDArray[np.float32],
    threshold: float,
    *,
    ids: npt.ArrayLike | None = None,
    nlist: int | None = None,
    nprobe: int = 8,
    exact_below: int = 20_000,
    chunk_size: int = 4096,
    seed: int = 0,
    progress: bool = False,
) -> DedupResult:
    """Near-duplicate groups among the rows of an array (may be a memory map).

    Below ``exact_below`` rows every pair is checked. Above, a spherical
    k-means with ``nlist`` lists (default ``sqrt(n)``, trained on at most
    ``64 * nlist`` rows) partitions the rows and each row probes its ``nprobe``
    nearest lists, as :func:`dedup` does with an index's own lists.

    Parameters
    ----------
    x : ndarray of float32, shape (n, d)
    threshold : float
        Duplicates have cosine ``>= threshold``, in (-1, 1].
    ids : array of int64, optional
        Id of each row (default: the row numbers).

    Examples
    --------
    >>> import numpy as np
    >>> from fastface import dedup_vectors
    >>> x = np.eye(4, dtype=np.float32)
    >>> x[3] = [0.99, 0.141, 0, 0]
    >>> r = dedup_vectors(x, 0.95, progress=False)
    >>> r.labels.tolist(), r.representatives.tolist(), r.pairs.tolist()
    ([0, 1, 2, 0], [0, 1, 2], [[0, 3]])
    """
    threshold = _check_threshold(threshold)
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[0] == 0:
        as_vectors(x, "x")  # raises the policy's error for this input
    as_vectors(x[:0], "x", allow_empty=True)  # the dtype, before reading any row
    n = x.shape[0]
    for blk in _iter_blocks(n, 65536):  # chunked: x may be a large memory map
        try:
            as_vectors(np.asarray(x[blk]), "x", allow_empty=True)  # dtype, overflow, NaN/inf
        except ValueError as e:
            raise ValueError(f"{e} (counting from row {blk.start})") from e
    nprobe = check_positive_int(nprobe, "nprobe")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    id_arr = np.arange(n, dtype=np.int64) if ids is None else as_ids(ids, n)
    ids_sorted, (pos,) = _positions([id_arr])
    parts = [_Part(x, np.arange(n, dtype=np.int64), pos)]
    quantizer: Any = None
    if n >= exact_below:
        nlist = int(math.sqrt(n)) if nlist is None else check_positive_int(nlist, "nlist")
        nlist = min(nlist, n)
        sample_n = min(n, 64 * nlist)
        rng = np.random.default_rng(seed)
        sample = _unit_rows(x, np.sort(rng.choice(n, size=sample_n, replace=False)))
        import faiss

        km = faiss.Kmeans(x.shape[1], nlist, niter=10, spherical=True, seed=seed)
        km.cp.max_points_per_centroid = 64
        km.train(sample)
        quantizer = _KMeansLists(km.index)
    plan = DedupPlan._of_parts(
        parts, ids_sorted, quantizer, nprobe, threshold, chunk_size, normalise=True
    )
    return _run(plan, progress)
