"""fastface against FAISS's best CPU configurations on several data shapes, in one run.

Three synthetic shapes (generated here from fixed seeds; nothing is downloaded):

``faces512``
    Identity-clustered 512-d face-like unit vectors
    (:class:`fastface.datasets.SyntheticFaces`, 10 samples per identity, 300
    population groups), inner product. Queries are *strangers*: samples of
    identities not in the gallery, from the same groups, so that their top 10
    are near ties (the hard case for PQ ordering; see ``bench/rerank.py``).
``clustered48``
    Low-dimensional (d = 48), strongly clustered unit vectors, inner product
    (angular), like small word or item embeddings: ``n / 500`` cluster centres
    on the sphere with Zipf-distributed sizes (weight of cluster ``c`` is
    ``1 / (c + 10)``), each with its own spread (relative noise 0.15 to 0.45),
    queries drawn from the same mixture.
``weak128``
    128-d vectors with weak structure, squared L2: a Gaussian whose spectrum
    decays slowly (standard deviation of component ``i`` is ``(i + 1) ** -0.3``)
    under a random rotation, plus a faint mixture (200 centres at a quarter of
    the spread). IVF partitions of such data have a low recall ceiling.

For each shape every method is built once (cached under ``--work``), then
every configuration (``nprobe`` x re-rank factor, or ``efSearch``) runs once
for its recall and a rough time; the configurations that may be a method's
best at a recall target (for each method and target, up to six of the
fastest by that rough time, within 1.6x of the fastest) are then timed in
interleaved rounds (each round runs each of them once, so that load from
other processes falls on all alike). QPS is the median over rounds of
``nq / seconds`` for all queries in one call.

Methods (equal memory for the codes: every IVF method keeps ``B`` bytes of
PQ codes per vector, ``B = M_fs / 2`` for FAISS's fast-scan ``M_fs``):

- ``faiss fs+refine``: FAISS ``IVF{nlist},PQ{M_fs}x4fs`` + ``IndexRefineFlat``
  (every raw vector in RAM as float32), sweeping ``nprobe`` and ``k_factor``;
- ``faiss pq8+refine``: FAISS ``IVF{nlist},PQ{M_fs/2}`` (8-bit) + ``IndexRefineFlat``;
- ``faiss hnsw32``: FAISS ``HNSW32,Flat`` (float32 vectors and graph in RAM;
  not equal memory: a second reference), sweeping ``efSearch``;
- ``fastface fs``: 4-bit fast-scan (FAISS's scan, same ``M_fs``), re-ranked
  from float16 vectors memory-mapped from disk;
- ``fastface pq8``: 8-bit codes (``M_fs / 2``), native scan, re-ranked from disk;
- ``fastface pq8+soar``: 8-bit codes (``M_fs / 4``) with spilled assignment
  (each vector in two lists, so twice the entries: the same code bytes),
  re-ranked from disk;
- ``fastface pq8+soar (same M)``: ``fastface pq8`` (``M_fs / 2``) with spilled
  assignment: twice the code bytes of the others, to isolate what SOAR buys;
- ``fastface fs (numba rerank)``: ``fastface fs`` re-ranked by the earlier
  Numba kernel (what the native kernel replaced), for the attribution;
- ``fastface fs (faiss coarse)``: ``fastface fs`` with the coarse assignment
  made by FAISS's flat quantizer (what fastface's own coarse kernel replaced),
  then fastface's scan and re-ranking, for the attribution.

The summary gives, per shape and recall target (R@10 >= 0.9, 0.95, 0.99), the
best QPS of each method, its configuration and its ratio to the best FAISS
IVF configuration (the goal) and to HNSW32. JSON and a plot go under
``bench/results/``.

Usage::

    python bench/shapes.py                    # 500k faces, 1M clustered48, 500k weak128
    python bench/shapes.py --quick            # 100k each, a few minutes
    python bench/shapes.py --shapes clustered48 --n 200000
"""

from __future__ import annotations

import os

