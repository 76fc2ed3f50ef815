"""One IVF-PQ shard, and the shard contract every consumer of a shard uses.

An :class:`IVFPQIndex` holds a trained :class:`~fastface.index.params.Codec`
(coarse centroids, PQ codebooks), the PQ codes of its vectors in inverted
lists, their int64 ids and, optionally, the raw vectors (float16/float32)
for exact scoring. FAISS trains the codec and encodes vectors; 8-bit codes
are scanned by fastface's native kernel in place, 4-bit (fast-scan) codes
by FAISS.

The shard contract
------------------
:class:`~fastface.ShardedIndex`, :func:`fastface.dedup`, the gallery, and
(later) Ray actors and GPU kernels talk to a shard only through these
public members. All of them are safe to call from several threads while
another thread adds or removes: a call works on the state it found when
it started (writes publish a new state; they never change one in place).

State (read-only)
    ``params``, ``d``, ``ntotal``, ``is_trained``, ``read_only``;
    ``codec`` (the trained codec, shared by every shard of a sharded index);
    ``ids`` (ids in row order); ``vectors`` (raw vectors in row order, or
    ``None``); ``list_runs`` (8-bit: the inverted lists in place, see
    :mod:`fastface.index.lists`).
Lookup
    ``contains(ids)`` (mask), ``rows_of(ids)`` (row of each id, ``-1`` if
    not held), ``live_ids()`` / ``live_rows()`` (searchable ids / rows),
    ``get_vectors(ids)`` (stored vectors of ids, float32).
Search, in three steps that compose
    ``assign(q, nprobe)`` -> ``(Dq, Iq)``: the coarse assignment, which
    depends on the codec only, so one assignment serves every shard;
    ``scan(q, k, assignment, exclude=ids)`` -> ``(D, I)``: PQ scores of the
    codes in the assigned lists, skipping the excluded ids (tombstones);
    ``rescore(q, candidate_ids, k)`` -> ``(D, I)``: exact scores of
    candidates held here (:mod:`fastface.kernels.exact`).
    ``search(q, k, nprobe=, rerank=)`` is ``assign`` + ``scan`` (+ ``rescore``).
Writing
    ``train``, ``add``, ``remove``, ``copy()`` (cheap: the copy shares every
    buffer and copies on write), ``save`` / ``load``, ``serialize()`` (the
    FAISS file as byte chunks), ``to_faiss()``, ``from_faiss``, ``from_parts``.

Results are ``(D, I)`` shaped ``(nq, k)``: float32 scores (inner product,
larger is better; or squared L2) and int64 ids, padded with ``-1`` and
``-inf`` (``+inf`` for L2). Equal scores are ordered by lower id, always; a
top-``k`` is exact under that order, so splitting the same vectors over
shards and merging (:func:`fastface._native.merge_topk`) gives the same bits
as scanning them together (8-bit codes; 4-bit fast-scan leaves ties to FAISS).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from .._validation import (
    as_id_array,
    as_ids,
    as_queries,
    as_vectors,
    check_k,
    check_positive_int,
)
from ..errors import CorruptIndexError, EmptyIndexError, NotTrainedError, ReadOnlyIndexError
from . import faiss_format, lists, storage
from .lists import ListRun
from .params import METRICS, STORE_DTYPES, Codec, CodecParams, FlatParams, IVFPQParams
from .soar import spill_lists
from .vectors import Rows, check_storable

__all__ = ["IVFPQIndex", "IVFPQParams", "IdSet", "check_nprobe", "check_rerank", "sorted_unique"]

FORMAT = "fastface.ivfpq"
FORMAT_VERSION = 2
#: Largest number of re-ranking candidates per query (``k * rerank``).
MAX_CANDIDATES = 1 << 20
_MAX_RUNS = 8


def check_nprobe(nprobe: Any, nlist: int) -> int:
    """``nprobe`` as an int in ``1..nlist``; ``None`` means ``min(16, nlist)``."""
    if nprobe is None:
        return min(16, nlist)
    nprobe = check_positive_int(nprobe, "nprobe")
    if nprobe > nlist:
        raise ValueError(
            f"nprobe={nprobe} exceeds nlist={nlist}; pass nprobe <= nlist "
            "(nprobe=nlist scans every list)"
        )
    return nprobe


def check_rerank(rerank: Any, k: int, params: CodecParams) -> int | None:
    """``rerank`` as ``None`` or an int >= 1 with ``k * rerank <= MAX_CANDIDATES``."""
    if rerank is None:
        return None
    if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)):
        raise TypeError(f"rerank: expected an int >= 1 or None, got {type(rerank).__name__}")
    if rerank < 1:
        raise ValueError(
            f"rerank: expected an int >= 1 (candidates per result), got {rerank}; pass "
            "rerank=None to skip re-ranking"
        )
    if params.store_vectors is None:
        raise ValueError(
            "rerank: this index keeps no raw vectors (store_vectors=None); create it with "
            "IVFPQParams(..., store_vectors='float16') to re-rank"
        )
    if k * int(rerank) > MAX_CANDIDATES:
        raise ValueError(
            f"rerank: k * rerank = {k * int(rerank)} candidates per query exceeds "
            f"{MAX_CANDIDATES}; lower k or rerank"
        )
    return int(rerank)


def check_assignment(
    assignment: Any, nq: int, nlist: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """A coarse assignment ``(Dq, Iq)`` for ``nq`` queries, as :meth:`IVFPQIndex.assign` returns."""
    if not isinstance(assignment, tuple) or len(assignment) != 2:
        raise TypeError("assignment: expected the (Dq, Iq) pair that assign() returns")
    Dq = np.ascontiguousarray(assignment[0], dtype=np.float32)
    Iq = np.asarray(assignment[1])
    if Iq.dtype.kind not in "iu":
        raise TypeError(f"assignment: list numbers must be integers, got {Iq.dtype}")
    Iq = np.ascontiguousarray(Iq, dtype=np.int64)
    if Dq.ndim != 2 or Dq.shape != Iq.shape or Dq.shape[0] != nq:
        raise ValueError(
            f"assignment: expected (Dq, Iq) shaped ({nq}, nprobe), got {Dq.shape} and {Iq.shape}"
        )
    if Iq.size and (int(Iq.min()) < -1 or int(Iq.max()) >= nlist):
        raise ValueError(f"assignment: list numbers must be in -1..{nlist - 1}")
    return Dq, Iq


def sorted_unique(a: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Sorted unique values of an int64 array (by sorting: faster than NumPy's hashed unique)."""
    s = np.sort(a.reshape(-1))
    if s.size > 1:
        s = s[np.concatenate(([True], s[1:] != s[:-1]))]
    return s


