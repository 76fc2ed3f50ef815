"""Argument checks shared by the public API (CONVENTIONS.md 4).

Every check raises ``TypeError`` for a wrong type or dtype and ``ValueError``
for a wrong shape or value, with the expected value, the actual one and the fix.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["as_ids", "check_k", "check_matrix", "check_positive_int"]


def check_matrix(
    x: Any,
    name: str = "x",
    *,
    d: int | None = None,
    dtype: type = np.float32,
    allow_empty: bool = False,
    finite: bool = True,
) -> npt.NDArray[Any]:
    """Return ``x`` as a C-contiguous 2-D array of ``dtype`` after checking it.

    Only a memory layout change is made silently; a dtype other than ``dtype``
    is an error (no silent cast), as is a wrong shape or non-finite value.
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


def as_ids(ids: Any, n: int | None = None, name: str = "ids") -> npt.NDArray[np.int64]:
    """Return ``ids`` as a 1-D C-contiguous int64 array of non-negative, unique ids."""
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise TypeError(
            f"{name}: expected integer ids (int64), got {arr.dtype}; "
            f"pass np.asarray({name}, dtype=np.int64)"
        )
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {tuple(arr.shape)}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name}: expected {n} ids (one per vector), got {arr.shape[0]}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name}: ids must fit in int64")
    out = np.ascontiguousarray(arr, dtype=np.int64)
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


def check_k(k: Any) -> int:
    return check_positive_int(k, "k")