# FAISS ships its own libgomp and fastface links the system one: idle threads of two
# OpenMP runtimes spinning against each other cost both sides on a small shared
# machine, so idle threads sleep (set before either runtime starts; applies to all).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import dataclasses
import fcntl
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from fastface import IVFPQParams, ShardedIndex
from fastface._bench.common import PeakRSS, bench_meta
from fastface.datasets import SyntheticFaces
from fastface.eval import ground_truth, recall_at_k

TARGETS = (0.9, 0.95, 0.99)
SHAPES = ("faces512", "clustered48", "weak128")
DEFAULT_N = {"faces512": 500_000, "clustered48": 1_000_000, "weak128": 500_000}


# --- data -------------------------------------------------------------------------------------


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def stranger_queries(data: SyntheticFaces, nq: int, seed: int) -> np.ndarray:
    """Samples of identities not in the gallery, from the same population groups.

    A generator twice as large with the same seed holds the same first
    ``n_identities``; those beyond are strangers of the same groups.
    """
    twin = SyntheticFaces(
        2 * data.n_identities, data.per_identity, data.d, seed=data.seed, n_groups=data.n_groups
    )
    rng = np.random.default_rng(seed)
    labels = rng.integers(data.n_identities, 2 * data.n_identities, nq)
    c = twin.centres(labels)
    scale = np.float32(np.sqrt(1.0 / data.intra_cos - 1.0) / np.sqrt(data.d))
    x = c + rng.standard_normal(c.shape, dtype=np.float32) * scale
    return _unit_rows(x).astype(np.float32)


class Mixture:
    """Clustered or weakly structured vectors, drawn chunk by chunk from fixed seeds."""

    def __init__(self, shape: str, seed: int = 0) -> None:
        self.shape = shape
        self.seed = seed
        rng = np.random.default_rng([seed, 1])
        if shape == "clustered48":
            self.d = 48
            self.metric = "ip"
            self.nc = 2000
            self.centres = _unit_rows(rng.standard_normal((self.nc, self.d)).astype(np.float32))
            w = 1.0 / (np.arange(self.nc) + 10.0)
            self.p = w / w.sum()
            self.spread = rng.uniform(0.15, 0.45, self.nc).astype(np.float32)
        elif shape == "weak128":
            self.d = 128
            self.metric = "l2"
            self.nc = 200
            self.std = ((np.arange(self.d) + 1.0) ** -0.3).astype(np.float32)
            q, _ = np.linalg.qr(rng.standard_normal((self.d, self.d)))
            self.rot = q.astype(np.float32)
            self.centres = (
                rng.standard_normal((self.nc, self.d)).astype(np.float32) * self.std * 0.25
            )
            self.p = np.full(self.nc, 1.0 / self.nc)
        else:
            raise ValueError(shape)

    def sample(self, n: int, stream: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 2, stream])
        c = rng.choice(self.nc, size=n, p=self.p)
        g = rng.standard_normal((n, self.d), dtype=np.float32)
        if self.shape == "clustered48":
            x = self.centres[c] + g * (self.spread[c, None] / np.sqrt(self.d))
            return _unit_rows(x).astype(np.float32)
        x = (g * self.std + self.centres[c]) @ self.rot
        return np.ascontiguousarray(x, np.float32)

    def write_npy(self, path: Path, n: int, chunk: int = 100_000) -> None:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, self.d))
        for s, lo in enumerate(range(0, n, chunk)):
            out[lo : min(n, lo + chunk)] = self.sample(min(n, lo + chunk) - lo, s)
        out.flush()
        del out


@dataclasses.dataclass
class Shape:
    name: str
    n: int
    d: int
    metric: str
    npy: Path
    xq: np.ndarray
    gt: np.ndarray
    desc: dict[str, Any]
    nlist: int
    M_fs: int


