"""One IVF-PQ shard, with FAISS as the CPU engine."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import numpy.typing as npt

from .._validation import as_ids, check_k, check_matrix, check_positive_int
from ..errors import (
    CorruptIndexError,
    EmptyIndexError,
    NotTrainedError,
    ReadOnlyIndexError,
)
from . import storage
from .vectors import STORE_DTYPES, VectorStore, check_storable

__all__ = ["IVFPQIndex", "IVFPQParams"]

FORMAT_VERSION = 1
_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


@dataclass(frozen=True)
class IVFPQParams:
    """Parameters of an IVF-PQ codec.

    Parameters
    ----------
    d : int
        Vector dimension.
    nlist : int
        Number of inverted lists (coarse k-means centroids).
    M : int
        Number of PQ sub-quantizers; must divide ``d``.
    nbits : {8, 4}
        Bits per sub-quantizer code; 4 selects FAISS's fast-scan layout.
    metric : {"ip", "l2"}
        Inner product (the face metric, on unit vectors) or squared L2.
    store_vectors : {"float16", "float32", None}
        Keep the raw vectors beside the codes, in this precision, for exact
        re-ranking (``search(..., rerank=f)``) and :func:`fastface.dedup`.
        ``None`` keeps only the PQ codes, like a plain FAISS ``IndexIVFPQ``.
        A record written before this option existed reads as ``None``.

    Examples
    --------
    >>> IVFPQParams(512, 1024, 64).nbits
    8
    >>> IVFPQParams(512, 1024, 60)
    Traceback (most recent call last):
    ...
    ValueError: M=60 must divide d=512; pick one of 1, 2, 4, 8, 16, 32, 64, 128, 256, 512
    """

    d: int
    nlist: int
    M: int
    _: KW_ONLY
    nbits: int = 8
    metric: Literal["ip", "l2"] = "ip"
    store_vectors: Literal["float16", "float32"] | None = "float16"

    def __post_init__(self) -> None:
        check_positive_int(self.d, "d")
        check_positive_int(self.nlist, "nlist")
        check_positive_int(self.M, "M")
        if self.d % self.M:
            divisors = ", ".join(str(m) for m in range(1, self.d + 1) if self.d % m == 0)
            raise ValueError(f"M={self.M} must divide d={self.d}; pick one of {divisors}")
        if self.nbits not in (4, 8):
            raise ValueError(f"nbits must be 8 or 4 (fast-scan), got {self.nbits!r}")
        if self.metric not in _METRICS:
            raise ValueError(f"metric must be 'ip' or 'l2', got {self.metric!r}")
        if self.store_vectors is not None and self.store_vectors not in STORE_DTYPES:
            raise ValueError(
                f"store_vectors must be 'float16', 'float32' or None, got {self.store_vectors!r}"
            )

    @property
    def larger_is_better(self) -> bool:
        return self.metric == "ip"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> IVFPQParams:
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in obj.items() if k in fields}
        kw.setdefault("store_vectors", None)  # written before vectors were stored
        return cls(**kw)

    def new_faiss_index(self) -> Any:
        metric = _METRICS[self.metric]
        quantizer: Any = (
            faiss.IndexFlatIP(self.d) if self.metric == "ip" else faiss.IndexFlatL2(self.d)
        )
        index: Any
        if self.nbits == 4:
            index = faiss.IndexIVFPQFastScan(quantizer, self.d, self.nlist, self.M, 4, metric)
        else:
            index = faiss.IndexIVFPQ(quantizer, self.d, self.nlist, self.M, 8, metric)
        index.own_fields = True
        quantizer.this.disown()
        return index


def _pad_value(params: IVFPQParams) -> float:
    return float("-inf") if params.larger_is_better else float("inf")


def _invlist_ids(index: Any) -> npt.NDArray[np.int64]:
    """All ids stored in an IVF index's inverted lists (list order)."""
    invlists = index.invlists
    parts = []
    for lst in range(index.nlist):
        n = invlists.list_size(lst)
        if n:
            ptr = invlists.get_ids(lst)
            parts.append(faiss.rev_swig_ptr(ptr, n).copy())
            invlists.release_ids(lst, ptr)
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


