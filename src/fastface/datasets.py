"""Synthetic face-like embeddings (vector files are read by :mod:`fastface.io`).

The generator draws identity-clustered unit vectors that behave like face
embeddings: two samples of one identity have cosine about ``intra_cos`` (0.65
by default), samples of different identities about 0. With ``n_groups`` set,
identity centres are drawn around a few hundred group centres (population
structure), so identities of one group are closer to each other than to the
rest, as real face embeddings are; IVF partitions behave very differently on
such data than on uniformly spread identities.

How it is drawn (unit vectors throughout; ``u`` is a fresh isotropic
Gaussian direction scaled so that ``|u|^2 ~ 1``):

- group centre ``g``: a random unit vector;
- identity centre ``c = normalize(g + t * u)`` with ``t^2 = 1 / group_cos - 1``
  (``c`` for different identities of a group then have cosine ``~ group_cos``);
  without groups, ``c`` is a random unit vector;
- sample ``x = normalize(c + s * u)`` with ``s^2 = 1 / intra_cos - 1``, so two
  samples of one identity have cosine ``~ intra_cos``.

Rows are ordered by identity (``per_identity`` consecutive rows each) and every
block of identities is drawn from its own seeded stream, so any chunk can be
produced on its own: 10M+ rows stream without ever being in memory at once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["SyntheticFaces", "plant_duplicates"]

_BLOCK = 4096  # identities per independently seeded block


class SyntheticFaces:
    """Seeded identity-clustered unit vectors, streamed in chunks.

    Parameters
    ----------
    n_identities, per_identity, d : int
        ``n_identities * per_identity`` rows of dimension ``d``.
    seed : int
        Everything drawn derives from it.
    intra_cos : float
        Expected cosine between two samples of one identity.
    n_groups : int or None
        Number of population groups; ``None`` spreads identities uniformly.
    group_cos : float
        Expected cosine between identity centres of one group.

    Examples
    --------
    >>> data = SyntheticFaces(n_identities=100, per_identity=4, d=64, seed=0)
    >>> x, labels = data.vectors()
    >>> x.shape, x.dtype.name, labels[:6].tolist()
    ((400, 64), 'float32', [0, 0, 0, 0, 1, 1])
    >>> bool(abs(float(x[0] @ x[1]) - 0.65) < 0.2)
    True
    """

    def __init__(
        self,
        n_identities: int,
        per_identity: int,
        d: int,
        *,
        seed: int = 0,
        intra_cos: float = 0.65,
        n_groups: int | None = None,
        group_cos: float = 0.3,
    ) -> None:
        for name, v in (("n_identities", n_identities), ("per_identity", per_identity), ("d", d)):
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0.0 < intra_cos < 1.0:
            raise ValueError(f"intra_cos must be in (0, 1), got {intra_cos}")
        if not 0.0 < group_cos < 1.0:
            raise ValueError(f"group_cos must be in (0, 1), got {group_cos}")
        if n_groups is not None and n_groups <= 0:
            raise ValueError(f"n_groups must be positive or None, got {n_groups}")
        self.n_identities = int(n_identities)
        self.per_identity = int(per_identity)
        self.d = int(d)
        self.seed = int(seed)
        self.intra_cos = float(intra_cos)
        self.n_groups = None if n_groups is None else int(n_groups)
        self.group_cos = float(group_cos)
        self._s = math.sqrt(1.0 / intra_cos - 1.0)
        self._t = math.sqrt(1.0 / group_cos - 1.0)
        self._groups: npt.NDArray[np.float32] | None = None

    @property
    def n(self) -> int:
        return self.n_identities * self.per_identity

    def __len__(self) -> int:
        return self.n

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, *key]))

    def _unit(self, rng: np.random.Generator, n: int) -> npt.NDArray[np.float32]:
        g = rng.standard_normal((n, self.d), dtype=np.float32)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        return g

    def _noise(self, rng: np.random.Generator, n: int, scale: float) -> npt.NDArray[np.float32]:
        return rng.standard_normal((n, self.d), dtype=np.float32) * np.float32(
            scale / math.sqrt(self.d)
        )

    def group_centres(self) -> npt.NDArray[np.float32] | None:
        if self.n_groups is None:
            return None
        if self._groups is None:
            self._groups = self._unit(self._rng(1), self.n_groups)
        return self._groups

    def group_of(self, identities: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Group label of each identity (all 0 without population structure)."""
        if self.n_groups is None:
            return np.zeros_like(identities)
        lo = identities // _BLOCK
        out = np.empty_like(identities)
        for b in np.unique(lo):
            labels = self._rng(3, int(b)).integers(0, self.n_groups, _BLOCK)
            m = lo == b
            out[m] = labels[identities[m] - b * _BLOCK]
        return out

    def _centre_block(self, b: int) -> npt.NDArray[np.float32]:
        rng = self._rng(2, b)
        groups = self.group_centres()
        if groups is None:
            return self._unit(rng, _BLOCK)
        labels = self._rng(3, b).integers(0, self.n_groups or 1, _BLOCK)
        c = groups[labels] + self._noise(rng, _BLOCK, self._t)
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        return c

    def centres(self, identities: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Unit centre of each identity (regenerated from the seed, not stored)."""
        ids = np.asarray(identities, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_identities):
            raise ValueError(f"identities must be in [0, {self.n_identities})")
        out = np.empty((ids.size, self.d), np.float32)
        blocks = ids // _BLOCK
        for b in np.unique(blocks):
            m = blocks == b
            out[m] = self._centre_block(int(b))[ids[m] - b * _BLOCK]
        return out

    def _samples(
        self, centres: npt.NDArray[np.float32], rng: np.random.Generator
    ) -> npt.NDArray[np.float32]:
        x = centres + self._noise(rng, centres.shape[0], self._s)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def rows(self, start: int, stop: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Rows ``[start, stop)`` and their identity labels; the same on every call."""
        if not 0 <= start <= stop <= self.n:
            raise ValueError(f"rows: need 0 <= start <= stop <= {self.n}, got {start}, {stop}")
        labels = np.arange(start, stop, dtype=np.int64) // self.per_identity
        x = np.empty((stop - start, self.d), np.float32)
        rows_per_block = _BLOCK * self.per_identity
        pos = start
        while pos < stop:
            b = pos // rows_per_block
            b_lo, b_hi = b * rows_per_block, min((b + 1) * rows_per_block, self.n)
            # each block's samples come from one stream: draw the whole block's noise
            # and keep the slice we need, so any chunking gives identical rows
            hi = min(stop, b_hi)
            rng = self._rng(4, int(b))
            ids_block = np.arange(b_lo, b_hi, dtype=np.int64) // self.per_identity
            need = slice(pos - b_lo, hi - b_lo)
            cen = self._centre_block(int(b))[ids_block[need] - b * _BLOCK]
            noise = rng.standard_normal((b_hi - b_lo, self.d), dtype=np.float32)[need]
            xs = cen + noise * np.float32(self._s / math.sqrt(self.d))
            xs /= np.linalg.norm(xs, axis=1, keepdims=True)
            x[pos - start : hi - start] = xs
            pos = hi
        return x, labels

    def chunks(
        self, chunk_size: int = 100_000, *, start: int = 0
    ) -> Iterator[tuple[int, npt.NDArray[np.float32], npt.NDArray[np.int64]]]:
        """Yield ``(first_row, x, labels)`` chunks from ``start`` to the end."""
        for lo in range(start, self.n, chunk_size):
            x, lab = self.rows(lo, min(lo + chunk_size, self.n))
            yield lo, x, lab

    def vectors(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """All rows and labels in memory (small sets; use :meth:`chunks` for big ones)."""
        return self.rows(0, self.n)

    def queries(
        self, nq: int, *, seed: int = 1
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Fresh samples of existing identities, with their identity labels."""
        rng = self._rng(5, seed)
        labels = rng.integers(0, self.n_identities, nq).astype(np.int64)
        return self._samples(self.centres(labels), rng), labels

    def write_npy(self, path: str | os.PathLike[str], *, chunk_size: int = 100_000) -> Path:
        """Stream all rows into a ``.npy`` file without holding them in memory."""
        path = Path(path)
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(self.n, self.d))
        for lo, x, _ in self.chunks(chunk_size):
            out[lo : lo + x.shape[0]] = x
        out.flush()
        del out
        return path


def plant_duplicates(
    x: npt.NDArray[np.float32],
    frac: float = 0.05,
    *,
    copies: tuple[int, int] = (1, 3),
    cos: tuple[float, float] = (0.95, 0.99),
    seed: int = 0,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Append near copies of a random ``frac`` of the rows of unit vectors ``x``.

    Each chosen row gets between ``copies[0]`` and ``copies[1]`` copies (uniform);
    a copy is ``c * x + sqrt(1 - c**2) * u`` with ``u`` a random unit vector
    orthogonal to ``x`` and ``c`` uniform in ``cos``, so its cosine to the
    original is exactly ``c`` (up to float32 rounding). Copies of one row are
    about ``c1 * c2`` apart from each other. Copies follow the original rows.

    Returns
    -------
    x_new : ndarray of float32, shape (n + n_copies, d)
    origin : ndarray of int64, shape (n + n_copies,)
        The row each row was copied from (its own index for original rows):
        the planted groups are the rows that share an origin.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.eye(8, dtype=np.float32)
    >>> y, origin = plant_duplicates(x, 0.25, copies=(1, 1), seed=0)
    >>> y.shape, origin[8:].size
    ((10, 8), 2)
    >>> c = float(y[8] @ y[origin[8]])
    >>> 0.95 <= round(c, 4) <= 0.99
    True
    """
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"frac must be in [0, 1], got {frac}")
    lo_c, hi_c = copies
    if not 1 <= lo_c <= hi_c:
        raise ValueError(f"copies must be (min, max) with 1 <= min <= max, got {copies}")
    if not -1.0 < cos[0] <= cos[1] <= 1.0:
        raise ValueError(f"cos must be (low, high) within (-1, 1], got {cos}")
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, size=round(frac * n), replace=False))
    reps = rng.integers(lo_c, hi_c + 1, chosen.size)
    src = np.repeat(chosen, reps).astype(np.int64)
    base = x[src]
    u = rng.standard_normal(base.shape, dtype=np.float32)
    u -= (u * base).sum(1, keepdims=True) * base  # orthogonal to the (unit) original
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    c = rng.uniform(cos[0], cos[1], src.size).astype(np.float32)[:, None]
    y = c * base + np.sqrt(1 - c * c) * u
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    origin = np.concatenate([np.arange(n, dtype=np.int64), src])
    return np.concatenate([x, y.astype(np.float32)]), origin
