"""Numba kernels: pure functions over preallocated arrays, no validation (CONVENTIONS.md 9-11).

Callers in :mod:`fastface.index` and :func:`fastface.dedup` check their inputs first.
"""

from __future__ import annotations
