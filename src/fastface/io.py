"""Vector sources: ``.npy`` (memory-mapped), ``.fvecs``, parquet, arrays, generators, chunks.

:func:`open_vectors` gives a source (``n``, ``d``, chunked reads, samples)
over any of them; :meth:`ShardedIndex.build <fastface.ShardedIndex.build>`
and the command line read vectors through it. Nothing here loads a whole
file unless asked (``read_all``).

Which sources can resume (be read again from a row, so that an interrupted
build continues where it stopped):

============================================  ========  =====================
source                                        resumes   ``n`` known up front
============================================  ========  =====================
``.npy`` / ``.fvecs`` / ``.parquet``, arrays  yes       yes
a generator with ``rows(start, stop)``        yes       yes
(:class:`fastface.datasets.SyntheticFaces`)
a function ``start -> iterable of chunks``    yes       no
an iterable of chunks                         no        no
============================================  ========  =====================
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "ChunkSource",
    "RowSource",
    "VectorSource",
    "load_fvecs",
    "load_npy",
    "load_parquet",
    "open_vectors",
    "write_fvecs",
]


def load_npy(path: str | os.PathLike[str], *, mmap: bool = True) -> npt.NDArray[Any]:
    """A 2-D ``.npy`` array, memory-mapped by default."""
    arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D array, got shape {arr.shape}")
    return arr


def load_fvecs(path: str | os.PathLike[str]) -> npt.NDArray[np.float32]:
    """A ``.fvecs`` file (int32 dimension then d float32 per row) as a read-only memory map."""
    size = Path(path).stat().st_size
    if size == 0:
        return np.empty((0, 0), np.float32)
    if size % 4:
        raise ValueError(f"{path}: not an .fvecs file ({size} bytes is not a multiple of 4)")
    raw = np.memmap(path, dtype=np.int32, mode="r")
    d = int(raw[0])
    if d <= 0 or raw.size % (d + 1):
        raise ValueError(
            f"{path}: not an .fvecs file (first dimension {d}, {raw.size * 4} bytes is not a "
            "multiple of 4 * (d + 1))"
        )
    rows = raw.reshape(-1, d + 1)
    if not (rows[:, 0] == d).all():
        raise ValueError(f"{path}: rows have different dimensions; .fvecs needs one d")
    return rows[:, 1:].view(np.float32)


def write_fvecs(path: str | os.PathLike[str], x: npt.NDArray[np.float32]) -> None:
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    out = np.empty((n, d + 1), np.float32)
    out[:, 0] = np.array([d], np.int32).view(np.float32)[0]
    out[:, 1:] = x
    out.tofile(path)


def _parquet_column(pf: Any, column: str | None) -> str:
    names = pf.schema_arrow.names
    if column is None:
        return str(names[0])
    if column not in names:
        raise ValueError(f"parquet file has no column {column!r}; columns: {names}")
    return column


def _parquet_batch_to_array(col: Any, d: int | None = None) -> npt.NDArray[np.float32]:
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if (
        not pa.types.is_list(col.type)
        and not pa.types.is_fixed_size_list(col.type)
        and not (pa.types.is_large_list(col.type))
    ):
        raise ValueError(f"parquet column must hold lists of floats, got {col.type}")
    flat = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    n = len(col)
    if n == 0:
        return np.empty((0, d or 0), np.float32)
    if flat.size % n:
        raise ValueError("parquet rows have different lengths; every vector needs the same d")
    return flat.reshape(n, flat.size // n)


def load_parquet(
    path: str | os.PathLike[str], *, column: str | None = None
) -> npt.NDArray[np.float32]:
    """A parquet column of float lists as a float32 ``(n, d)`` array (in memory)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    name = _parquet_column(pf, column)
    return _parquet_batch_to_array(pf.read(columns=[name]).column(0))