def make_shape(name: str, n: int, nq: int, k: int, work: Path) -> Shape:
    work.mkdir(parents=True, exist_ok=True)
    npy = work / f"{name}-{n}.npy"
    if name == "faces512":
        data = SyntheticFaces(n // 10, 10, 512, seed=0, n_groups=300)
        if not npy.exists():
            data.write_npy(npy.with_suffix(".tmp.npy"))
            npy.with_suffix(".tmp.npy").rename(npy)
        xq = stranger_queries(data, nq, seed=1)
        d, metric, M_fs = 512, "ip", 64
        desc = {
            "generator": "SyntheticFaces",
            "n_identities": n // 10,
            "per_identity": 10,
            "n_groups": 300,
            "queries": "strangers",
        }
    else:
        mix = Mixture(name)
        if not npy.exists():
            mix.write_npy(npy.with_suffix(".tmp.npy"), n)
            npy.with_suffix(".tmp.npy").rename(npy)
        xq = mix.sample(nq, stream=10**6)
        d, metric = mix.d, mix.metric
        M_fs = d // 2
        desc = {"generator": "Mixture", "clusters": mix.nc, "queries": "same distribution"}
    nlist = 1 << int(np.rint(np.log2(4 * np.sqrt(n))))
    gt_path = work / f"gt-{name}-{n}-nq{nq}-k{k}.npy"
    if gt_path.exists():
        gt = np.load(gt_path)
    else:
        gt = ground_truth(np.load(npy, mmap_mode="r"), xq, k, metric=metric)[1]
        np.save(gt_path, gt)
    return Shape(name, n, d, metric, npy, xq, gt, desc, nlist, M_fs)


# --- methods ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    method: str
    knobs: dict[str, int]
    fn: Callable[[], tuple[np.ndarray, np.ndarray]]
    recall: float = 0.0
    first: float = 0.0
    times: list[float] = dataclasses.field(default_factory=list)


def _faiss_metric(metric: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def build_faiss_ivf(shape: Shape, key: str, spec: str, work: Path) -> tuple[Any, dict[str, Any]]:
    path = work / f"faiss-{shape.name}-{shape.n}-{key}.index"
    xb = np.load(shape.npy, mmap_mode="r")
    info: dict[str, Any] = {"spec": spec}
    if path.exists():
        index = faiss.read_index(str(path))
        info["cached"] = True
    else:
        t = time.perf_counter()
        index = faiss.index_factory(shape.d, spec, _faiss_metric(shape.metric))
        rng = np.random.default_rng(0)
        ntrain = min(shape.n, max(256 * shape.nlist, 65536))
        sample = np.asarray(xb[np.sort(rng.choice(shape.n, ntrain, replace=False))])
        index.train(sample)
        for lo in range(0, shape.n, 100_000):
            index.add(np.asarray(xb[lo : lo + 100_000]))
        info["build_seconds"] = time.perf_counter() - t
        faiss.write_index(index, str(path))
    return index, info


def build_faiss_hnsw(shape: Shape, work: Path) -> tuple[Any, dict[str, Any]]:
    path = work / f"faiss-{shape.name}-{shape.n}-hnsw32.index"
    info: dict[str, Any] = {"spec": "HNSW32,Flat", "efConstruction": 40}
    if path.exists():
        index = faiss.read_index(str(path))
        info["cached"] = True
    else:
        xb = np.load(shape.npy, mmap_mode="r")
        t = time.perf_counter()
        index = faiss.IndexHNSWFlat(shape.d, 32, _faiss_metric(shape.metric))
        for lo in range(0, shape.n, 100_000):
            index.add(np.asarray(xb[lo : lo + 100_000]))
        info["build_seconds"] = time.perf_counter() - t
        faiss.write_index(index, str(path))
    return index, info


def build_fastface(
    shape: Shape, key: str, params: IVFPQParams, work: Path
) -> tuple[ShardedIndex, dict[str, Any]]:
    path = work / f"ff-{shape.name}-{shape.n}-{key}"
    info: dict[str, Any] = {"params": params.to_dict()}

    def complete() -> bool:  # a build that stopped half-way is started again
        if not (path / "manifest.json").exists():
            return False
        try:
            old = ShardedIndex.open(path)
        except Exception:  # anything unreadable is rebuilt
            return False
        done = old.params == params and old.ntotal == shape.n
        old.close()
        return done

    if not complete():
        if path.exists():
            shutil.rmtree(path)
        with PeakRSS() as mem:
            t = time.perf_counter()
            ShardedIndex.build(shape.npy, path, params, shard_size=shape.n, progress=False).close()
            info["build_seconds"] = time.perf_counter() - t
        info["build_peak_anon_gib"] = (mem.peak_anon - mem.start_anon) / 2**30
    else:
        info["cached"] = True
    index = ShardedIndex.open(path)  # read-only: raw vectors memory-mapped from disk
    info["disk_bytes"] = {
        p.name.split(".", 1)[-1]: p.stat().st_size
        for p in path.iterdir()
        if p.name.startswith("shard-")
    }
    return index, info


def numba_rerank_search(index: ShardedIndex, xq: np.ndarray, k: int, nprobe: int, f: int) -> Any:
    """The re-ranking path as it was before the native kernel: rows looked up in NumPy,
    then the Numba kernel (kept as the GPU kernels' CPU reference)."""
    from fastface.kernels.rerank import rerank_f16

    _, cand = index.scan(xq, k * f, index.assign(xq, nprobe))
    shard = next(index.shards())
    rows = np.ascontiguousarray(shard.rows_of(cand))
    D = np.full((xq.shape[0], k), -np.inf if index.params.metric == "ip" else np.inf, np.float32)
    I = np.full((xq.shape[0], k), -1, np.int64)
    base = shard.vectors
    assert base is not None
    rerank_f16(xq, base.view(np.uint16), rows, cand, index.params.metric == "l2", D, I)
    return D, I


def faiss_coarse_search(index: ShardedIndex, xq: np.ndarray, k: int, nprobe: int, f: int) -> Any:
    """``search`` with the coarse assignment FAISS's flat quantizer makes (a heap of
    ``nprobe`` per query, after a BLAS product): the route before fastface's kernel."""
    Dq, Iq = index.codec.coarse_quantizer().search(xq, nprobe)
    _, cand = index.scan(xq, k * f, (Dq, Iq))
    return index.rescore(xq, cand, k)


def configs_for(
    shape: Shape, methods: list[str], args: argparse.Namespace, work: Path
) -> tuple[list[Config], dict[str, Any]]:
    xq, k = shape.xq, args.k
    d, nlist, M_fs = shape.d, shape.nlist, shape.M_fs
    configs: list[Config] = []
    builds: dict[str, Any] = {}
    nprobes = [p for p in args.nprobe if p <= nlist]
    xb_ram: np.ndarray | None = None

    def refine(name: str, spec: str) -> None:
        nonlocal xb_ram
        ivf, info = build_faiss_ivf(shape, name.split()[1], spec, work)
        if xb_ram is None:
            xb_ram = np.load(shape.npy)  # float32 in RAM, as IndexRefineFlat needs
        ref = faiss.IndexRefineFlat(ivf, faiss.swig_ptr(xb_ram))
        ref.own_fields = False
        builds[name] = info
        keep.append((ivf, ref))
        for p in nprobes:
            for f in args.rerank:
                sp = faiss.IndexRefineSearchParameters(
                    k_factor=float(f), base_index_params=faiss.SearchParametersIVF(nprobe=p)
                )
                configs.append(
                    Config(
                        name,
                        {"nprobe": p, "rerank": f},
                        lambda r=ref, sp=sp: r.search(xq, k, params=sp),
                    )
                )

    keep: list[Any] = []
    store = "float16"
    for name in methods:
        if name == "faiss fs+refine":
            refine(name, f"IVF{nlist},PQ{M_fs}x4fs")
        elif name == "faiss pq8+refine":
            refine(name, f"IVF{nlist},PQ{M_fs // 2}")
        elif name == "faiss hnsw32":
            hnsw, info = build_faiss_hnsw(shape, work)
            builds[name] = info
            keep.append(hnsw)
            for ef in args.ef:
                sp = faiss.SearchParametersHNSW(efSearch=max(ef, k))
                configs.append(
                    Config(name, {"efSearch": ef}, lambda h=hnsw, sp=sp: h.search(xq, k, params=sp))
                )
        else:
            fs = {"nbits": 4, "metric": shape.metric, "store_vectors": store}
            pq8 = {"metric": shape.metric, "store_vectors": store}
            soar = {"soar_lambda": args.soar_lambda}
            variants: dict[str, tuple[str, int, dict[str, Any]]] = {
                "fastface fs": ("fs", M_fs, fs),
                "fastface fs (numba rerank)": ("fs", M_fs, fs),
                "fastface fs (faiss coarse)": ("fs", M_fs, fs),
                "fastface pq8": ("pq8", M_fs // 2, pq8),
                "fastface pq8+soar": ("pq8soar", M_fs // 4, {**pq8, **soar}),
                "fastface pq8+soar (same M)": ("pq8soarM", M_fs // 2, {**pq8, **soar}),
            }
            if name not in variants:
                raise SystemExit(f"unknown method {name!r}; pick from {ALL_METHODS}")
            key, M, kw = variants[name]
            params = IVFPQParams(d, nlist, M, **kw)
            index, info = build_fastface(shape, key, params, work)
            builds[name] = info
            keep.append(index)
            numba = name.endswith("(numba rerank)")
            fcoarse = name.endswith("(faiss coarse)")
            for p in nprobes:
                for f in args.rerank:
                    fn: Callable[[], Any]
                    if numba:
                        fn = lambda i=index, p=p, f=f: numba_rerank_search(i, xq, k, p, f)  # noqa: E731
                    elif fcoarse:
                        fn = lambda i=index, p=p, f=f: faiss_coarse_search(i, xq, k, p, f)  # noqa: E731
                    else:
                        fn = lambda i=index, p=p, f=f: i.search(xq, k, nprobe=p, rerank=f)  # noqa: E731
                    configs.append(Config(name, {"nprobe": p, "rerank": f}, fn))
    return configs, {"builds": builds, "keep": keep}


ALL_METHODS = [
    "faiss fs+refine",
    "faiss pq8+refine",
    "faiss hnsw32",
    "fastface fs",
    "fastface pq8",
    "fastface pq8+soar",
    "fastface pq8+soar (same M)",
    "fastface fs (numba rerank)",
    "fastface fs (faiss coarse)",
]


@contextlib.contextmanager
def bench_lock(path: Path | None) -> Iterator[float]:
    """Hold the machine-wide benchmark lock (``flock``) while timing; yields the wait in s."""
    if path is None:
        yield 0.0
        return
    t = time.perf_counter()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield time.perf_counter() - t
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def run_shape(shape: Shape, methods: list[str], args: argparse.Namespace, work: Path) -> dict:
    configs, held = configs_for(shape, methods, args, work)  # builds happen here, unlocked
    if args.build_only:
        return {}
    if args.recall_only:  # no timing: needs no lock
        rows = []
        for c in configs:
            _, ids = c.fn()
            rows.append({"method": c.method, **c.knobs, "R@10": recall_at_k(ids, shape.gt, args.k)})
        del held
        return {"rows": rows, "load_avg": {"after": os.getloadavg()}}
    with bench_lock(args.lock) as waited:
        t_lock = time.perf_counter()
        out = _time_shape(shape, configs, methods, args)
        out["lock"] = {"waited_s": waited, "held_s": time.perf_counter() - t_lock}
    del held
    return out


def _time_shape(
    shape: Shape, configs: list[Config], methods: list[str], args: argparse.Namespace
) -> dict:
    nq = shape.xq.shape[0]
    load_before = os.getloadavg()
    for c in configs:  # recall (and warm-up) once, with a first, rough time
        t = time.perf_counter()
        _, ids = c.fn()
        c.first = time.perf_counter() - t
        c.recall = recall_at_k(ids, shape.gt, args.k)
    # time in rounds only the configurations that may be a method's best at a target:
    # for each method and target, the fastest few (by the rough time) that reach it
    live_ids: set[int] = set()
    for m in methods:
        mine = [c for c in configs if c.method == m]
        for target in TARGETS:
            ok = sorted((c for c in mine if c.recall >= target), key=lambda c: c.first)
            if ok:
                fastest = ok[0].first
                live_ids.update(id(c) for c in ok[:6] if c.first <= 1.6 * fastest)
    live = [c for c in configs if id(c) in live_ids]
    for rnd in range(args.repeat):
        for c in live:
            t = time.perf_counter()
            c.fn()
            c.times.append(time.perf_counter() - t)
        print(
            f"  {shape.name}: round {rnd + 1}/{args.repeat} ({len(live)} of {len(configs)} "
            "configurations)",
            flush=True,
        )
    rows = []
    for c in configs:
        row: dict[str, Any] = {
            "method": c.method,
            **c.knobs,
            "R@10": c.recall,
            "first_call_qps": nq / c.first,
        }
        if c.times:
            secs = statistics.median(c.times)
            row.update(qps=nq / secs, ms_per_query=1e3 * secs / nq, times_s=c.times)
        rows.append(row)
    summary = summarise(rows, methods)
    return {
        "rows": rows,
        "summary": summary,
        "load_avg": {"before": load_before, "after": os.getloadavg()},
    }


def summarise(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    def best(method: str, target: float) -> dict[str, Any] | None:
        ok = [r for r in rows if r["method"] == method and r["R@10"] >= target and "qps" in r]
        return max(ok, key=lambda r: r["qps"]) if ok else None

    out: dict[str, Any] = {}
    for t in TARGETS:
        faiss_ivf = [
            b for m in methods if m.startswith("faiss") and "hnsw" not in m if (b := best(m, t))
        ]
        hnsw = best("faiss hnsw32", t)
        ref = max((b["qps"] for b in faiss_ivf), default=None)
        # FAISS's best configuration that reaches the target, whichever it is (an IVF
        # one, or HNSW32 where no IVF configuration of the grid reaches it)
        faiss_any = [(m, b) for m in methods if m.startswith("faiss") if (b := best(m, t))]
        top = max(faiss_any, key=lambda mb: mb[1]["qps"], default=None)
        per: dict[str, Any] = {}
        for m in methods:
            b = best(m, t)
            if b is None:
                per[m] = None
                continue
            per[m] = {
                "qps": b["qps"],
                "R@10": b["R@10"],
                "config": {k: v for k, v in b.items() if k in ("nprobe", "rerank", "efSearch")},
                "ratio_to_best_faiss_ivf": None if ref is None else b["qps"] / ref,
                "ratio_to_hnsw32": None if hnsw is None else b["qps"] / hnsw["qps"],
                "best_faiss": None if top is None else top[0],
                "ratio_to_best_faiss": None if top is None else b["qps"] / top[1]["qps"],
            }
        out[f"R@10>={t}"] = per
    return out


def print_summary(name: str, summary: dict[str, Any], methods: list[str]) -> None:
    print(
        f"\n{name}: best QPS at each recall target (ratio to the best FAISS IVF+refine; to HNSW32;"
        " to FAISS's best configuration that reaches the target, whichever)"
    )
    print(f"{'method':28s}" + "".join(f"{'R@10>=' + str(t):>38s}" for t in TARGETS))
    for m in methods:
        cells = []
        for t in TARGETS:
            b = summary[f"R@10>={t}"][m]
            if b is None:
                cells.append(f"{'-':>38s}")
                continue
            knobs = ",".join(f"{v}" for v in b["config"].values())
            r1 = b["ratio_to_best_faiss_ivf"]
            r2 = b["ratio_to_hnsw32"]
            r3 = b.get("ratio_to_best_faiss")
            cell = f"{b['qps']:7.0f} x{r1 or 0:4.2f} x{r2 or 0:4.2f} x{r3 or 0:4.2f} ({knobs})"
            cells.append(cell.rjust(38))
        print(f"{m:28s}" + "".join(cells))


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        rows = [r for r in results[name]["rows"] if "qps" in r]
        for m in dict.fromkeys(r["method"] for r in rows):
            pts = sorted(
                ((r["R@10"], r["qps"]) for r in rows if r["method"] == m),
                key=lambda p: (-p[0], -p[1]),
            )
            front, top = [], 0.0  # Pareto front: best QPS at each recall or above
            for rec, qps in pts:
                if qps > top:
                    front.append((rec, qps))
                    top = qps
            if front:
                xs, ys = zip(*sorted(front), strict=True)
                style = "--" if m.startswith("faiss") else "-"
                ax.plot(xs, ys, style, marker="o", ms=3, label=m)
        for t in TARGETS:
            ax.axvline(t, color="grey", lw=0.5)
        ax.set_yscale("log")
        ax.set_xlim(0.85, 1.0)
        ax.set_xlabel("R@10")
        ax.set_ylabel("queries per second (log)")
        ax.set_title(f"{name} (n={results[name]['shape']['n']})", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge_runs(paths: list[Path], out: Path) -> None:
    """One JSON (each shape with the meta and config of the run that timed it) and one plot."""
    results: dict[str, Any] = {}
    runs = []
    for p in paths:
        run = json.loads(p.read_text())
        runs.append({"file": str(p), "meta": run["meta"], "config": run["config"]})
        for name, res in run["results"].items():
            # summaries recomputed from the rows (a later file's shape replaces an earlier's)
            methods = list(dict.fromkeys(r["method"] for r in res["rows"]))
            res = {**res, "summary": summarise(res["rows"], methods), "run": str(p)}
            results[name] = res
            print_summary(name, res["summary"], methods)
    payload = {"runs": runs, "results": results}
    out.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    ap.add_argument("--n", type=int, help="vectors per shape (default: 500k, 1M, 500k)")
    ap.add_argument("--quick", action="store_true", help="100k vectors per shape, 300 queries")
    ap.add_argument(
        "--sizes",
        nargs="+",
        default=[],
        metavar="SHAPE=N",
        help="vectors for some shapes (e.g. faces512=100000); overrides --n for them",
    )
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--methods", nargs="+", default=ALL_METHODS)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--rerank", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64, 128])
    ap.add_argument("--ef", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024])
    ap.add_argument("--soar-lambda", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fastface-shapes"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/shapes.json"))
    ap.add_argument(
        "--lock",
        type=Path,
        default=None,
        help="flock this file around each shape's timing phase (e.g. /work/bench.lock)",
    )
    ap.add_argument(
        "--recall-only",
        action="store_true",
        help="recall of every configuration, untimed (no lock needed)",
    )
    ap.add_argument(
        "--build-only", action="store_true", help="build data, ground truth and indexes; no timing"
    )
    ap.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="combine the results of earlier runs (one per shape) into --out and its plot",
    )
    args = ap.parse_args(argv)
    if args.merge:
        merge_runs(args.merge, args.out)
        return
    if args.quick:
        args.n = args.n or 100_000
        args.nq = min(args.nq, 300)
    results: dict[str, Any] = {}
    meta = bench_meta(["bench/shapes.py", *argv])
    for name in args.shapes:
        sizes = dict(kv.split("=", 1) for kv in args.sizes)
        n = int(sizes[name]) if name in sizes else (args.n or DEFAULT_N[name])
        t = time.perf_counter()
        shape = make_shape(name, n, args.nq, args.k, args.work)
        print(
            f"{name}: n={n} d={shape.d} metric={shape.metric} nlist={shape.nlist} "
            f"M_fs={shape.M_fs} (data and ground truth {time.perf_counter() - t:.0f} s)",
            flush=True,
        )
        res = run_shape(shape, args.methods, args, args.work)
        if args.build_only:
            continue
        res["shape"] = {
            "name": name,
            "n": n,
            "d": shape.d,
            "metric": shape.metric,
            "nlist": shape.nlist,
            "M_fs": shape.M_fs,
            "nq": args.nq,
            "k": args.k,
            "code_bytes_per_vector": shape.M_fs // 2,
            **shape.desc,
        }
        results[name] = res
        if not args.recall_only:
            print_summary(name, res["summary"], args.methods)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "meta": meta,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "results": results,
        }
        args.out.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    if args.build_only or args.recall_only:
        print(f"done ({'built' if args.build_only else 'recall only, no timing'})")
        return
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main(sys.argv[1:])
