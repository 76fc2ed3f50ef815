"""Kernels: pure functions over preallocated arrays, no validation (CONVENTIONS.md 9-11).

:mod:`~fastface.kernels.exact` is the one exact scorer (NumPy blocks, and the
gathered Numba kernels of :mod:`~fastface.kernels.rerank`, imported on first
use); :mod:`~fastface.kernels.dedup` holds the near-duplicate kernels. Callers
in :mod:`fastface.index`, :func:`fastface.dedup` and :mod:`fastface.eval`
check their inputs first.
"""

from __future__ import annotations