class IdSet:
    """A set of ids, sorted and unique, built once and reused (e.g. tombstones).

    Pass one as ``exclude=`` to :meth:`IVFPQIndex.scan` to skip re-checking
    the ids on every call.
    """

    __slots__ = ("_selector", "array")

    def __init__(self, ids: npt.ArrayLike) -> None:
        arr = sorted_unique(as_id_array(ids, "ids"))
        arr.flags.writeable = False
        self.array: npt.NDArray[np.int64] = arr
        self._selector: tuple[Any, Any] | None = None

    def __len__(self) -> int:
        return int(self.array.size)

    def contains(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Mask of which ``ids`` (int64) are in the set."""
        arr = self.array
        if arr.size == 0:
            return np.zeros(np.shape(ids), bool)
        pos = np.searchsorted(arr, ids)
        np.minimum(pos, arr.size - 1, out=pos)
        return arr[pos] == ids

    def faiss_selector(self) -> Any:
        """A FAISS selector that admits every id *not* in the set (built once)."""
        if self._selector is None:
            batch = faiss.IDSelectorBatch(self.array)
            self._selector = (faiss.IDSelectorNot(batch), batch)  # Not does not own batch
        return self._selector[0]


def _exclusion(exclude: Any) -> IdSet | None:
    if exclude is None:
        return None
    ids = exclude if isinstance(exclude, IdSet) else IdSet(exclude)
    return ids if len(ids) else None


class _State:
    """One immutable state of a shard: rows (ids, vectors) and inverted lists."""

    __slots__ = ("faiss", "ids", "lookup", "rmap", "runs", "sizes", "vectors")

    def __init__(
        self,
        ids: Rows,
        vectors: Rows | None,
        runs: tuple[ListRun, ...],
        faiss_index: Any,
    ) -> None:
        self.ids = ids
        self.vectors = vectors
        self.runs = runs
        self.faiss = faiss_index  # 4-bit: a FAISS index holding the lists (never mutated)
        self.lookup: tuple[Any, ...] | None = None
        self.rmap: Any = False  # row_map(), once known
        self.sizes: npt.NDArray[np.int64] | None = None  # entries per list, computed once

    @property
    def n(self) -> int:
        return self.ids.n

    def _make_lookup(self) -> tuple[Any, ...]:
        """``(srt, order, lo, span, table)``: sorted ids, their rows, and a dense table
        ``table[id - lo] = row`` when the ids are compact (``None`` otherwise);
        ``(None, None, lo, n, None)`` when the ids are ``lo, lo + 1, ...`` in row order."""
        arr = self.ids.array
        lo = int(arr[0])
        # consecutive ids in row order (what a build writes) need no table at all
        if int(arr[-1]) - lo == arr.size - 1 and (arr.size == 1 or bool((np.diff(arr) == 1).all())):
            return (None, None, lo, int(arr.size), None)
        order = np.argsort(arr, kind="stable").astype(np.int64)
        srt = arr[order]
        lo, span = int(srt[0]), int(srt[-1]) - int(srt[0]) + 1
        table = None
        if span <= 2 * srt.size + 1024:
            table = np.full(span, -1, np.int64)
            table[srt - lo] = order
        return (srt, order, lo, span, table)

    def row_map(self) -> tuple[int, int, npt.NDArray[np.int64] | None] | None:
        """How the re-ranking kernel finds a candidate's row from its id: ``(lo, span,
        table)`` (``table`` ``None`` when ids ``lo, lo + 1, ...`` are in row order), or
        ``None`` when the ids are too sparse for a table (rows are then looked up first)."""
        if self.rmap is False:
            self.rmap = None
            if self.n:
                if self.lookup is None:
                    self.lookup = self._make_lookup()
                srt, _, lo, span, table = self.lookup
                if srt is None:
                    self.rmap = (lo, span, None)
                elif table is not None:
                    self.rmap = (lo, span, table)
        rmap: tuple[int, int, npt.NDArray[np.int64] | None] | None = self.rmap
        return rmap

    def id_bounds(self) -> tuple[int, int] | None:
        """Smallest and largest id held (``None`` when empty)."""
        if self.n == 0:
            return None
        if self.lookup is None:
            self.lookup = self._make_lookup()
        srt, _, lo, span, _ = self.lookup
        if srt is None:
            return lo, lo + span - 1
        return int(srt[0]), int(srt[-1])

    def rows_of(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Row of each id, ``-1`` for unknown ids. Dense table when ids are compact."""
        if self.n == 0:
            return np.full(ids.shape, -1, np.int64)
        if self.lookup is None:
            self.lookup = self._make_lookup()
        srt, order, lo, span, table = self.lookup
        if srt is None:  # ids are lo, lo + 1, ... in row order: the row is id - lo
            off = ids - lo
            return np.where((off >= 0) & (off < span), off, -1)
        if table is not None:
            off = ids - lo
            inside = (off >= 0) & (off < span)
            return np.where(inside, table[np.where(inside, off, 0)], -1)
        pos = np.searchsorted(srt, ids)
        np.minimum(pos, srt.size - 1, out=pos)
        return np.where(srt[pos] == ids, order[pos], -1)


