"""Training a codec: OPQ rotation, coarse k-means (one or two levels), HNSW graph, PQ codebooks.

FAISS does the work (``faiss.Kmeans``, ``OPQMatrix``, ``IndexHNSWFlat``,
``IndexIVFPQ.train``); this module decides the stages and their sizes:

1. **OPQ** (``opq``): a rotation trained on at most 65,536 rows; every later
   stage sees the rotated rows.
2. **Coarse k-means**: up to :data:`TWO_LEVEL_FROM` lists in one k-means;
   above, in two levels, so that time stays bounded at 2**16-2**20 lists:
   ``sqrt(nlist)`` clusters first, then each cluster split into a number
   of lists proportional to its size (the scheme of FAISS's contrib
   clustering, written here on ``faiss.Kmeans``). A one-level k-means costs
   ``n * nlist`` distance computations per iteration; two levels cost about
   ``n * 2 * sqrt(nlist)``.
3. **HNSW graph** (``coarse_hnsw``) over the centroids, or a flat quantizer.
4. **PQ codebooks** on the residuals of at most ``256 * 2**nbits`` rows.

Each stage is logged (``logging.getLogger("fastface")``, level INFO, with its
time) and, with ``progress=True``, advances a bar. FAISS's k-means prints a
warning on stderr for every clustering that gets fewer than 39 points per
centroid (once per PQ sub-quantizer: 16 identical lines for ``PQ16``); here
the condition is checked before training, reported once as one log warning,
and FAISS's threshold (``min_points_per_centroid``, used by FAISS only for
that message) is lowered so that FAISS stays silent.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from .params import METRICS, IVFPQParams

__all__ = ["TWO_LEVEL_FROM", "default_train_size", "kmeans", "train_faiss_codec"]

log = logging.getLogger("fastface")

#: One k-means up to this many lists; two levels above.
TWO_LEVEL_FROM = 8192
#: FAISS's default ``min_points_per_centroid`` (below it FAISS warns).
FAISS_MIN_POINTS = 39
_OPQ_MAX_ROWS = 65536
_NITER = 20
_NITER_LEVEL2 = 10


def default_train_size(params: IVFPQParams) -> int:
    """Rows sampled to train a codec: ``256 * nlist`` for small ``nlist`` (FAISS's
    k-means default), ``64 * nlist`` past 2**14 lists, at least 65,536 and at most
    2 GiB of float32 rows."""
    n = 256 * params.nlist if params.nlist <= 1 << 14 else max(1 << 22, 64 * params.nlist)
    cap = max(65536, (1 << 29) // params.d)
    return int(max(65536, min(n, cap)))


class _Stages:
    """Logs each stage with its time and advances an optional progress bar."""

    def __init__(self, names: list[str], progress: bool) -> None:
        self.bar: Any = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(names), unit="stage", desc="train", leave=False)
        self.t0 = time.perf_counter()
        self.current: str | None = None
        self.started = self.t0

    def start(self, name: str) -> None:
        self.finish()
        self.current = name
        self.started = time.perf_counter()
        log.info("train: %s ...", name)
        if self.bar is not None:
            self.bar.set_postfix_str(name)

    def finish(self) -> None:
        if self.current is not None:
            log.info("train: %s done in %.1f s", self.current, time.perf_counter() - self.started)
            if self.bar is not None:
                self.bar.update(1)
            self.current = None

    def close(self) -> None:
        self.finish()
        if self.bar is not None:
            self.bar.close()
        log.info("train: codec trained in %.1f s", time.perf_counter() - self.t0)


def _quiet(cp: Any, n: int, k: int, what: str, notes: list[str]) -> None:
    """Check FAISS's too-few-points condition ourselves, note it, and silence FAISS's copy."""
    if n < k * FAISS_MIN_POINTS:
        notes.append(
            f"{what}: {n} points for {k} centroids (FAISS advises >= {k * FAISS_MIN_POINTS})"
        )
    cp.min_points_per_centroid = 1  # FAISS uses it only for that warning


def _warn_once(notes: list[str]) -> None:
    if notes:
        log.warning(
            "training with few points per centroid; quality may suffer: %s", "; ".join(notes)
        )


def _subsample(x: npt.NDArray[np.float32], n: int, seed: int) -> npt.NDArray[np.float32]:
    if x.shape[0] <= n:
        return x
    rows = np.sort(np.random.default_rng(seed).choice(x.shape[0], size=n, replace=False))
    return np.ascontiguousarray(x[rows])


def kmeans(
    x: npt.NDArray[np.float32],
    k: int,
    *,
    spherical: bool,
    seed: int = 0,
    niter: int = _NITER,
    notes: list[str] | None = None,
    what: str = "k-means",
) -> npt.NDArray[np.float32]:
    """``k`` centroids of ``x`` by FAISS's k-means (quiet: see the module docstring)."""
    d = x.shape[1]
    if x.shape[0] == k:
        return np.array(x, dtype=np.float32)
    km: Any = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=spherical, verbose=False)
    _quiet(km.cp, x.shape[0], k, what, notes if notes is not None else [])
    km.train(x)
    return np.ascontiguousarray(km.centroids, np.float32)


