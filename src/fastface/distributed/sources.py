"""Vector files as one row space: a file, a list of files, or a directory of them.

Rows are numbered across the files in order (a directory's files sorted by
name), so row ``r`` of the set is what a local build of the files, one after
the other, would call row ``r``. Each file is opened with
:func:`fastface.io.open_vectors` (``.npy`` memory-mapped, ``.fvecs``,
parquet), every process opens the same set by the same paths.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["VECTOR_SUFFIXES", "FileSet", "vector_files"]

VECTOR_SUFFIXES = (".npy", ".fvecs", ".parquet", ".pq")


def vector_files(source: Any) -> list[Path]:
    """The vector files named by ``source``: a path, a directory (its vector files, sorted by
    name; symbolic links skipped) or a list of paths. Paths are made absolute."""
    if isinstance(source, np.ndarray):
        raise TypeError(
            "source: a distributed job reads vector files that every worker can open; save the "
            "array with np.save to shared storage and pass its path"
        )
    items: Sequence[Any]
    if isinstance(source, (str, os.PathLike)):
        items = [source]
    elif isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        items = list(source)
    else:
        raise TypeError(
            f"source: expected a vector file, a directory or a list of files, got "
            f"{type(source).__name__}"
        )
    out: list[Path] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"source: expected paths, got a {type(item).__name__}")
        p = Path(item).absolute()
        if p.is_dir():
            found = sorted(
                q
                for q in p.iterdir()
                if q.suffix.lower() in VECTOR_SUFFIXES and q.is_file() and not q.is_symlink()
            )
            if not found:
                raise FileNotFoundError(
                    f"{p}: holds no vector files ({', '.join(VECTOR_SUFFIXES)})"
                )
            out += found
        elif p.is_file():
            if p.suffix.lower() not in VECTOR_SUFFIXES:
                raise ValueError(
                    f"{p}: unknown vector file type {p.suffix!r}; use .npy, .fvecs or .parquet"
                )
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such vector file or directory")
    if not out:
        raise ValueError("source: no vector files given")
    return out


class FileSet:
    """Rows of several vector files as one ``(n, d)`` set, read by ranges."""

    def __init__(self, files: Sequence[Path], column: str | None = None) -> None:
        from ..io import VectorSource, open_vectors

        self.files = [Path(f) for f in files]
        self.column = column
        self.sources: list[VectorSource] = []
        for f in self.files:
            src = open_vectors(f, column=column)
            assert isinstance(src, VectorSource)  # a path opens as a VectorSource
            self.sources.append(src)
        ds = {s.d for s in self.sources}
        if len(ds) > 1:
            dims = zip(self.files, self.sources, strict=True)
            raise ValueError(
                "source: the files hold vectors of different dimensions "
                + ", ".join(f"{f.name}: d={s.d}" for f, s in dims)
            )
        self.d = self.sources[0].d
        counts = [int(s.n) for s in self.sources]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n = int(self.offsets[-1])

    def describe(self) -> list[dict[str, Any]]:
        """Each file and its row count (what a resumed build must find again)."""
        return [
            {"file": str(f), "n": int(s.n)} for f, s in zip(self.files, self.sources, strict=True)
        ]

    def read(self, lo: int, hi: int) -> npt.NDArray[np.float32]:
        """Rows ``lo .. hi - 1`` of the set, float32."""
        if not 0 <= lo <= hi <= self.n:
            raise IndexError(f"rows {lo}..{hi}: outside 0..{self.n}")
        parts = []
        for i, src in enumerate(self.sources):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            if b > lo and a < hi:
                parts.append(src.read_rows(max(lo, a) - a, min(hi, b) - a))
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty((0, self.d), np.float32)

    def sample(self, n: int, *, seed: int = 0) -> npt.NDArray[np.float32]:
        """Up to ``n`` rows drawn without replacement, as :meth:`fastface.io.VectorSource.sample`
        draws them from one file (the same rows, for one file)."""
        if n >= self.n:
            return self.read(0, self.n)
        rows = np.sort(np.random.default_rng(seed).choice(self.n, size=n, replace=False))
        out = np.empty((n, self.d), np.float32)
        j = 0
        for i, src in enumerate(self.sources):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            sel = rows[(rows >= a) & (rows < b)] - a
            if not sel.size:
                continue
            f = self.files[i]
            if f.suffix.lower() in (".npy", ".fvecs"):  # memory maps: read only the rows
                from ..io import load_fvecs, load_npy

                arr = load_npy(f) if f.suffix.lower() == ".npy" else load_fvecs(f)
                out[j : j + sel.size] = np.asarray(arr[sel], dtype=np.float32)
                j += sel.size
                continue
            for lo, block in src.iter_chunks(65536):  # parquet: streamed, bounded memory
                part = sel[(sel >= lo) & (sel < lo + block.shape[0])]
                out[j : j + part.size] = block[part - lo]
                j += part.size
        return out