class VectorSource:
    """A readable set of vectors: ``n``, ``d``, chunked reads and random samples."""

    resumable = True

    def __init__(
        self, path: Path | None, array: Any | None, parquet: Any | None, column: str | None
    ):
        self.path = path
        self._array = array
        self._pf = parquet
        self._column = column
        if array is not None:
            self.n, self.d = int(array.shape[0]), int(array.shape[1])
        elif parquet is None:
            raise ValueError("VectorSource needs an array or a parquet file")
        else:
            self.n = int(parquet.metadata.num_rows)
            first = next(parquet.iter_batches(batch_size=1, columns=[column]))
            self.d = int(_parquet_batch_to_array(first.column(0)).shape[1])

    def describe(self) -> str:
        return str(self.path.resolve()) if self.path is not None else f"array{(self.n, self.d)}"

    @staticmethod
    def _f32(x: Any) -> npt.NDArray[np.float32]:
        return np.ascontiguousarray(x, dtype=np.float32)

    def iter_chunks(
        self, chunk_size: int, *, start: int = 0
    ) -> Iterator[tuple[int, npt.NDArray[np.float32]]]:
        """Yield ``(first_row, float32 chunk)`` from row ``start`` on."""
        if self._array is not None:
            for lo in range(start, self.n, chunk_size):
                yield lo, self._f32(self._array[lo : lo + chunk_size])
            return
        assert self._pf is not None  # one of array / parquet is set in __init__
        seen = 0  # rows of the file read so far
        buf: list[npt.NDArray[np.float32]] = []
        buffered = 0
        lo = start
        for batch in self._pf.iter_batches(batch_size=chunk_size, columns=[self._column]):
            x = _parquet_batch_to_array(batch.column(0))
            b_lo, seen = seen, seen + x.shape[0]
            if seen <= start:
                continue
            if b_lo < start:
                x = x[start - b_lo :]
            buf.append(x)
            buffered += x.shape[0]
            while buffered >= chunk_size:
                cat = np.concatenate(buf)
                yield lo, cat[:chunk_size]
                lo += chunk_size
                buf = [cat[chunk_size:]]
                buffered = buf[0].shape[0]
        if buffered:
            yield lo, np.concatenate(buf)

    def read_rows(self, lo: int, hi: int) -> npt.NDArray[np.float32]:
        """Rows ``lo`` to ``hi - 1`` as float32 (of parquet, only the row groups holding them)."""
        if not 0 <= lo <= hi <= self.n:
            raise IndexError(f"rows {lo}..{hi}: outside 0..{self.n}")
        if self._array is not None:
            return self._f32(self._array[lo:hi])
        assert self._pf is not None  # one of array / parquet is set in __init__
        meta = self._pf.metadata
        groups, first, start = [], None, 0
        for g in range(meta.num_row_groups):
            end = start + meta.row_group(g).num_rows
            if end > lo and start < hi:
                groups.append(g)
                first = start if first is None else first
            start = end
        if not groups:
            return np.empty((0, self.d), np.float32)
        col = self._pf.read_row_groups(groups, columns=[self._column]).column(0)
        x = _parquet_batch_to_array(col, self.d)
        assert first is not None
        return np.ascontiguousarray(x[lo - first : hi - first])

    def sample(self, n: int, *, seed: int = 0) -> npt.NDArray[np.float32]:
        """Up to ``n`` rows drawn without replacement (all rows if fewer)."""
        if n >= self.n:
            return self.read_all()
        rows = np.sort(np.random.default_rng(seed).choice(self.n, size=n, replace=False))
        if self._array is not None:
            return self._f32(self._array[rows])
        out = np.empty((n, self.d), np.float32)
        j = 0
        for lo, x in self.iter_chunks(65536):
            hi = lo + x.shape[0]
            sel = rows[(rows >= lo) & (rows < hi)]
            out[j : j + sel.size] = x[sel - lo]
            j += sel.size
        return out

    def read_all(self) -> npt.NDArray[np.float32]:
        if self._array is not None:
            return self._f32(self._array)
        return (
            np.concatenate([x for _, x in self.iter_chunks(65536)])
            if self.n
            else np.empty((0, self.d), np.float32)
        )


