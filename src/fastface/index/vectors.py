"""Raw vectors kept beside the PQ codes, for exact re-ranking and dedup.

A shard's vectors are stored in its row order (the order of ``IVFPQIndex.ids``)
as float16 (default) or float32. In memory they live in a growable buffer; a
sealed shard's vectors are a read-only memory map of their ``.npy`` file, and
the first change to them (compaction) copies the kept rows into memory.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = ["STORE_DTYPES", "VectorStore", "check_storable"]

StoreKind = Literal["float16", "float32"]
STORE_DTYPES: dict[str, type] = {"float16": np.float16, "float32": np.float32}
_F16_MAX = float(np.finfo(np.float16).max)


def check_storable(x: npt.NDArray[np.float32], kind: str | None, name: str = "x") -> None:
    """Raise ``ValueError`` when ``x`` does not fit float16 storage (values beyond 65504)."""
    if kind == "float16" and x.size:
        big = float(np.abs(x).max())
        if big > _F16_MAX:
            raise ValueError(
                f"{name}: values up to {big:.4g} overflow float16 storage (max {_F16_MAX:g}); "
                "normalise the vectors or create the index with store_vectors='float32'"
            )


class VectorStore:
    """Rows of ``d`` values of one dtype, appended and filtered with the codes."""

    __slots__ = ("_buf", "_n", "d", "dtype", "kind")

    def __init__(self, kind: StoreKind, d: int) -> None:
        self.kind = kind
        self.dtype = np.dtype(STORE_DTYPES[kind])
        self.d = d
        self._buf: npt.NDArray[Any] = np.empty((0, d), self.dtype)
        self._n = 0

    @property
    def n(self) -> int:
        return self._n

    @property
    def array(self) -> npt.NDArray[Any]:
        """The stored rows (a view; a memory map for sealed shards)."""
        return self._buf[: self._n]

    @property
    def is_mapped(self) -> bool:
        return isinstance(self._buf, np.memmap)

    def attach(self, arr: npt.NDArray[Any]) -> None:
        """Use ``arr`` (e.g. a read-only memory map) as the stored rows."""
        if arr.ndim != 2 or arr.shape[1] != self.d or arr.dtype != self.dtype:
            raise ValueError(
                f"stored vectors: expected {self.dtype} rows of d={self.d}, got {arr.dtype} "
                f"{tuple(arr.shape)}"
            )
        self._buf = arr
        self._n = int(arr.shape[0])

    def append(self, x: npt.NDArray[np.float32]) -> None:
        need = self._n + x.shape[0]
        if self.is_mapped or need > self._buf.shape[0]:
            cap = max(need, 2 * self._buf.shape[0] if not self.is_mapped else need, 1024)
            buf = np.empty((cap, self.d), self.dtype)
            buf[: self._n] = self._buf[: self._n]
            self._buf = buf
        self._buf[self._n : need] = x
        self._n = need

    def keep(self, mask: npt.NDArray[np.bool_]) -> None:
        """Keep the rows where ``mask`` is true (copies them into memory)."""
        self._buf = np.ascontiguousarray(self.array[mask])
        self._n = int(self._buf.shape[0])