class IVFPQIndex:
    """One IVF-PQ shard: FAISS-compatible codes, ids and (optionally) raw vectors.

    Create with parameters (then :meth:`train`) or with a trained
    :class:`~fastface.index.params.Codec`; or :meth:`load` a saved one. See
    the module docstring for the shard contract: :meth:`assign`,
    :meth:`scan`, :meth:`rescore`, :meth:`live_ids`, :attr:`codec`...

    Thread safety: any number of threads may search while one adds or
    removes; each search sees the index as it was when it started. Writes
    from several threads are serialised by a lock.

    Examples
    --------
    >>> import numpy as np
    >>> from fastface import IVFPQIndex, IVFPQParams
    >>> from fastface.datasets import SyntheticFaces
    >>> data = SyntheticFaces(n_identities=200, per_identity=20, d=32, seed=0)
    >>> xb, _ = data.vectors()
    >>> index = IVFPQIndex(IVFPQParams(32, 16, 8))
    >>> index.train(xb)
    >>> _ = index.add(xb)
    >>> D, I = index.search(xb[:2], 5, nprobe=16)
    >>> D.shape, I.dtype.name, index.ntotal
    ((2, 5), 'int64', 4000)
    >>> D, I = index.search(xb[:2], 5, nprobe=16, rerank=4)  # exact scores, from stored vectors
    >>> I[:, 0].tolist(), bool(abs(D[0, 0] - 1.0) < 1e-3)
    ([0, 1], True)
    >>> assignment = index.assign(xb[:2], 16)                 # the same, step by step
    >>> D2, I2 = index.scan(xb[:2], 5 * 4, assignment)
    >>> np.array_equal(index.rescore(xb[:2], I2, 5)[1], I)
    True
    """

    def __init__(self, params: CodecParams | Codec | str, *, d: int | None = None) -> None:
        if isinstance(params, str):
            from .params import parse_spec

            if d is None:
                raise ValueError(
                    f"d: pass the dimension with the spec, e.g. IVFPQIndex({params!r}, d=128)"
                )
            params = parse_spec(params, d)
        self.params: CodecParams
        if isinstance(params, Codec):
            self._codec: Codec | None = params
            self.params = params.params
        elif isinstance(params, FlatParams):
            self._codec = Codec.flat(params)  # nothing to train
            self.params = params
        elif isinstance(params, IVFPQParams):
            self._codec = None
            self.params = params
        else:
            raise TypeError(
                f"params: expected IVFPQParams, FlatParams, a Codec or a spec string, got "
                f"{type(params).__name__}"
            )
        self._read_only = False
        self._write_lock = threading.Lock()
        self._state = self._empty_state()

    def _empty_state(self) -> _State:
        p = self.params
        vectors = Rows(STORE_DTYPES[p.store_vectors], (p.d,)) if p.store_vectors else None
        runs: tuple[ListRun, ...] = ()
        fidx = None
        if self._codec is not None and isinstance(p, IVFPQParams):
            if p.nbits == 8:
                runs = (ListRun.empty(p.nlist, p.code_size),)
            else:
                fidx = self._codec.ivf_twin()
        return _State(Rows(np.int64, ()), vectors, runs, fidx)

    # --- construction from parts ---------------------------------------------------------------
    @classmethod
    def from_parts(
        cls,
        codec: Codec,
        ids: npt.NDArray[np.int64],
        *,
        runs: Iterable[ListRun] | None = None,
        faiss_index: Any = None,
        vectors: npt.NDArray[Any] | None = None,
        read_only: bool = False,
    ) -> IVFPQIndex:
        """An index over existing parts: ``ids`` in row order, their lists and raw vectors.

        8-bit codecs take ``runs`` (:class:`~fastface.index.lists.ListRun`,
        e.g. a shard's share of lists packed with other shards); 4-bit codecs
        take a filled FAISS fast-scan index, which must not be changed after.
        The lists must hold exactly ``ids`` (each twice with spilled
        assignment); ``vectors`` (row order) is required when the codec's
        params store vectors. Nothing is copied.
        """
        obj = cls(codec)
        p = obj.params
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if isinstance(p, FlatParams):
            if runs is not None or faiss_index is not None:
                raise ValueError("from_parts: a flat codec takes ids and vectors only")
            run_t: tuple[ListRun, ...] = ()
            held = ids.size
        elif p.nbits == 8:
            if runs is None or faiss_index is not None:
                raise ValueError("from_parts: an 8-bit codec takes runs, not a FAISS index")
            run_t = tuple(runs)
            held = sum(r.n for r in run_t)
        else:
            if faiss_index is None or runs is not None:
                raise ValueError("from_parts: a 4-bit codec takes a FAISS index, not runs")
            run_t = ()
            held = int(faiss_index.ntotal)
        if held != ids.size * p.max_copies:
            raise CorruptIndexError(
                f"the lists hold {held} entries, the ids {ids.size} vectors"
                + (" (each in two lists)" if p.max_copies > 1 else "")
            )
        vec_rows = None
        if p.store_vectors is not None:
            if vectors is None:
                raise ValueError(
                    f"vectors: the params keep raw vectors (store_vectors={p.store_vectors!r}); "
                    f"pass the {ids.size} vectors in ids order"
                )
            want = np.dtype(STORE_DTYPES[p.store_vectors])
            if vectors.ndim != 2 or vectors.shape != (ids.size, p.d) or vectors.dtype != want:
                raise CorruptIndexError(
                    f"stored vectors hold {vectors.dtype} {tuple(vectors.shape)}, expected "
                    f"{want} ({ids.size}, {p.d})"
                )
            vec_rows = Rows.of(vectors)
        ids_ro = ids.view()
        ids_ro.flags.writeable = False
        obj._state = _State(Rows.of(ids_ro), vec_rows, run_t, faiss_index)
        obj._read_only = bool(read_only)
        return obj

    @classmethod
    def from_faiss(
        cls,
        params: IVFPQParams,
        index: Any,
        ids: Iterable[int] | None = None,
        vectors: npt.NDArray[Any] | None = None,
    ) -> IVFPQIndex:
        """Wrap a trained (and possibly filled) FAISS ``IndexIVFPQ`` / ``IndexIVFPQFastScan``.

        With ``params.coarse_hnsw`` its quantizer is an ``IndexHNSWFlat``, with
        ``params.coarse_ivf`` an ``IndexIVFFlat`` over the centroids (with a
        direct map); with
        ``params.opq`` it is wrapped in an ``IndexPreTransform`` of one
        rotation (as ``faiss.index_factory(d, params.spec)`` builds it, without
        the storage token). The lists are copied; ``index`` stays the caller's. ``ids`` gives the
        row order of the vectors (default: the lists' order, each id where it
        first appears) and ``vectors`` their raw values in that order
        (required when ``params`` store vectors and the index is not empty).
        With ``params.soar_lambda`` set every id must be in exactly two lists.
        """
        if not isinstance(params, IVFPQParams):
            raise TypeError(f"params: expected IVFPQParams, got {type(params).__name__}")
        caller_ref = index  # the caller's object may be the only owner: keep it alive
        index = faiss.downcast_index(caller_ref)
        inner = _check_faiss_kind(params, index)
        if not index.is_trained:
            raise NotTrainedError("index: the FAISS index is not trained")
        codec = Codec(params, index)
        data = np.frombuffer(bytes(faiss.serialize_index(index)), np.uint8)
        layout = faiss_format.parse(data, "faiss index")
        layout.check(params)
        if params.nbits == 8:
            run = ListRun.from_layout(data, layout)
            list_ids = run.list_ids()
            fidx = None
            runs: tuple[ListRun, ...] | None = (run,)
        else:
            fidx = codec.with_flat_quantizer(faiss.clone_index(inner))
            list_ids = _fastscan_ids(data, layout)
            runs = None
        try:
            first = row_order_ids(list_ids, params.max_copies)
        except ValueError as e:
            raise ValueError(f"index: {e}") from None
        if ids is None:
            row_ids = first
        else:
            row_ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
            row_ids = as_ids(row_ids, first.size)
            if not np.array_equal(np.sort(row_ids), np.sort(first)):
                raise ValueError("ids: must be the ids stored in the index, in row order")
        if params.store_vectors is not None and vectors is None and row_ids.size == 0:
            vectors = np.empty((0, params.d), STORE_DTYPES[params.store_vectors])
        if vectors is not None and params.store_vectors is not None:
            vectors = np.ascontiguousarray(vectors, dtype=STORE_DTYPES[params.store_vectors])
        return cls.from_parts(
            codec, row_ids, runs=runs, faiss_index=fidx, vectors=vectors, read_only=False
        )

    def view(self) -> IVFPQIndex:
        """A read-only index sharing this one's current state (later writes here do not show)."""
        obj = self.copy()
        obj._read_only = True
        return obj

    def with_vectors(self, vectors: npt.NDArray[Any]) -> IVFPQIndex:
        """A copy whose stored vectors are ``vectors`` (same shape and dtype; e.g. a memory map)."""
        st = self._state
        if st.vectors is None:
            raise ValueError("with_vectors: this index keeps no raw vectors")
        if vectors.shape != (st.n, self.d) or vectors.dtype != st.vectors.dtype:
            raise ValueError(
                f"with_vectors: expected {st.vectors.dtype} ({st.n}, {self.d}), got "
                f"{vectors.dtype} {tuple(vectors.shape)}"
            )
        obj = self.copy()
        obj._state = _State(st.ids, Rows.of(vectors), st.runs, st.faiss)
        return obj

    def copy(self) -> IVFPQIndex:
        """A writable copy that shares every buffer with this index (copy on write)."""
        if self._codec is None:
            return IVFPQIndex(self.params)
        obj = IVFPQIndex(self._codec)
        st = self._state
        obj._state = _State(st.ids, st.vectors, st.runs, st.faiss)
        return obj

    # --- state ---------------------------------------------------------------------------------
    @property
    def d(self) -> int:
        return self.params.d

    @property
    def ntotal(self) -> int:
        """Number of vectors held (all searchable)."""
        return self._state.n

    @property
    def is_trained(self) -> bool:
        return self._codec is not None

    @property
    def read_only(self) -> bool:
        """True for an index loaded with ``mmap=True`` and for the shards of a ShardedIndex."""
        return self._read_only

    @property
    def codec(self) -> Codec:
        """The trained codec (read-only, shared); raises ``NotTrainedError`` before training."""
        if self._codec is None:
            raise NotTrainedError("index is not trained; call train(x) first")
        return self._codec

    @property
    def ids(self) -> npt.NDArray[np.int64]:
        """Ids of the stored vectors, in row order (read-only view)."""
        return self._state.ids.array

    @property
    def vectors(self) -> npt.NDArray[Any] | None:
        """The stored raw vectors in row order (``ids`` order), read-only; ``None`` if not kept.

        A memory map for an index loaded from disk: indexing it reads only the rows asked for.
        """
        st = self._state
        return None if st.vectors is None else st.vectors.array

    @property
    def list_runs(self) -> tuple[ListRun, ...]:
        """8-bit codecs: the inverted lists in place (several runs may share a list)."""
        return self._state.runs

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        p = self.params
        return (
            f"IVFPQIndex({p.spec!r}, d={p.d}, metric={p.metric!r}, ntotal={self.ntotal}, "
            f"is_trained={self.is_trained})"
        )

    def id_bounds(self) -> tuple[int, int] | None:
        """``(smallest, largest)`` id held, or ``None`` when empty (computed once per state)."""
        return self._state.id_bounds()

    def list_sizes(self) -> npt.NDArray[np.int64]:
        """Entries held per inverted list, shape ``(nlist,)`` (computed once per state).

        A search may skip this shard for queries none of whose probed lists
        are non-empty here. A flat shard is one list.
        """
        st = self._state
        if st.sizes is None:
            p = self.params
            if isinstance(p, FlatParams):
                sizes = np.array([st.n], np.int64)
            elif p.nbits == 8:
                sizes = (
                    np.sum([r.count for r in st.runs], axis=0).astype(np.int64)
                    if st.runs
                    else np.zeros(p.nlist, np.int64)
                )
            elif st.faiss is None:
                sizes = np.zeros(p.nlist, np.int64)
            else:
                il = st.faiss.invlists
                sizes = np.array([il.list_size(i) for i in range(p.nlist)], np.int64)
            sizes.flags.writeable = False
            st.sizes = sizes
        return st.sizes

    # --- lookup --------------------------------------------------------------------------------
    def contains(self, ids: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Boolean mask: which of ``ids`` (integers, any shape) are stored here."""
        arr = np.asarray(ids)
        flat = as_id_array(arr)
        return (self._state.rows_of(flat) >= 0).reshape(arr.shape)

    def rows_of(self, ids: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Row of each id (same shape as ``ids``), ``-1`` where the id is not stored here."""
        arr = np.asarray(ids)
        flat = as_id_array(arr)
        return self._state.rows_of(flat).reshape(arr.shape)

    def live_ids(self) -> npt.NDArray[np.int64]:
        """Ids of the searchable vectors, in row order (a copy)."""
        return np.array(self._state.ids.array)

    def live_rows(self) -> npt.NDArray[np.int64]:
        """Rows of the searchable vectors (all rows of a shard), ascending."""
        return np.arange(self._state.n, dtype=np.int64)

    def get_vectors(self, ids: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """The stored raw vectors of ``ids`` as float32 ``(len(ids), d)``.

        Unknown ids raise ``KeyError``.
        """
        st = self._state
        if st.vectors is None:
            raise ValueError("get_vectors: this index keeps no raw vectors (store_vectors=None)")
        flat = as_id_array(ids)
        rows = st.rows_of(flat)
        if (rows < 0).any():
            raise KeyError(f"ids not stored here, e.g. {int(flat[rows < 0][0])}")
        return np.asarray(st.vectors.array[rows], dtype=np.float32)

    # --- train / add / remove ------------------------------------------------------------------
    def _check_writable(self) -> None:
        if self._read_only:
            raise ReadOnlyIndexError(
                "this index is read-only (loaded with mmap=True, or a shard of a ShardedIndex); "
                "load it with mmap=False, or call copy(), to change it"
            )

    def train(
        self,
        x: npt.NDArray[np.float32],
        *,
        max_points: int | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        """Train the codec on ``x``: OPQ, coarse k-means, HNSW graph, PQ (:mod:`~.train`).

        At most ``max_points`` rows (default :func:`~fastface.index.train.default_train_size`:
        ``256 * nlist``, fewer per list for large ``nlist``) are used, sampled
        without replacement with ``seed``; ``x`` may be a memory map. Stages
        are logged; ``progress=True`` shows a bar. A flat index needs no
        training: for one, ``train`` checks ``x`` and does nothing (as FAISS's
        ``IndexFlat.train``), so code written for any index works.
        """
        self._check_writable()
        if isinstance(self.params, FlatParams):
            as_vectors(x[:1024] if isinstance(x, np.ndarray) else x, "x", d=self.params.d)
            return
        with self._write_lock:
            if self.is_trained:
                raise RuntimeError("index is already trained; create a new IVFPQIndex to retrain")
            self._codec = train_codec(
                self.params, x, max_points=max_points, seed=seed, progress=progress
            )
            self._state = self._empty_state()

    def add(
        self,
        x: npt.NDArray[np.float32],
        ids: npt.ArrayLike | None = None,
        *,
        batch_size: int = 65536,
    ) -> npt.NDArray[np.int64]:
        """Add vectors (2-D; float16/32/64, cast to float32); returns their ids.

        Without ``ids`` the vectors get consecutive ids after the largest one
        stored. Ids must be unique across the index. Nothing changes if this
        raises.
        """
        self._check_writable()
        if not self.is_trained:
            raise NotTrainedError("index is not trained; call train(x) before add(x)")
        x = as_vectors(x, "x", d=self.d, allow_empty=True)
        check_storable(x, self.params.store_vectors)
        batch_size = check_positive_int(batch_size, "batch_size")
        with self._write_lock:
            st = self._state
            id_arr = self._new_ids(st, ids, x.shape[0])
            self._state = self._added(st, x, id_arr, batch_size)
        return id_arr

    def _new_ids(self, st: _State, ids: Any, n: int) -> npt.NDArray[np.int64]:
        if ids is None:
            start = int(st.ids.array.max()) + 1 if st.n else 0
            return consecutive_ids(start, n)
        id_arr = as_ids(ids, n)
        taken = st.rows_of(id_arr) >= 0
        if taken.any():
            raise ValueError(
                f"ids: {int(taken.sum())} id(s) already in the index, e.g. "
                f"{int(id_arr[taken][0])}; remove them first or pass new ids"
            )
        return id_arr

    def _added(
        self, st: _State, x: npt.NDArray[np.float32], ids: npt.NDArray[np.int64], batch_size: int
    ) -> _State:
        """The state with ``x`` added (a new state; ``st`` is unchanged)."""
        if ids.size == 0:
            return st
        codec = self.codec
        p = self.params
        runs = st.runs
        fidx = st.faiss
        if isinstance(p, FlatParams):
            pass  # a flat shard is its ids and vectors
        elif p.nbits == 8:
            new_runs = list(runs)
            for s in range(0, x.shape[0], batch_size):
                xs, ids_s = x[s : s + batch_size], ids[s : s + batch_size]
                lst, codes = codec.encode(xs)
                if p.soar_lambda is not None:  # a second entry in the spilled list
                    lst2, codes2 = codec.encode(xs, spill_lists(codec, xs, lst, p.soar_lambda))
                    lst = np.concatenate([lst, lst2])
                    codes = np.concatenate([codes, codes2])
                    ids_s = np.concatenate([ids_s, ids_s])
                new_runs.append(lists.from_encoded(lst, codes, ids_s, p.nlist))
            runs = _settle_runs(new_runs, p.nlist, p.code_size)
        else:
            fidx = faiss.clone_index(st.faiss)  # fast-scan lists change in place: copy first
            with _CoarseFromCodec(fidx, codec):
                for s in range(0, x.shape[0], batch_size):
                    xr = codec.rotate(x[s : s + batch_size])
                    fidx.add_with_ids(xr, ids[s : s + batch_size])
        vectors = None if st.vectors is None else st.vectors.append(x)
        return _State(st.ids.append(ids), vectors, runs, fidx)

    def remove(self, ids: npt.ArrayLike) -> int:
        """Remove vectors by id (integers); returns how many were removed (unknown ids ignored)."""
        self._check_writable()
        arr = sorted_unique(as_id_array(ids))
        with self._write_lock:
            st = self._state
            new, removed = self._removed(st, arr)
            self._state = new
        return removed

    def _removed(self, st: _State, arr: npt.NDArray[np.int64]) -> tuple[_State, int]:
        present = arr[st.rows_of(arr) >= 0]
        if present.size == 0:
            return st, 0
        keep = ~np.isin(st.ids.array, present)
        p = self.params
        if isinstance(p, FlatParams):
            runs: tuple[ListRun, ...] = ()
            fidx = None
        elif p.nbits == 8:
            runs = (lists.filtered(lists.concat(st.runs, p.nlist, p.code_size), present),)
            fidx = None
        else:
            runs = ()
            fidx = faiss.clone_index(st.faiss)
            fidx.remove_ids(faiss.IDSelectorBatch(present))
        vectors = None if st.vectors is None else st.vectors.take(keep)
        return _State(st.ids.take(keep), vectors, runs, fidx), int(present.size)

    # --- search --------------------------------------------------------------------------------
    def _check_searchable(self) -> Codec:
        if self._codec is None:
            raise NotTrainedError("index is not trained; call train(x) and add(x) before search")
        return self._codec

    def assign(
        self, q: npt.NDArray[np.float32], nprobe: int | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Coarse assignment: the ``nprobe`` nearest lists of each query, ``(Dq, Iq)``.

        Depends only on the codec, so shards sharing a codec share it: pass it
        to :meth:`scan` of each. ``nprobe`` defaults to ``min(16, nlist)``.
        """
        codec = self._check_searchable()
        nprobe = check_nprobe(nprobe, self.params.nlist)
        q = as_queries(q, "q", d=self.d)
        return codec.assign(q, nprobe)

    def scan(
        self,
        q: npt.NDArray[np.float32],
        k: int,
        assignment: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]],
        *,
        exclude: IdSet | npt.ArrayLike | None = None,
        ordered: bool = True,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """PQ top-``k`` of each query over its assigned lists, never returning ``exclude`` ids.

        ``assignment`` is :meth:`assign`'s result (of this codec) for the
        same queries. Scores are PQ estimates (exact for the codes), ordered
        better first, equal scores by lower id; padded with ``-1``. An empty
        index returns padding. With spilled assignment each id comes once,
        with the better score of its entries in the assigned lists.
        ``ordered=False`` may leave each row's ``k`` results in any order
        (padding last), which is cheaper for 4-bit codes: enough for
        candidates that are re-scored (:meth:`rescore`).
        """
        codec = self._check_searchable()
        k = check_k(k)
        q = as_queries(q, "q", d=self.d)
        a = check_assignment(assignment, q.shape[0], self.params.nlist)
        return self._scan(self._state, codec, q, k, a, _exclusion(exclude), ordered=ordered)

    def _scan(
        self,
        st: _State,
        codec: Codec,
        q: npt.NDArray[np.float32],
        k: int,
        assignment: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]],
        exclude: IdSet | None,
        *,
        ordered: bool = True,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        p = self.params
        if isinstance(p, FlatParams):
            assert st.vectors is not None
            return flat_scan(p, st.ids.array, st.vectors.array, q, k, exclude)
        if p.nbits == 8:
            ex = None if exclude is None else exclude.array
            return lists.scan(codec, q, k, assignment, st.runs, ex)
        return fastscan_scan(p, st.faiss, codec.rotate(q), k, assignment, exclude, ordered=ordered)

    def rescore(
        self, q: npt.NDArray[np.float32], ids: npt.ArrayLike, k: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Exact top-``k`` of each query among candidate ``ids`` held here (others skipped).

        ``ids``: shape ``(nq, m)`` (one candidate list per query) or ``(m,)``
        (the same candidates for every query); ``-1`` entries are skipped.
        Scores come from the stored vectors (:mod:`fastface.kernels.exact`);
        equal scores are ordered by lower id.
        """
        self._check_searchable()
        if self.params.store_vectors is None:
            raise ValueError(
                "rescore: this index keeps no raw vectors (store_vectors=None); create it with "
                "IVFPQParams(..., store_vectors='float16')"
            )
        k = check_k(k)
        q = as_queries(q, "q", d=self.d)
        cand = np.asarray(ids)
        flat = as_id_array(cand, "ids")
        if cand.ndim == 1:
            cand2 = np.broadcast_to(flat, (q.shape[0], flat.size))
        elif cand.ndim == 2 and cand.shape[0] == q.shape[0]:
            cand2 = flat.reshape(cand.shape)
        else:
            raise ValueError(
                f"ids: expected shape ({q.shape[0]}, m) or (m,), got {tuple(cand.shape)}"
            )
        if cand2.shape[1] > MAX_CANDIDATES:
            raise ValueError(f"ids: at most {MAX_CANDIDATES} candidates per query")
        return self._rescore(self._state, q, np.ascontiguousarray(cand2), k)

    def _rescore(
        self, st: _State, q: npt.NDArray[np.float32], cand: npt.NDArray[np.int64], k: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        from ..kernels.exact import rescore, rescore_ids

        assert st.vectors is not None
        metric = self.params.metric
        base = st.vectors.array
        rmap = st.row_map()
        if rmap is not None:  # ids -> rows inside the kernel
            lo, span, table = rmap
            return rescore_ids(q, base, cand, k, lo=lo, span=span, table=table, metric=metric)
        rows = np.ascontiguousarray(st.rows_of(cand))
        return rescore(q, base, rows, cand, k, metric=metric)

    def search(
        self,
        q: npt.NDArray[np.float32],
        k: int,
        *,
        nprobe: int | None = None,
        rerank: int | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Top-``k`` neighbours of each query: approximate, or exact among candidates.

        ``q`` is ``(nq, d)`` or one query ``(d,)`` (float16/32/64). Returns
        ``(D, I)`` shaped ``(nq, k)``: scores (inner product, larger is
        better; or squared L2, smaller is better) and ids, padded with ``-1``
        and ``-inf`` (``+inf`` for L2) where fewer than ``k`` are found; equal
        scores list the lower id first. ``nprobe`` lists are scanned per query
        (default ``min(16, nlist)``); ``k`` is at most
        :data:`fastface._validation.MAX_K`.

        With ``rerank=f`` IVF-PQ proposes the ``k * f`` best candidates per
        query and each is re-scored exactly (float32 sums) against the stored
        vectors; scores are then exact. It needs ``store_vectors`` set.
        """
        codec = self._check_searchable()
        st = self._state
        if st.n == 0:
            raise EmptyIndexError("index is empty; add(x) vectors before searching")
        k = check_k(k)
        nprobe = check_nprobe(nprobe, self.params.nlist)
        factor = check_rerank(rerank, k, self.params)
        q = as_queries(q, "q", d=self.d)
        assignment = codec.assign(q, nprobe)
        if factor is None:
            return self._scan(st, codec, q, k, assignment, None)
        _, cand = self._scan(st, codec, q, k * factor, assignment, None, ordered=False)
        return self._rescore(st, q, cand, k)

    # --- persistence ---------------------------------------------------------------------------
    def serialize(self) -> list[Any]:
        """The shard as a FAISS file (``IndexIVFPQ`` / ``IndexIVFPQFastScan``), in chunks.

        ``b"".join(index.serialize())`` is what ``faiss.serialize_index``
        writes for the same lists, and ``faiss.read_index`` reads it. With an
        HNSW coarse quantizer or an OPQ rotation, the file holds the IVF part
        over a flat quantizer, in the rotated space (the codec's
        :meth:`~fastface.index.params.Codec.ivf_twin`): :meth:`to_faiss` gives
        the whole index. A flat shard has no such file (its data are its ids
        and vectors): this raises ``ValueError``.
        """
        codec = self.codec
        st = self._state
        p = self.params
        if isinstance(p, FlatParams):
            raise ValueError("serialize: a flat shard has no FAISS file; its vectors are its data")
        if p.nbits == 4:
            return [bytes(faiss.serialize_index(st.faiss))]
        return shard_file_chunks(codec, st.runs)

    def to_gpu(
        self,
        *,
        device: str = "cuda",
        vectors: bool = True,
        vectors_on: str = "device",
        memory_budget: int | None = None,
    ) -> Any:
        """This index on a GPU: a ``fastface.gpu.GpuIVFPQ`` over the same codec, codes, ids
        and stored vectors (no retraining), searched with the same verbs.

        ``device="emulate"`` runs the same kernels on the CPU. ``vectors=False``
        leaves the stored vectors behind (no re-ranking); ``vectors_on="host"``
        streams them from pinned host memory. See ``fastface.gpu.from_cpu``.
        """
        from ..gpu import from_cpu

        return from_cpu(
            self,
            device=device,
            vectors=vectors,
            vectors_on=vectors_on,
            memory_budget=memory_budget,
        )

    def to_faiss(self) -> Any:
        """A FAISS index holding a copy of this index's codes and ids (the whole codec:
        ``IndexPreTransform`` for OPQ, ``IndexHNSWFlat`` quantizer); for a flat index an
        ``IndexIDMap2`` over an ``IndexFlat`` holding the stored vectors as float32."""
        p = self.params
        if self._codec is None:
            assert isinstance(p, IVFPQParams)
            return p.new_faiss_index()
        st = self._state
        if isinstance(p, FlatParams):
            flat: Any = faiss.IndexFlat(p.d, METRICS[p.metric])
            out: Any = faiss.IndexIDMap2(flat)
            out.own_fields = True
            flat.this.disown()
            if st.n:
                assert st.vectors is not None
                out.add_with_ids(np.ascontiguousarray(st.vectors.array, np.float32), st.ids.array)
            return out
        data = np.frombuffer(b"".join(self.serialize()), np.uint8)
        twin: Any = faiss.deserialize_index(data)
        if p.plain:
            return twin
        full = self._codec.faiss_index()
        inner: Any = faiss.downcast_index(full.index) if p.opq is not None else full
        inner.replace_invlists(twin.invlists, True)
        twin.own_invlists = False
        inner.ntotal = twin.ntotal
        full.ntotal = twin.ntotal
        return full

    def save(self, path: str | Path, *, file_mode: int = 0o600) -> None:
        """Write the index to ``path``, its raw vectors beside it, and a checksummed record.

        Files: ``path`` (FAISS format: the shard file, see :meth:`serialize`;
        a flat index's codec), ``path.codec.faiss`` (the whole codec, when it
        has an HNSW quantizer or an OPQ rotation), ``path.ids.npy`` (flat:
        ids in row order), ``path.vectors.npy`` (when vectors are stored) and
        ``path.json`` (sizes and SHA-256 of all, written last). Each is written
        atomically, created with ``file_mode`` (owner-only by default); a
        crash leaves an old record that no longer matches the new data
        (detected on load), never a silent mix.
        """
        path = Path(path)
        st = self._state
        p = self.params
        flat = isinstance(p, FlatParams)
        if flat:
            rec = storage.atomic_write(path, [self.codec.to_bytes()], mode=file_mode)
        else:
            rec = storage.atomic_write(path, self.serialize(), mode=file_mode)
        meta: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "params": p.to_dict(),
            "ntotal": st.n,
            "data": rec,
        }
        if not p.plain:
            meta["codec"] = storage.atomic_write(
                path.with_name(path.name + ".codec.faiss"), [self.codec.to_bytes()], mode=file_mode
            )
        if flat:
            meta["ids"] = storage.atomic_write_npy(
                path.with_name(path.name + ".ids.npy"), st.ids.array, mode=file_mode
            )
        if st.vectors is not None:
            # load() takes the ids from the lists, in list order: store vectors in that order
            order = st.ids.array if flat else _list_order_ids(p, st)
            rows = st.rows_of(order)
            meta["vectors"] = storage.atomic_write_npy(
                path.with_name(vectors_file_name(path)), st.vectors.array[rows], mode=file_mode
            )
        storage.atomic_write_json(
            path.with_name(path.name + ".json"), storage.seal(meta), mode=file_mode
        )

    @classmethod
    def load(cls, path: str | Path, *, mmap: bool = False) -> IVFPQIndex:
        """Read an index written by :meth:`save`, verifying checksums and the FAISS headers.

        With ``mmap=True`` the codes stay in the file (memory-mapped) and the
        index is read-only. Stored raw vectors are always memory-mapped.
        """
        from .params import params_from_dict

        path = Path(path)
        meta_path = path.with_name(path.name + ".json")
        if not path.exists() and not meta_path.exists():
            raise FileNotFoundError(f"{path}: no such index file")
        meta = storage.read_manifest(meta_path, kind=FORMAT, max_version=FORMAT_VERSION)
        try:
            params = params_from_dict(meta["params"])
            ntotal = meta["ntotal"]
            if isinstance(ntotal, bool) or not isinstance(ntotal, int) or ntotal < 0:
                raise ValueError(f"ntotal {ntotal!r}")
            extra = set(meta) - {"format", "format_version", "params", "ntotal", "data", "checksum"}
            want = {"vectors"} if params.store_vectors is not None else set()
            if not params.plain:
                want.add("codec")
            if isinstance(params, FlatParams):
                want.add("ids")
            if extra != want:
                raise ValueError(f"records {sorted(extra)}, expected {sorted(want)}")
            data_rec = storage.check_record(dict(meta["data"], file=path.name), "data")
            recs = {
                "codec": path.name + ".codec.faiss",
                "ids": path.name + ".ids.npy",
                "vectors": vectors_file_name(path),
            }
            extra_recs = {
                k: storage.check_record(dict(meta[k], file=recs[k]), k) for k in sorted(want)
            }
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptIndexError(f"{meta_path}: bad record ({e})", str(meta_path)) from e
        data = storage.open_verified(path.parent, data_rec, in_memory=not mmap)
        vectors = None
        if "vectors" in extra_recs:
            vfile = storage.open_verified(path.parent, extra_recs["vectors"])
            vectors = storage.npy_array(
                vfile, STORE_DTYPES[params.store_vectors or "float32"], (ntotal, params.d)
            )
        if isinstance(params, FlatParams):
            codec = read_codec(params, data)
            ids_vf = storage.open_verified(path.parent, extra_recs["ids"], in_memory=True)
            ids = storage.npy_array(ids_vf, np.int64, (ntotal,), mmap=False)
            check_unique_ids(ids, ids_vf.path)
            return cls.from_parts(codec, ids, vectors=vectors, read_only=mmap)
        shared = None
        if "codec" in extra_recs:
            shared = read_codec(
                params, storage.open_verified(path.parent, extra_recs["codec"], in_memory=True)
            )
        return load_shard(params, shared, data, vectors, ntotal=ntotal, ids=None, read_only=mmap)


# --- helpers shared with sharded.py ---------------------------------------------------------------


def consecutive_ids(start: int, n: int) -> npt.NDArray[np.int64]:
    """Ids ``start .. start + n - 1``; raises ``OverflowError`` past int64."""
    if start + n - 1 > np.iinfo(np.int64).max:
        raise OverflowError(
            f"ids: automatic ids {start}..{start + n - 1} would pass the largest int64 "
            "(2**63 - 1); pass explicit ids"
        )
    return np.arange(start, start + n, dtype=np.int64)


def train_codec(
    params: CodecParams,
    x: Any,
    *,
    max_points: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Codec:
    """Train a codec on a sample of ``x`` (at most ``max_points`` rows, default
    :func:`~fastface.index.train.default_train_size`)."""
    from .train import default_train_size

    if isinstance(params, FlatParams):
        return Codec.flat(params)
    need = max(params.nlist, 2**params.nbits)
    if max_points is not None:
        max_points = check_positive_int(max_points, "max_points")
    limit = max_points if max_points is not None else default_train_size(params)
    if isinstance(x, np.ndarray) and x.ndim == 2 and x.shape[0] > limit:
        n = x.shape[0]
        rows = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
        x = np.asarray(x[rows])
    x = as_vectors(x, "x", d=params.d)
    if x.shape[0] < need:
        raise ValueError(
            f"x: training needs at least {need} vectors (nlist={params.nlist}, "
            f"2**nbits={2**params.nbits}), got {x.shape[0]}; pass more data or lower nlist"
        )
    return Codec.train(params, x, seed=seed, progress=progress)


def read_codec(params: CodecParams, vf: storage.VerifiedFile) -> Codec:
    """A codec from its verified FAISS file, every header field checked before FAISS reads it."""
    buf = vf.array()
    if isinstance(params, FlatParams):
        faiss_format.parse_flat(buf, vf.name).check(params, ntotal=0)
        return Codec.flat(params)
    layout = faiss_format.parse(buf, vf.name)
    layout.check(params, ntotal=0, buf=buf)
    return Codec(params, faiss.deserialize_index(np.array(buf)))


def check_unique_ids(ids: npt.NDArray[np.int64], where: str) -> None:
    """Raise CorruptIndexError unless ``ids`` are non-negative and unique."""
    srt = np.sort(ids)
    if srt.size and (int(srt[0]) < 0 or bool((srt[1:] == srt[:-1]).any())):
        raise CorruptIndexError(f"{where}: duplicate or negative ids", where, "ids")


def _settle_runs(runs: list[ListRun], nlist: int, code_size: int) -> tuple[ListRun, ...]:
    """Merge the newest runs while the last is at least half the one before (few runs, each
    entry copied O(log n) times); at most ``_MAX_RUNS`` runs."""
    runs = [r for r in runs if r.n] or runs[:1]
    while len(runs) >= 2 and (2 * runs[-1].n >= runs[-2].n or len(runs) > _MAX_RUNS):
        merged = lists.concat(runs[-2:], nlist, code_size)
        runs = [*runs[:-2], merged]
    return tuple(runs)


def shard_file_chunks(codec: Codec, runs: Iterable[ListRun]) -> list[Any]:
    """An 8-bit shard as a FAISS ``IwPQ`` file, in chunks: header, lists head, list data."""
    p = codec.params
    run_t = tuple(runs)
    prefix, lists_off = codec_prefix(codec)
    count = (
        np.sum([r.count for r in run_t], axis=0).astype(np.int64)
        if run_t
        else np.zeros(p.nlist, np.int64)
    )
    ntotal = int(count.sum())
    head, codes_at, ids_at, total = faiss_format.ilar_section(p.nlist, p.code_size, count)
    data = np.empty(total, np.uint8)
    acc = np.zeros(p.nlist, np.int64)
    from .. import _native

    for r in run_t:
        _native.copy_segments(
            r.codes, data, r.codes_off, codes_at + acc * p.code_size, r.count * p.code_size
        )
        _native.copy_segments(r.ids, data, r.ids_off, ids_at + acc * 8, r.count * 8)
        acc = acc + r.count
    header = bytearray(prefix[:lists_off])
    header[8:16] = int(ntotal).to_bytes(8, "little", signed=True)
    return [bytes(header), head, data]


def codec_prefix(codec: Codec) -> tuple[bytes, int]:
    """What a shard file of this codec starts with, and where its (empty) lists section starts.

    The codec's IVF part over a flat coarse quantizer, in the rotated space
    (:meth:`Codec.twin_bytes`): shard files are plain ``IndexIVFPQ`` files.
    """
    raw = codec.twin_bytes()
    return raw, faiss_format.parse(raw, "codec").lists_off


def _check_faiss_kind(params: IVFPQParams, index: Any) -> Any:
    """The IVF part of a FAISS index of the kind ``params`` name (TypeError otherwise)."""
    inner = index
    is_pt = type(index).__name__ == "IndexPreTransform"
    if params.opq is not None:
        if not is_pt or index.chain.size() != 1:
            raise TypeError(
                f"index: params {params.spec!r} name an OPQ rotation: expected a "
                f"faiss.IndexPreTransform of one rotation, got {type(index).__name__}"
            )
        inner = faiss.downcast_index(index.index)
    elif is_pt:
        raise TypeError(
            f"index: a faiss.IndexPreTransform (a rotation) needs params with opq=M; "
            f"{params.spec!r} has none"
        )
    want = faiss.IndexIVFPQFastScan if params.nbits == 4 else faiss.IndexIVFPQ
    if type(inner) is not want:
        raise TypeError(
            f"index: expected a faiss.{want.__name__} for nbits={params.nbits}, got "
            f"{type(inner).__name__}"
        )
    quantizer = faiss.downcast_index(inner.quantizer)
    want_q = (
        faiss.IndexHNSWFlat
        if params.coarse_hnsw is not None
        else faiss.IndexIVFFlat
        if params.coarse_ivf is not None
        else faiss.IndexFlat
    )
    if not isinstance(quantizer, want_q):
        raise TypeError(
            f"index: expected a faiss.{want_q.__name__} coarse quantizer for {params.spec!r}, got "
            f"{type(quantizer).__name__}"
        )
    return inner


class _CoarseFromCodec:
    """While active, ``fidx`` (a private fast-scan copy) assigns with the codec's quantizer."""

    def __init__(self, fidx: Any, codec: Codec) -> None:
        self.fidx = fidx
        self.codec = codec
        self.saved: Any = None

    def __enter__(self) -> Any:
        if not self.codec.params.coarse_flat:  # type: ignore[union-attr]
            self.saved = self.fidx.quantizer
            self.fidx.quantizer = self.codec.coarse_quantizer()
        return self.fidx

    def __exit__(self, *exc: Any) -> None:
        if self.saved is not None:
            self.fidx.quantizer = self.saved


def flat_scan(
    params: CodecParams,
    ids: npt.NDArray[np.int64],
    vectors: npt.NDArray[Any],
    q: npt.NDArray[np.float32],
    k: int,
    exclude: IdSet | None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Exact top-``k`` of every stored vector (a flat shard): blocks of BLAS scores
    (:func:`fastface.kernels.exact.scores`), exact under (better score, lower id)."""
    from .._native import merge_topk
    from ..kernels.exact import scores

    nq = q.shape[0]
    larger = params.larger_is_better
    pad = params.pad_score
    D = np.full((nq, k), pad, np.float32)
    I = np.full((nq, k), -1, np.int64)
    n = ids.size
    block = max(1024, (1 << 24) // max(nq, 1))  # at most 64 MiB of scores at once
    for s in range(0, n, block):
        S = scores(q, vectors[s : s + block], params.metric)
        bid = ids[s : s + block]
        if exclude is not None:
            bid = np.where(exclude.contains(bid), -1, bid)
        Db, Ib = _block_topk(S, bid, k, larger)
        D, I = merge_topk(np.stack([D, Db]), np.stack([I, Ib]), k, larger_is_better=larger)
    return D, I


def _block_topk(
    S: npt.NDArray[np.float32], ids: npt.NDArray[np.int64], k: int, larger: bool
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Best ``k`` per row of ``S`` (columns ``ids``, -1 skipped), ties at the k-th by lower id,
    padded to ``k`` columns."""
    from ..kernels.exact import topk

    m = S.shape[1]
    pad = -np.inf if larger else np.inf
    kk = min(k, m)
    key = -S if larger else S.copy()
    key[:, ids < 0] = np.inf
    part = np.argpartition(key, kk - 1, axis=1)[:, :kk]
    kth = np.take_along_axis(key, part, 1).max(axis=1)
    # rows where entries tie with the k-th are settled by the full (score, id) order
    ties = (key <= kth[:, None]).sum(axis=1) > kk
    I = ids[part]
    D = np.take_along_axis(S, part, 1).astype(np.float32)
    missing = np.take_along_axis(key, part, 1) == np.inf
    I[missing] = -1
    D[missing] = pad
    if ties.any():
        Dt, It = topk(S[ties], ids, kk, larger_is_better=larger)
        D[ties], I[ties] = Dt, It
    if kk < k:
        D = np.pad(D, ((0, 0), (0, k - kk)), constant_values=pad)
        I = np.pad(I, ((0, 0), (0, k - kk)), constant_values=-1)
    return np.ascontiguousarray(D), np.ascontiguousarray(I)


def _list_order_ids(params: CodecParams, st: _State) -> npt.NDArray[np.int64]:
    """The ids in the order :meth:`IVFPQIndex.load` takes them: list order, each id where
    it first appears."""
    if params.nbits == 8:
        ids = lists.list_ids(st.runs, params.nlist)
    else:
        data = np.frombuffer(bytes(faiss.serialize_index(st.faiss)), np.uint8)
        ids = _fastscan_ids(data, faiss_format.parse(data, "index"))
    return ids if params.max_copies == 1 else row_order_ids(ids, params.max_copies)


def row_order_ids(list_ids: npt.NDArray[np.int64], copies: int) -> npt.NDArray[np.int64]:
    """The vectors' ids from their list entries: each id where it first appears.

    Raises ``ValueError`` unless every id is non-negative and appears exactly
    ``copies`` times.
    """
    return _row_order_ids(list_ids, copies)[0]


def _row_order_ids(
    list_ids: npt.NDArray[np.int64], copies: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """:func:`row_order_ids` and the ids sorted (one sort for both)."""
    if copies == 1:
        srt = np.sort(list_ids)
        if srt.size and (int(srt[0]) < 0 or bool((srt[1:] == srt[:-1]).any())):
            raise ValueError("duplicate or negative ids")
        return list_ids, srt
    order = np.argsort(list_ids, kind="stable")
    srt = list_ids[order]
    if srt.size % copies:
        raise ValueError(f"{srt.size} list entries for ids each stored {copies} times")
    groups = srt.reshape(-1, copies)
    if groups.size and (
        int(srt[0]) < 0
        or bool((groups != groups[:, :1]).any())
        or bool((groups[1:, 0] == groups[:-1, 0]).any())
    ):
        raise ValueError(f"ids must each be stored exactly {copies} times, none negative")
    first = np.sort(order.reshape(-1, copies)[:, 0])  # first entry of each id, in list order
    return list_ids[first], groups[:, 0]


def _fastscan_ids(
    data: npt.NDArray[np.uint8], layout: faiss_format.IVFPQLayout
) -> npt.NDArray[np.int64]:
    parts = [
        np.frombuffer(data, np.int64, int(n), int(off))
        for n, off in zip(layout.sizes, layout.ids_off, strict=True)
        if n
    ]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def fastscan_scan(
    params: IVFPQParams,
    fidx: Any,
    q: npt.NDArray[np.float32],
    k: int,
    assignment: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]],
    exclude: IdSet | None,
    *,
    ordered: bool = True,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """FAISS fast-scan over the assigned lists; rows re-sorted by (score, lower id) unless
    ``ordered`` is false (FAISS's order: equal scores in scan order)."""
    from .._native import merge_topk

    nq = q.shape[0]
    if fidx.ntotal == 0:
        return (
            np.full((nq, k), params.pad_score, np.float32),
            np.full((nq, k), -1, np.int64),
        )
    Dq, Iq = assignment
    sp = faiss.SearchParametersIVF()
    sp.nprobe = Iq.shape[1]
    if exclude is not None:
        sp.sel = exclude.faiss_selector()  # kept alive by the IdSet
    D = np.empty((nq, k), np.float32)
    I = np.empty((nq, k), np.int64)
    fidx.search_preassigned_c(
        nq,
        faiss.swig_ptr(q),
        k,
        faiss.swig_ptr(Iq),
        faiss.swig_ptr(Dq),
        faiss.swig_ptr(D),
        faiss.swig_ptr(I),
        False,
        sp,
    )
    if not ordered:
        return D, I
    # FAISS keeps equal scores in scan order: the one merge puts the lower id first
    return merge_topk(D[None], I[None], k, larger_is_better=params.larger_is_better)


def vectors_file_name(path: Path) -> str:
    return path.name + ".vectors.npy"


def load_shard(
    params: CodecParams,
    codec: Codec | None,
    data: storage.VerifiedFile,
    vectors: npt.NDArray[Any] | None,
    *,
    ntotal: int,
    ids: npt.NDArray[np.int64] | None,
    read_only: bool = False,
) -> IVFPQIndex:
    """An index from a verified FAISS file (its header checked here before any parsing by FAISS).

    ``codec``: the shared codec (``None``: taken from the file). ``ids``: the
    row order (``None``: the lists' order). 8-bit codes are scanned in place
    from the file's buffer (in memory or mapped, as ``data`` holds it).
    """
    if not isinstance(params, IVFPQParams):
        raise TypeError("load_shard: a flat shard has no shard file; use from_parts")
    buf = data.array()
    layout = faiss_format.parse(buf, data.name)
    # a shard file holds the codec's IVF part over a flat quantizer, never a rotation;
    # it counts list entries: two per vector with spilled assignment
    file_params = dataclasses.replace(params, coarse_hnsw=None, coarse_ivf=None, opq=None)
    layout.check(file_params, ntotal=ntotal * params.max_copies, buf=buf if codec is None else None)
    if codec is None:
        if not params.plain:
            raise ValueError("load_shard: an OPQ/HNSW shard needs its codec")
        codec = Codec(params, faiss.deserialize_index(_codec_bytes(buf, layout, params)))
    else:  # a shard file embeds its codec: it must be the index's
        raw, off = codec_prefix(codec)
        # all but ntotal [8:16] and FAISS's default nprobe [45:53]
        if layout.lists_off != off or any(
            buf[a:b].tobytes() != raw[a:b] for a, b in ((0, 8), (16, 45), (53, off))
        ):
            raise CorruptIndexError(
                f"{data.path}: its codec differs from the index's codec file", data.path, "codec"
            )
    if params.nbits == 8:
        run = ListRun.from_layout(buf, layout)
        list_ids = run.list_ids()
        fidx = None
        runs: tuple[ListRun, ...] | None = (run,)
    else:
        fidx = faiss.deserialize_index(np.asarray(buf))
        list_ids = _fastscan_ids(buf, layout)
        runs = None
    try:
        first, srt = _row_order_ids(list_ids, params.max_copies)
    except ValueError as e:
        raise CorruptIndexError(f"{data.path}: {e}", data.path, "ids") from None
    if ids is None:
        ids = first
    elif ids.size != srt.size or not np.array_equal(np.sort(ids), srt):
        raise CorruptIndexError(
            f"{data.path}: its lists hold other ids than its ids file", data.path, "ids"
        )
    return IVFPQIndex.from_parts(
        codec, ids, runs=runs, faiss_index=fidx, vectors=vectors, read_only=read_only
    )


def _codec_bytes(
    buf: Any, layout: faiss_format.IVFPQLayout, params: IVFPQParams
) -> npt.NDArray[np.uint8]:
    """The file's header with empty lists: the codec alone, for FAISS to read (checked first)."""
    head = bytearray(bytes(memoryview(buf)[: layout.lists_off]))
    head[8:16] = (0).to_bytes(8, "little")
    if params.nbits == 8:
        tail, _, _, _ = faiss_format.ilar_section(
            params.nlist, params.code_size, np.zeros(params.nlist, np.int64)
        )
        out = bytes(head) + tail
    else:
        # an empty block-lists section: nlist, code_size marker, per-block, block size, empty lists
        lists_part = bytes(memoryview(buf)[layout.lists_off : layout.lists_off + 4 + 32])
        empty = (0).to_bytes(8, "little") * 2 * params.nlist
        out = bytes(head) + lists_part + empty
    faiss_format.parse(out, "codec").check(params, ntotal=0)
    return np.frombuffer(out, np.uint8)