class RowSource:
    """Vectors regenerated on demand by an object with ``n``, ``d`` and ``rows(start, stop)``.

    :class:`fastface.datasets.SyntheticFaces` is one: any rows can be produced
    again from its seed, so a build from it resumes, and 100M rows stream
    without a 51 GB file. ``rows`` may return ``(x, labels)`` (only ``x`` is used).
    """

    path = None
    resumable = True

    def __init__(self, gen: Any) -> None:
        self._gen = gen
        self.n = int(gen.n)
        self.d = int(gen.d)

    def describe(self) -> str:
        g = self._gen
        fields = ("n_identities", "per_identity", "d", "seed", "intra_cos", "n_groups", "group_cos")
        if all(hasattr(g, f) for f in fields):
            inner = ", ".join(f"{f}={getattr(g, f)!r}" for f in fields)
        else:
            inner = f"n={self.n}, d={self.d}"
        return f"{type(g).__name__}({inner})"

    def _rows(self, lo: int, hi: int) -> npt.NDArray[np.float32]:
        out = self._gen.rows(lo, hi)
        x = out[0] if isinstance(out, tuple) else out
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape != (hi - lo, self.d):
            raise ValueError(
                f"rows({lo}, {hi}) returned shape {x.shape}, expected ({hi - lo}, {self.d})"
            )
        return x

    def iter_chunks(
        self, chunk_size: int, *, start: int = 0
    ) -> Iterator[tuple[int, npt.NDArray[np.float32]]]:
        """Yield ``(first_row, float32 chunk)`` from row ``start`` on."""
        for lo in range(start, self.n, chunk_size):
            yield lo, self._rows(lo, min(lo + chunk_size, self.n))

    def sample(self, n: int, *, seed: int = 0) -> npt.NDArray[np.float32]:
        """Up to ``n`` rows: the rows of random windows of 65,536 consecutive rows.

        Windows keep generation cheap (a generator draws rows in blocks); for
        identity-ordered data each window holds thousands of identities.
        """
        if n >= self.n:
            return self.read_all()
        w = 1 << 16
        nwin = (self.n + w - 1) // w
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.d), np.float32)
        filled = 0
        for i in rng.permutation(nwin):
            lo = int(i) * w
            x = self._rows(lo, min(lo + w, self.n))
            take = min(x.shape[0], n - filled)
            rows = np.sort(rng.choice(x.shape[0], size=take, replace=False))
            out[filled : filled + take] = x[rows]
            filled += take
            if filled == n:
                break
        return out

    def read_all(self) -> npt.NDArray[np.float32]:
        return self._rows(0, self.n)


class ChunkSource:
    """Vectors from an iterable of ``(n_i, d)`` arrays, read front to back.

    ``n`` is unknown (``None``) until the iterable is exhausted. :meth:`sample`
    reads and keeps the first rows (a sample of the *beginning*, not a
    random one); :meth:`iter_chunks` replays them, then continues.

    Built from an iterable, it is read once and a build from it cannot be
    resumed. Built from a function ``start -> iterable of chunks from row
    start`` (``ChunkSource(fn)``), it can: :meth:`iter_chunks` calls the
    function again with the row to continue from.
    """

    path = None

    def __init__(self, chunks: Iterable[Any] | Any, d: int | None = None) -> None:
        self._restart = chunks if callable(chunks) and not isinstance(chunks, Iterable) else None
        self.resumable = self._restart is not None
        if self._restart is not None:
            chunks = self._restart(0)
        self._it = iter(chunks)
        self._head: list[npt.NDArray[np.float32]] = []
        self._read = 0
        self._used = False
        self._d: int | None = None
        self.n: int | None = None
        first = self._next()
        if first is None:
            if d is None:
                raise ValueError("chunks: the iterable is empty and no d was given")
            self.d = int(d)
            self.n = 0
        else:
            self.d = int(first.shape[1])
            if d is not None and d != self.d:
                raise ValueError(f"chunks: rows have d={self.d}, expected d={d}")
            self._head.append(first)

    def _next(self) -> npt.NDArray[np.float32] | None:
        for x in self._it:
            arr = np.asarray(x)
            if arr.ndim != 2:
                raise ValueError(f"chunks: every chunk must be 2-D (n, d), got shape {arr.shape}")
            if self._d is None:
                self._d = int(arr.shape[1])
            elif arr.shape[1] != self._d:
                raise ValueError("chunks: chunks have different d; every vector needs the same d")
            if arr.shape[0]:
                self._read += arr.shape[0]
                return np.ascontiguousarray(arr, dtype=np.float32)
        self.n = self._read
        return None

    def describe(self) -> str:
        if self._restart is not None:
            name = getattr(self._restart, "__qualname__", type(self._restart).__name__)
            return f"chunks from {getattr(self._restart, '__module__', '?')}.{name}"
        return "chunks"

    def sample(self, n: int, *, seed: int = 0) -> npt.NDArray[np.float32]:
        """The first ``n`` rows (kept for :meth:`iter_chunks`); ``seed`` is unused."""
        while sum(h.shape[0] for h in self._head) < n:
            x = self._next()
            if x is None:
                break
            self._head.append(x)
        if not self._head:
            return np.empty((0, self.d), np.float32)
        return np.concatenate(self._head)[:n]

    def iter_chunks(
        self, chunk_size: int, *, start: int = 0
    ) -> Iterator[tuple[int, npt.NDArray[np.float32]]]:
        """Yield ``(first_row, float32 chunk)`` of at most ``chunk_size`` rows; once only."""
        if start and self._restart is not None:
            self._used = True
            lo = start
            for x in self._restart(start):
                arr = np.asarray(x)
                if arr.ndim != 2 or arr.shape[1] != self.d:
                    raise ValueError(
                        f"chunks: every chunk must be (n, {self.d}), got shape {arr.shape}"
                    )
                arr = np.ascontiguousarray(arr, dtype=np.float32)
                for s in range(0, arr.shape[0], chunk_size):
                    part = arr[s : s + chunk_size]
                    yield lo, part
                    lo += part.shape[0]
            return
        if self._used:
            if self._restart is None:
                raise RuntimeError("chunks: an iterable of chunks can be read only once")
            self.__init__(self._restart, self.d)  # type: ignore[misc]
        if start:
            raise ValueError(
                "chunks: an iterable of chunks cannot resume from a row; pass a function "
                "start -> chunks to make it resumable"
            )
        self._used = True
        lo = 0

        def pieces() -> Iterator[npt.NDArray[np.float32]]:
            yield from self._head
            self._head = []
            while (x := self._next()) is not None:
                yield x

        for x in pieces():
            for s in range(0, x.shape[0], chunk_size):
                part = x[s : s + chunk_size]
                yield lo, part
                lo += part.shape[0]

    def read_all(self) -> npt.NDArray[np.float32]:
        parts = [x for _, x in self.iter_chunks(1 << 30)]
        return np.concatenate(parts) if parts else np.empty((0, self.d), np.float32)


