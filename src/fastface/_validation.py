"""Argument checks shared by the public API (CONVENTIONS.md 4).

Every check raises ``TypeError`` for a wrong type or dtype and ``ValueError``
for a wrong shape or value, with the expected value, the actual one and the fix.

The input policy of every index entry point (:class:`~fastface.IVFPQIndex`,
:class:`~fastface.ShardedIndex`, :func:`~fastface.dedup_vectors`):

- vectors and queries are NumPy arrays (memory maps included) of float16,
  float32 or float64; float16 and float64 are cast to float32, as FAISS does.
  A float64 value beyond float32's range (about 3.4e38) raises ``ValueError``
  instead of turning into ``inf``; NaN and inf raise ``ValueError``. Integer
  and other dtypes raise ``TypeError``.
- a 1-D query of length ``d`` is one query: results are shaped ``(1, k)``.
  Vectors to add must be 2-D (``x.reshape(1, -1)`` for one).
- ids are integers (int64, or unsigned ints that fit): a float or bool id
  raises ``TypeError`` instead of being truncated; ``-1`` marks a missing
  result and is never a valid id.
- ``k`` is at most :data:`MAX_K`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "MAX_K",
    "as_id_array",
    "as_ids",
    "as_queries",
    "as_vectors",
    "check_k",
    "check_matrix",
    "check_positive_int",
]

#: Largest ``k`` a search accepts: results take ``12 * nq * k`` bytes, and a
#: typo such as ``k=2**31`` should fail at once instead of allocating gigabytes.
MAX_K = 65536

_FLOAT_KINDS = (np.float16, np.float32, np.float64)
_F32_MAX = float(np.finfo(np.float32).max)


def _float32_rows(
    x: Any, name: str, d: int | None, *, queries: bool, allow_empty: bool
) -> npt.NDArray[np.float32]:
    shape_hint = f"(n, {d})" if d is not None else "(n, d)"
    if not isinstance(x, np.ndarray):
        raise TypeError(
            f"{name}: expected a numpy float32 array of shape {shape_hint}, got "
            f"{type(x).__name__}; pass np.asarray({name}, dtype=np.float32)"
        )
    if x.dtype.type not in _FLOAT_KINDS:
        raise TypeError(
            f"{name}: expected a float32 (or float16/float64) array of shape {shape_hint}, got "
            f"{x.dtype} {tuple(x.shape)}; pass {name}.astype(np.float32)"
        )
    if queries and x.ndim == 1 and (d is None or x.shape[0] == d):
        x = x.reshape(1, -1)
    if x.ndim != 2:
        one = " (or 1-D of length d for one query)" if queries else ""
        raise ValueError(
            f"{name}: expected a 2-D array of shape {shape_hint}{one}, got {x.ndim}-D "
            f"{tuple(x.shape)}; reshape it, e.g. {name}.reshape(-1, {d or 'd'})"
        )
    if d is not None and x.shape[1] != d:
        raise ValueError(
            f"{name}: expected an array of shape {shape_hint}, got {x.dtype} "
            f"{tuple(x.shape)}; the index dimension is d={d}"
        )
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name}: expected at least one row, got shape {tuple(x.shape)}")
    if x.size == 0:
        return np.ascontiguousarray(x, dtype=np.float32)
    if x.dtype == np.float64:
        finite = np.isfinite(x)
        if finite.all():
            big = float(np.abs(x).max())
            if big > _F32_MAX:
                row = int(np.flatnonzero((np.abs(x) > _F32_MAX).any(axis=1))[0])
                raise ValueError(
                    f"{name}: float64 values up to {big:.4g} overflow float32 (max "
                    f"{_F32_MAX:.4g}), first in row {row}; scale the vectors down"
                )
    out = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(out).all():
        bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
        raise ValueError(
            f"{name}: {bad.size} row(s) contain NaN or inf (first: row {int(bad[0])}); "
            "remove or repair them before calling"
        )
    return out


def as_vectors(
    x: Any, name: str = "x", *, d: int | None = None, allow_empty: bool = False
) -> npt.NDArray[np.float32]:
    """Vectors to store: a 2-D float array, returned as C-contiguous float32 (module policy)."""
    return _float32_rows(x, name, d, queries=False, allow_empty=allow_empty)


def as_queries(q: Any, name: str = "q", *, d: int | None = None) -> npt.NDArray[np.float32]:
    """Queries: 2-D, or 1-D of length ``d`` (one query); C-contiguous float32 (module policy)."""
    return _float32_rows(q, name, d, queries=True, allow_empty=False)


def check_matrix(
    x: Any,
    name: str = "x",
    *,
    d: int | None = None,
    dtype: type = np.float32,
    allow_empty: bool = False,
    finite: bool = True,
) -> npt.NDArray[Any]:
    """Return ``x`` as a C-contiguous 2-D array of ``dtype`` after checking it, strictly.

    Only a memory layout change is made silently; a dtype other than ``dtype``
    is an error (no cast), as is a wrong shape or non-finite value. The index
    entry points use the casting policy of :func:`as_vectors` / :func:`as_queries`.
    """
    want = np.dtype(dtype)
    shape_hint = f"(n, {d})" if d is not None else "(n, d)"
    if not isinstance(x, np.ndarray):
        raise TypeError(
            f"{name}: expected a numpy {want} array of shape {shape_hint}, got "
            f"{type(x).__name__}; pass np.asarray({name}, dtype=np.{want})"
        )
    if x.dtype != want:
        raise TypeError(
            f"{name}: expected {want} array of shape {shape_hint}, got {x.dtype} "
            f"{tuple(x.shape)}; pass {name}.astype(np.{want})"
        )
    if x.ndim != 2:
        raise ValueError(
            f"{name}: expected a 2-D array of shape {shape_hint}, got {x.ndim}-D "
            f"{tuple(x.shape)}; reshape it, e.g. {name}.reshape(-1, {d or 'd'})"
        )
    if d is not None and x.shape[1] != d:
        raise ValueError(
            f"{name}: expected {want} array of shape {shape_hint}, got {x.dtype} "
            f"{tuple(x.shape)}; the index dimension is d={d}"
        )
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name}: expected at least one row, got shape {tuple(x.shape)}")
    if finite and want.kind == "f" and x.size and not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(
            f"{name}: {bad.size} row(s) contain NaN or inf (first: row {int(bad[0])}); "
            "remove or repair them before calling"
        )
    return np.ascontiguousarray(x)


def as_id_array(ids: Any, name: str = "ids") -> npt.NDArray[np.int64]:
    """Any integer ids (a scalar, a list, an array of any shape) as a flat int64 array.

    Raises ``TypeError`` for non-integer values (``1.7`` is not id 1) and
    ``ValueError`` for ids outside int64. Negative ids are allowed here (they
    match nothing); use :func:`as_ids` for ids that will be stored.
    """
    if isinstance(ids, (bool, np.bool_)):
        raise TypeError(f"{name}: expected integer ids, got a bool")
    try:
        arr = np.asarray(ids)
    except (OverflowError, ValueError) as e:
        raise ValueError(f"{name}: ids must fit in int64 ({e})") from e
    if arr.dtype == object:
        # Python ints beyond int64 land here, as do mixed lists
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in arr.flat):
            raise ValueError(f"{name}: ids must fit in int64 (-2**63 .. 2**63 - 1)")
        raise TypeError(f"{name}: expected integer ids, got {arr.dtype} values")
    if arr.size == 0:
        return np.empty(0, np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(
            f"{name}: expected integer ids (int64), got {arr.dtype}; "
            f"pass np.asarray({name}, dtype=np.int64) if the values are whole numbers"
        )
    if arr.dtype.kind == "u" and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name}: ids must fit in int64 (max 2**63 - 1), got {int(arr.max())}")
    return np.ascontiguousarray(arr, dtype=np.int64).reshape(-1)


def as_ids(ids: Any, n: int | None = None, name: str = "ids") -> npt.NDArray[np.int64]:
    """Return ``ids`` as a 1-D C-contiguous int64 array of non-negative, unique ids."""
    arr0 = np.asarray(ids) if not isinstance(ids, np.ndarray) else ids
    if arr0.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {tuple(arr0.shape)}")
    out = as_id_array(arr0, name)
    if n is not None and out.shape[0] != n:
        raise ValueError(f"{name}: expected {n} ids (one per vector), got {out.shape[0]}")
    if out.size and int(out.min()) < 0:
        raise ValueError(f"{name}: ids must be >= 0 (-1 marks a missing result), got {out.min()}")
    if out.size > 1:
        s = np.sort(out)
        dup = s[1:][s[1:] == s[:-1]]
        if dup.size:
            raise ValueError(
                f"{name}: duplicate ids in one call, e.g. {int(dup[0])}; every vector needs "
                "its own id"
            )
    return out


def check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {value}")
    return int(value)


def check_k(k: Any, name: str = "k") -> int:
    """``k`` as an int in ``1..MAX_K``."""
    k = check_positive_int(k, name)
    if k > MAX_K:
        raise ValueError(
            f"{name}={k} exceeds the maximum of {MAX_K} results per query; ask for fewer "
            "(or page through results with several searches)"
        )
    return k