def _split_counts(sizes: npt.NDArray[np.int64], nlist: int) -> npt.NDArray[np.int64]:
    """Lists per first-level cluster: proportional to its size (largest remainders),
    at least one per non-empty cluster, at most its size, ``nlist`` in all."""
    total = int(sizes.sum())
    want = sizes * (nlist / total)
    out = np.minimum(
        np.maximum(np.floor(want).astype(np.int64), (sizes > 0).astype(np.int64)), sizes
    )
    left = nlist - int(out.sum())
    while left != 0:
        if left > 0:
            room = np.flatnonzero(out < sizes)
            order = room[np.argsort(-(want[room] - out[room]), kind="stable")][:left]
            out[order] += 1
        else:
            room = np.flatnonzero(out > 1)
            order = room[np.argsort(want[room] - out[room], kind="stable")][:-left]
            out[order] -= 1
        left = nlist - int(out.sum())
    return out


def two_level_kmeans(
    x: npt.NDArray[np.float32],
    nlist: int,
    *,
    spherical: bool,
    seed: int = 0,
    notes: list[str] | None = None,
    bar: Any = None,
) -> npt.NDArray[np.float32]:
    """``nlist`` centroids in two levels: ``sqrt(nlist)`` clusters, then each split by size."""
    notes = notes if notes is not None else []
    n1 = max(2, round(math.sqrt(nlist)))
    c1 = kmeans(x, n1, spherical=spherical, seed=seed, notes=notes, what="coarse level 1")
    index: Any = faiss.IndexFlatIP(x.shape[1]) if spherical else faiss.IndexFlatL2(x.shape[1])
    index.add(c1)
    _, a = index.search(x, 1)
    a = a[:, 0]
    sizes = np.bincount(a, minlength=n1).astype(np.int64)
    if int(sizes.sum()) < nlist:
        raise ValueError(f"two-level k-means: {x.shape[0]} points for {nlist} lists")
    counts = _split_counts(sizes, nlist)
    order = np.argsort(a, kind="stable")
    starts = np.concatenate(([0], np.cumsum(sizes)))
    parts = []
    few = 0
    for c in range(n1):
        k = int(counts[c])
        if k == 0:
            continue
        sub = np.ascontiguousarray(x[order[starts[c] : starts[c + 1]]])
        if sub.shape[0] < k * FAISS_MIN_POINTS:
            few += 1
        part_notes: list[str] = []
        parts.append(
            kmeans(
                sub,
                k,
                spherical=spherical,
                seed=seed + 1 + c,
                niter=_NITER_LEVEL2,
                notes=part_notes,
            )
        )
        if bar is not None:
            bar.set_postfix_str(f"coarse level 2: {c + 1}/{n1}")
    if few:
        notes.append(
            f"coarse level 2: {few} of {n1} clusters have < {FAISS_MIN_POINTS} points per list"
        )
    return np.concatenate(parts)