class IVFPQIndex:
    """One IVF-PQ shard: FAISS ``IndexIVFPQ`` (or its fast-scan twin) with ids.

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
    """

    def __init__(self, params: IVFPQParams, *, _faiss_index: Any = None) -> None:
        if not isinstance(params, IVFPQParams):
            raise TypeError(f"params: expected IVFPQParams, got {type(params).__name__}")
        self.params = params
        self._index = params.new_faiss_index() if _faiss_index is None else _faiss_index
        self._ids = np.empty(0, np.int64)  # row order: the order vectors were added
        self._ids_sorted: npt.NDArray[np.int64] | None = np.empty(0, np.int64)
        self._id_rows: npt.NDArray[np.int64] | None = np.empty(0, np.int64)
        self._dense_rows: npt.NDArray[np.int64] | None = None
        self._store = VectorStore(params.store_vectors, params.d) if params.store_vectors else None
        self._read_only = False

    # --- state -------------------------------------------------------------------------------
    @property
    def d(self) -> int:
        return self.params.d

    @property
    def ntotal(self) -> int:
        """Number of searchable vectors (hidden ones excluded)."""
        return int(self._index.ntotal)

    @property
    def n_rows(self) -> int:
        """Number of stored rows: ``ntotal`` plus rows hidden by :meth:`hide`."""
        return int(self._ids.size)

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    @property
    def ids(self) -> npt.NDArray[np.int64]:
        """Ids of the stored vectors, in the order they were added (read-only view)."""
        view = self._ids.view()
        view.flags.writeable = False
        return view

    @property
    def vectors(self) -> npt.NDArray[Any] | None:
        """The stored raw vectors in row order (``ids`` order), read-only; ``None`` if not kept.

        A memory map for an index loaded from disk: indexing it reads only the rows asked for.
        """
        if self._store is None:
            return None
        view = self._store.array.view()
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        p = self.params
        return (
            f"IVFPQIndex(d={p.d}, nlist={p.nlist}, M={p.M}, nbits={p.nbits}, metric={p.metric!r}, "
            f"ntotal={self.ntotal}, is_trained={self.is_trained})"
        )

    def contains(self, ids: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Boolean mask: which of ``ids`` are stored here."""
        arr = np.asarray(ids, dtype=np.int64)
        srt = self._sorted_ids()
        if srt.size == 0:  # nothing stored (indexing srt below would fail)
            return np.zeros(arr.shape, bool)
        pos = np.searchsorted(srt, arr)
        pos[pos >= srt.size] = 0
        return srt[pos] == arr

    def _sorted_ids(self) -> npt.NDArray[np.int64]:
        if self._ids_sorted is None:
            order = np.argsort(self._ids, kind="stable")
            self._ids_sorted = self._ids[order]
            self._id_rows = order.astype(np.int64, copy=False)
            self._dense_rows = None
        return self._ids_sorted

    def _rows_of(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Row of each id in the stored order, ``-1`` for ``-1`` or unknown ids.

        Ids spanning at most ``2 * ntotal`` values (the usual case: ids handed
        out in order) use a dense table, one gather; others binary search.
        """
        srt = self._sorted_ids()
        assert self._id_rows is not None
        if srt.size == 0:
            return np.full(ids.shape, -1, np.int64)
        lo, span = int(srt[0]), int(srt[-1]) - int(srt[0]) + 1
        if span <= 2 * srt.size + 1024:
            if self._dense_rows is None:
                table = np.full(span, -1, np.int64)
                table[srt - lo] = self._id_rows
                self._dense_rows = table
            off = ids - lo
            inside = (off >= 0) & (off < span)
            return np.where(inside, self._dense_rows[np.where(inside, off, 0)], -1)
        pos = np.searchsorted(srt, ids)
        np.minimum(pos, srt.size - 1, out=pos)
        return np.where(srt[pos] == ids, self._id_rows[pos], -1)

    def _check_writable(self) -> None:
        if self._read_only:
            raise ReadOnlyIndexError(
                "this index was loaded with mmap=True and is read-only; load it with "
                "mmap=False to change it"
            )

    # --- train / add ---------------------------------------------------------------------------
    def train(
        self, x: npt.NDArray[np.float32], *, max_points: int | None = None, seed: int = 0
    ) -> None:
        """Train the coarse quantizer and the PQ codebooks (FAISS k-means) on ``x``.

        At most ``max_points`` rows (default ``256 * nlist``, at least 65536) are
        used, sampled without replacement with ``seed``; ``x`` may be a memory map.
        """
        self._check_writable()
        if self.is_trained:
            raise RuntimeError("index is already trained; create a new IVFPQIndex to retrain")
        need = max(self.params.nlist, 2**self.params.nbits)
        limit = max_points if max_points is not None else max(256 * self.params.nlist, 65536)
        if isinstance(x, np.ndarray) and x.ndim == 2 and x.shape[0] > limit:
            n = x.shape[0]
            rows = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
            x = np.asarray(x[rows])
        x = check_matrix(x, "x", d=self.d)
        if x.shape[0] < need:
            raise ValueError(
                f"x: training needs at least {need} vectors (nlist={self.params.nlist}, "
                f"2**nbits={2**self.params.nbits}), got {x.shape[0]}; pass more data or "
                "lower nlist"
            )
        self._index.cp.seed = seed
        self._index.pq.cp.seed = seed
        self._index.train(x)

    def add(
        self,
        x: npt.NDArray[np.float32],
        ids: npt.ArrayLike | None = None,
        *,
        batch_size: int = 65536,
    ) -> npt.NDArray[np.int64]:
        """Add vectors, in batches of ``batch_size`` rows; returns their ids.

        Without ``ids`` the vectors get consecutive ids after the largest one
        stored. Ids must be unique across the index.
        """
        self._check_writable()
        if not self.is_trained:
            raise NotTrainedError("index is not trained; call train(x) before add(x)")
        x = check_matrix(x, "x", d=self.d, allow_empty=True)
        check_storable(x, self.params.store_vectors)
        n = x.shape[0]
        if ids is None:
            start = int(self._ids.max()) + 1 if self._ids.size else 0
            id_arr = np.arange(start, start + n, dtype=np.int64)
        else:
            id_arr = as_ids(ids, n)
            taken = self.contains(id_arr)
            if taken.any():
                raise ValueError(
                    f"ids: {int(taken.sum())} id(s) already in the index, e.g. "
                    f"{int(id_arr[taken][0])}; remove them first or pass new ids"
                )
        self._add_checked(x, id_arr, batch_size)
        return id_arr

    def _add_checked(
        self, x: npt.NDArray[np.float32], ids: npt.NDArray[np.int64], batch_size: int
    ) -> None:
        batch_size = check_positive_int(batch_size, "batch_size")
        for s in range(0, x.shape[0], batch_size):
            self._index.add_with_ids(x[s : s + batch_size], ids[s : s + batch_size])
        if ids.size:
            self._ids = np.concatenate([self._ids, ids])
            self._ids_sorted = None
            if self._store is not None:
                self._store.append(x)

    # --- search -------------------------------------------------------------------------------
    def _check_nprobe(self, nprobe: int | None) -> int:
        if nprobe is None:
            return min(16, self.params.nlist)
        nprobe = check_positive_int(nprobe, "nprobe")
        if nprobe > self.params.nlist:
            raise ValueError(
                f"nprobe={nprobe} exceeds nlist={self.params.nlist}; pass nprobe <= nlist "
                "(nprobe=nlist scans every list)"
            )
        return nprobe

    def search(
        self,
        q: npt.NDArray[np.float32],
        k: int,
        *,
        nprobe: int | None = None,
        rerank: int | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Top-``k`` neighbours of each row of ``q``: approximate, or exact among candidates.

        Returns ``(D, I)`` shaped ``(nq, k)``: scores (inner product, larger is
        better; or squared L2, smaller is better) and ids, padded with ``-1``
        and ``-inf`` (``+inf`` for L2) where fewer than ``k`` are found.
        ``nprobe`` lists are scanned per query (default ``min(16, nlist)``).

        With ``rerank=f`` IVF-PQ proposes ``k * f`` candidates per query and
        each is re-scored exactly (float32 sums) against the stored vectors;
        scores are then exact and equal scores list the lower id first. It
        needs an index created with ``store_vectors`` set.
        """
        if not self.is_trained:
            raise NotTrainedError("index is not trained; call train(x) and add(x) before search")
        if self.ntotal == 0:
            raise EmptyIndexError("index is empty; add(x) vectors before searching")
        k = check_k(k)
        nprobe = self._check_nprobe(nprobe)
        factor = self._check_rerank(rerank)
        q = check_matrix(q, "q", d=self.d)
        if factor is None:
            return self._search(q, k, nprobe, None)
        _, cand = self._search(q, k * factor, nprobe, None)
        return self._rerank(q, cand, k)

    def _check_rerank(self, rerank: int | None) -> int | None:
        if rerank is None:
            return None
        if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)):
            raise TypeError(f"rerank: expected an int >= 1 or None, got {type(rerank).__name__}")
        if rerank < 1:
            raise ValueError(
                f"rerank: expected an int >= 1 (candidates per result), got {rerank}; pass "
                "rerank=None to skip re-ranking"
            )
        if self._store is None:
            raise ValueError(
                "rerank: this index keeps no raw vectors (store_vectors=None); create it with "
                "IVFPQParams(..., store_vectors='float16') to re-rank"
            )
        return int(rerank)

    def _rerank(
        self, q: npt.NDArray[np.float32], cand: npt.NDArray[np.int64], k: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Exact top-``k`` of candidate ids ``cand`` (``-1`` skipped); no validation."""
        from ..kernels.rerank import rerank_f16, rerank_f32

        assert self._store is not None
        rows = self._rows_of(cand)
        D = np.full((q.shape[0], k), _pad_value(self.params), np.float32)
        I = np.full((q.shape[0], k), -1, np.int64)
        l2 = self.params.metric == "l2"
        base = self._store.array
        if base.dtype == np.float16:
            rerank_f16(q, base.view(np.uint16), rows, cand, l2, D, I)
        else:
            rerank_f32(q, base, rows, cand, l2, D, I)
        return D, I

    def _search(
        self,
        q: npt.NDArray[np.float32],
        k: int,
        nprobe: int,
        exclude: Any,
        coarse: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]] | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Search without validation; ``exclude`` drops ids inside the scan.

        ``coarse`` is a precomputed ``(Dq, Iq)`` coarse assignment (``nq x nprobe``)
        from a quantizer equal to this index's: shards that share one codec
        quantize each query once instead of once per shard.
        """
        nq = q.shape[0]
        if self.ntotal == 0:
            D = np.full((nq, k), _pad_value(self.params), np.float32)
            return D, np.full((nq, k), -1, np.int64)
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        if exclude is not None:
            params.sel = exclude
        if coarse is None:
            D, I = self._index.search(q, k, params=params)
        else:
            Dq, Iq = coarse
            D = np.empty((nq, k), np.float32)
            I = np.empty((nq, k), np.int64)
            self._index.search_preassigned_c(
                nq,
                faiss.swig_ptr(q),
                k,
                faiss.swig_ptr(Iq),
                faiss.swig_ptr(Dq),
                faiss.swig_ptr(D),
                faiss.swig_ptr(I),
                False,
                params,
            )
        missing = I < 0
        if missing.any():
            D[missing] = _pad_value(self.params)
        return D, I

    # --- remove -------------------------------------------------------------------------------
    def remove(self, ids: npt.ArrayLike) -> int:
        """Remove vectors by id; returns how many were removed (unknown ids are ignored)."""
        self._check_writable()
        arr = np.unique(np.asarray(ids, dtype=np.int64).ravel())
        present = arr[self.contains(arr)]
        if present.size == 0:
            return 0
        # hidden rows are already gone from the lists; the count is of stored rows
        self._index.remove_ids(faiss.IDSelectorBatch(present))
        removed = int(present.size)
        keep = ~np.isin(self._ids, present)
        self._ids = self._ids[keep]
        self._ids_sorted = None
        if self._store is not None:
            self._store.keep(keep)
        return removed

    def hide(self, ids: npt.ArrayLike) -> int:
        """Drop ``ids`` from the in-memory inverted lists only; returns how many were hidden.

        The rows (ids, stored vectors) stay, so the index still matches the
        files it was loaded from, and search costs what it costs without the
        hidden vectors (no filter in the scan). :meth:`remove` later drops the
        rows too. Not available on a memory-mapped index.
        """
        if self._read_only:
            raise ReadOnlyIndexError("a memory-mapped index cannot hide vectors in memory")
        arr = np.unique(np.asarray(ids, dtype=np.int64).ravel())
        if arr.size == 0:
            return 0
        return int(self._index.remove_ids(faiss.IDSelectorBatch(arr)))

    # --- persistence --------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        return bytes(faiss.serialize_index(self._index))

    @classmethod
    def from_faiss(
        cls,
        params: IVFPQParams,
        index: Any,
        ids: Iterable[int] | None = None,
        vectors: npt.NDArray[Any] | None = None,
    ) -> IVFPQIndex:
        """Wrap a filled FAISS index; ``vectors`` are its raw vectors in ``ids`` order.

        With ``params.store_vectors`` set, ``vectors`` is required unless the index is empty.
        """
        obj = cls(params, _faiss_index=index)
        obj._ids = _invlist_ids(index) if ids is None else np.asarray(ids, dtype=np.int64)
        obj._ids_sorted = None
        if obj._ids.size != index.ntotal:
            raise CorruptIndexError(
                f"ids count {obj._ids.size} does not match the index's {index.ntotal} vectors"
            )
        if obj._store is not None and (vectors is not None or index.ntotal):
            if vectors is None:
                raise ValueError(
                    "vectors: the params keep raw vectors (store_vectors="
                    f"{params.store_vectors!r}); pass the {index.ntotal} vectors in ids order"
                )
            if vectors.shape[0] != index.ntotal:
                raise CorruptIndexError(
                    f"stored vectors hold {vectors.shape[0]} rows, the index {index.ntotal}"
                )
            obj._store.attach(vectors)
        return obj

    def _vectors_path(self, path: Path) -> Path:
        return path.with_name(vectors_file_name(path))

    def save(self, path: str | Path) -> None:
        """Write the index to ``path`` and its checksum record to ``path + '.json'``.

        Both are written atomically; the data file first, so a crash leaves an
        old record that no longer matches (detected on load), never a silent mix.
        """
        path = Path(path)
        rec = storage.atomic_write_bytes(path, self.to_bytes())
        meta = {
            "format": "fastface.ivfpq",
            "format_version": FORMAT_VERSION,
            "params": self.params.to_dict(),
            "ntotal": self.ntotal,
            "data": rec,
        }
        if self._store is not None:
            # load() takes the ids from the inverted lists, in list order: store the
            # vectors in that order so that rows keep matching ids
            rows = self._rows_of(_invlist_ids(self._index))
            meta["vectors"] = storage.atomic_write_npy(
                self._vectors_path(path), self._store.array[rows]
            )
        storage.atomic_write_json(path.with_name(path.name + ".json"), meta)

    @classmethod
    def load(cls, path: str | Path, *, mmap: bool = False) -> IVFPQIndex:
        """Read an index written by :meth:`save`, verifying its checksum.

        With ``mmap=True`` the inverted lists stay in the file (memory-mapped)
        and the index is read-only. Stored raw vectors (the ``.vectors.npy``
        sidecar written by :meth:`save`) are always memory-mapped after their
        checksum is verified; a change copies the kept rows into memory.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such index file")
        meta = storage.read_json_checked(
            path.with_name(path.name + ".json"), kind="fastface.ivfpq", max_version=FORMAT_VERSION
        )
        rec = dict(meta["data"], file=path.name)
        storage.verify_file(path.parent, rec)
        params = IVFPQParams.from_dict(meta["params"])
        vectors = None
        if params.store_vectors is not None:
            if not meta.get("vectors"):
                raise CorruptIndexError(
                    f"{path}.json: store_vectors={params.store_vectors!r} but no vectors file "
                    "is recorded",
                    str(path),
                )
            vrec = dict(meta["vectors"], file=vectors_file_name(path))
            vectors = load_vectors(storage.verify_file(path.parent, vrec), params)
        obj = cls.from_faiss(params, read_faiss_index(path, mmap=mmap), vectors=vectors)
        obj._read_only = mmap
        return obj


def vectors_file_name(path: Path) -> str:
    return path.name + ".vectors.npy"


def load_vectors(path: Path, params: IVFPQParams) -> npt.NDArray[Any]:
    """Memory-map a verified stored-vectors ``.npy`` file and check its dtype and shape."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise CorruptIndexError(f"{path}: not a readable .npy file ({e})", str(path)) from e
    want = np.dtype(STORE_DTYPES[params.store_vectors or "float32"])
    if arr.ndim != 2 or arr.shape[1] != params.d or arr.dtype != want:
        raise CorruptIndexError(
            f"{path}: holds {arr.dtype} {tuple(arr.shape)}, expected {want} rows of d={params.d}",
            str(path),
        )
    return arr


def read_faiss_index(path: Path, *, mmap: bool) -> Any:
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise CorruptIndexError(f"{path}: FAISS cannot read it ({e})", str(path)) from e
    if not isinstance(index, (faiss.IndexIVFPQ, faiss.IndexIVFPQFastScan)):
        raise CorruptIndexError(
            f"{path}: holds a {type(index).__name__}, expected an IVF-PQ index", str(path)
        )
    return index
