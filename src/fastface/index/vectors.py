"""Rows kept beside the PQ codes: the ids and the raw vectors of a shard, in row order.

A shard's rows are in the order vectors were added (the order of
``IVFPQIndex.ids``); raw vectors are float16 (default) or float32, for exact
re-ranking and dedup. A :class:`Rows` value never changes: appending gives a
new value that shares the buffer when it can (rows are only ever written
past the end of every value that uses the buffer), so a search holding an
old value keeps reading what it saw while a writer appends. A sealed shard's
vectors are a read-only memory map of their ``.npy`` file.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import numpy.typing as npt

from .params import STORE_DTYPES

__all__ = ["STORE_DTYPES", "Rows", "check_storable"]

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


class _Buffer:
    """A growable array and how many of its rows some value has written."""

    __slots__ = ("array", "lock", "used")

    def __init__(self, array: npt.NDArray[Any], used: int) -> None:
        self.array = array
        self.used = used
        self.lock = threading.Lock()


class Rows:
    """``n`` rows of a fixed shape and dtype; immutable, cheap to append to.

    ``shape`` is the shape of one row: ``()`` for ids, ``(d,)`` for vectors.
    """

    __slots__ = ("_buf", "dtype", "n", "shape")

    def __init__(self, dtype: Any, shape: tuple[int, ...], buf: _Buffer | None = None, n: int = 0):
        self.dtype = np.dtype(dtype)
        self.shape = shape
        self._buf = buf if buf is not None else _Buffer(np.empty((0, *shape), self.dtype), 0)
        self.n = n

    @classmethod
    def of(cls, array: npt.NDArray[Any]) -> Rows:
        """Rows over an existing array (e.g. a read-only memory map); never written."""
        return cls(
            array.dtype, tuple(array.shape[1:]), _Buffer(array, array.shape[0]), array.shape[0]
        )

    @property
    def array(self) -> npt.NDArray[Any]:
        """The rows (a read-only view)."""
        view = self._buf.array[: self.n].view()
        view.flags.writeable = False
        return view

    @property
    def is_mapped(self) -> bool:
        return isinstance(self._buf.array, np.memmap) or not self._buf.array.flags.writeable

    def append(self, x: npt.NDArray[Any]) -> Rows:
        """These rows followed by ``x`` (cast to the dtype)."""
        need = self.n + x.shape[0]
        buf = self._buf
        with buf.lock:
            in_place = (
                buf.used == self.n
                and need <= buf.array.shape[0]
                and buf.array.flags.writeable
                and not isinstance(buf.array, np.memmap)
            )
            if in_place:
                buf.array[self.n : need] = x
                buf.used = need
                return Rows(self.dtype, self.shape, buf, need)
        cap = max(need, 2 * self.n, 1024)
        array = np.empty((cap, *self.shape), self.dtype)
        array[: self.n] = buf.array[: self.n]
        array[self.n : need] = x
        return Rows(self.dtype, self.shape, _Buffer(array, need), need)

    def take(self, mask: npt.NDArray[np.bool_]) -> Rows:
        """The rows where ``mask`` is true, copied into memory."""
        array = np.ascontiguousarray(self._buf.array[: self.n][mask])
        return Rows(self.dtype, self.shape, _Buffer(array, array.shape[0]), array.shape[0])

    def __len__(self) -> int:
        return self.n