def top_level(
    centroids: npt.NDArray[np.float32], top: int, metric: int, *, seed: int, notes: list[str]
) -> Any:
    """A two-level coarse quantizer: an ``IndexIVFFlat`` of ``top`` lists holding ``centroids``.

    The top centroids are k-means over the centroids (FAISS); each centroid is
    stored, under its own number, in the list of its nearest top centroid, and
    a direct map lets FAISS reconstruct centroid ``i`` (the residuals of PQ).
    """
    d = centroids.shape[1]
    q1: Any = faiss.IndexFlat(d, metric)
    nested: Any = faiss.IndexIVFFlat(q1, d, top, metric)
    nested.own_fields = True
    q1.this.disown()  # the nested index owns its quantizer
    nested.cp.seed = seed + 3
    nested.cp.niter = _NITER_LEVEL2
    _quiet(nested.cp, centroids.shape[0], top, "top level", notes)
    nested.train(centroids)
    nested.add(centroids)
    nested.make_direct_map()
    return nested


def train_faiss_codec(
    params: IVFPQParams, x: npt.NDArray[np.float32], *, seed: int = 0, progress: bool = False
) -> Any:
    """A trained FAISS index (no vectors) for ``params``: see the module docstring."""
    d = params.d
    spherical = params.metric == "ip"
    names = []
    if params.opq is not None:
        names.append("OPQ rotation")
    names.append("coarse k-means" + (" (two levels)" if params.nlist > TWO_LEVEL_FROM else ""))
    if params.coarse_hnsw is not None:
        names.append("HNSW graph")
    if params.coarse_ivf is not None:
        names.append("top level")
    names.append("PQ codebooks")
    stages = _Stages(names, progress)
    notes: list[str] = []
    log.info("train: %s on %d rows of d=%d (%s)", params.spec, x.shape[0], d, ", ".join(names))
    try:
        lt: Any = None
        xr = x
        if params.opq is not None:
            stages.start("OPQ rotation")
            opq: Any = faiss.OPQMatrix(d, params.opq)
            pq_opq: Any = faiss.ProductQuantizer(d, params.opq, params.nbits)
            sample = _subsample(x, _OPQ_MAX_ROWS, seed)
            _quiet(pq_opq.cp, sample.shape[0], 1 << params.nbits, "OPQ", notes)
            opq.pq = pq_opq
            opq.verbose = False
            opq.train(sample)
            opq.pq = None
            lt = faiss.LinearTransform(d, d, False)
            faiss.copy_array_to_vector(faiss.vector_to_array(opq.A), lt.A)
            lt.is_trained = True
            lt.set_is_orthonormal()
            xr = np.empty_like(x)
            for s in range(0, x.shape[0], 1 << 16):
                xr[s : s + (1 << 16)] = lt.apply(np.ascontiguousarray(x[s : s + (1 << 16)]))
        stages.start(names[1 if params.opq is not None else 0])
        if params.nlist > TWO_LEVEL_FROM:
            centroids = two_level_kmeans(
                xr, params.nlist, spherical=spherical, seed=seed, notes=notes, bar=stages.bar
            )
        else:
            centroids = kmeans(
                xr, params.nlist, spherical=spherical, seed=seed, notes=notes, what="coarse"
            )
        metric = METRICS[params.metric]
        quantizer: Any
        if params.coarse_hnsw is not None:
            stages.start("HNSW graph")
            quantizer = faiss.IndexHNSWFlat(d, params.coarse_hnsw, metric)
            quantizer.hnsw.efConstruction = 40
        elif params.coarse_ivf is not None:
            stages.start("top level")
            quantizer = top_level(centroids, params.coarse_ivf, metric, seed=seed, notes=notes)
        else:
            quantizer = faiss.IndexFlat(d, metric)
        if params.coarse_ivf is None:
            quantizer.add(centroids)
        stages.start("PQ codebooks")
        ivf = params.new_faiss_index(quantizer)
        ivf.cp.seed = seed
        ivf.pq.cp.seed = seed
        ksub = 1 << params.nbits
        pq_sample = _subsample(xr, 256 * ksub, seed + 7)
        _quiet(ivf.pq.cp, pq_sample.shape[0], ksub, "PQ", notes)
        ivf.train(pq_sample)
        if lt is None:
            return ivf
        out = faiss.IndexPreTransform(lt, ivf)
        out.own_fields = True
        lt.this.disown()
        ivf.this.disown()
        out.is_trained = True
        return out
    finally:
        stages.close()
        _warn_once(notes)