def open_vectors(
    source: Any, *, column: str | None = None
) -> VectorSource | RowSource | ChunkSource:
    """Open ``.npy`` (memory-mapped), ``.fvecs``, ``.parquet``, an array, a generator with
    ``rows(start, stop)`` (such as :class:`fastface.datasets.SyntheticFaces`), a function
    ``start -> iterable of chunks``, or an iterable of chunks (see the module docstring).

    Examples
    --------
    >>> import numpy as np
    >>> src = open_vectors(np.zeros((5, 3), np.float32))
    >>> src.n, src.d
    (5, 3)
    >>> chunks = open_vectors(np.ones((2, 3), np.float32) for _ in range(3))
    >>> [(lo, x.shape[0]) for lo, x in chunks.iter_chunks(4)]
    [(0, 2), (2, 2), (4, 2)]
    >>> from fastface.datasets import SyntheticFaces
    >>> gen = open_vectors(SyntheticFaces(n_identities=10, per_identity=3, d=8, seed=0))
    >>> gen.n, gen.d, gen.resumable, [lo for lo, _ in gen.iter_chunks(12, start=6)]
    (30, 8, True, [6, 18])
    """
    if isinstance(source, np.ndarray):
        if source.ndim != 2:
            raise ValueError(f"expected a 2-D array, got shape {source.shape}")
        return VectorSource(None, source, None, None)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such vector file")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            return VectorSource(path, load_npy(path), None, None)
        if suffix == ".fvecs":
            return VectorSource(path, load_fvecs(path), None, None)
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            return VectorSource(path, None, pf, _parquet_column(pf, column))
        raise ValueError(
            f"{path}: unknown vector file type {suffix!r}; use .npy, .fvecs or .parquet"
        )
    if isinstance(source, (VectorSource, RowSource, ChunkSource)):
        return source
    if callable(getattr(source, "rows", None)) and hasattr(source, "n") and hasattr(source, "d"):
        return RowSource(source)
    if isinstance(source, Iterable) and not isinstance(source, (bytes, dict, str)):
        return ChunkSource(source)
    if callable(source):
        return ChunkSource(source)
    raise TypeError(
        f"source: expected a path, a numpy array or an iterable of arrays, got "
        f"{type(source).__name__}"
    )
