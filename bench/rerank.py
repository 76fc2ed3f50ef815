"""Exact re-ranking from float16 on disk against FAISS refine with float32 in RAM.

One run, same machine, same queries, same IVF-PQ codes: fastface builds a
ShardedIndex per codec (8-bit ``IndexIVFPQ`` and 4-bit fast-scan), stores the
raw vectors as float16 beside the codes and re-ranks from the memory-mapped
file; FAISS wraps *the same trained, filled IVF-PQ index* in
``IndexRefineFlat`` with every raw vector in RAM as float32. Both sweep
``nprobe`` x ``rerank`` (FAISS's ``k_factor``); the table gives R@10 and QPS
(median of ``--repeat`` runs over all queries) and, per method, the best QPS
reaching R@10 >= 0.95 and 0.99, as a ratio to the best FAISS method.

Usage (the data and indexes are cached under ``--work``; delete it to rebuild)::

    python bench/rerank.py                      # 1M x 512 (SyntheticFaces(100_000, 10, 512))
    python bench/rerank.py --identities 20000   # 200k x 512
"""

from __future__ import annotations

import os

# FAISS ships its own libgomp and Numba's "omp" layer uses the system one: two OpenMP
# runtimes whose idle threads spin against each other. On a small shared machine that
# costs milliseconds per call for both sides, so threads sleep when idle (set before
# either runtime starts). Applies to FAISS and fastface alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import psutil

from fastface import IVFPQParams, ShardedIndex
from fastface._bench.common import bench_meta
from fastface.datasets import SyntheticFaces
from fastface.eval import ground_truth, recall_at_k

TARGETS = (0.95, 0.99)


def mem_mb() -> dict[str, float]:
    """Resident memory split into anonymous (heap) and file-backed (mapped files) MiB."""
    out = {"rss": psutil.Process().memory_info().rss / 2**20}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("RssAnon:", "RssFile:")):
                key, val = line.split(":")
                out[key.strip().lower()] = int(val.split()[0]) / 1024
    except OSError:
        pass
    return out


def mem_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before[k], 1) for k in after if k in before}


def stranger_queries(data: SyntheticFaces, nq: int, seed: int) -> np.ndarray:
    """Samples of identities *not* in the gallery, from the same population groups.

    ``SyntheticFaces`` seeds its group centres and each block of identities on
    their own, so a generator twice as large with the same seed holds the same
    first ``n_identities``; identities beyond them are strangers of the same
    groups. Their top 10 are near ties among group members: the case where the
    order of PQ estimates goes wrong and exact re-ranking matters. (Queries of
    enrolled identities find their 10 samples far ahead of everything else, so
    R@10 is 1.0 even without re-ranking.)
    """
    twin = SyntheticFaces(
        2 * data.n_identities, data.per_identity, data.d, seed=data.seed, n_groups=data.n_groups
    )
    rng = np.random.default_rng(seed)
    labels = rng.integers(data.n_identities, 2 * data.n_identities, nq)
    c = twin.centres(labels)
    scale = np.float32(np.sqrt(1.0 / data.intra_cos - 1.0) / np.sqrt(data.d))
    x = c + rng.standard_normal(c.shape, dtype=np.float32) * scale
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def best_at(rows: list[dict[str, Any]], method: str, target: float) -> dict[str, Any] | None:
    ok = [r for r in rows if r["method"] == method and r["R@10"] >= target]
    return max(ok, key=lambda r: r["qps"]) if ok else None


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--identities", type=int, default=100_000)
    ap.add_argument("--per-identity", type=int, default=10)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--groups", type=int, default=300)
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--queries", choices=["strangers", "enrolled"], default="strangers")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--nlist", type=int, default=0, help="default: power of 2 near sqrt(n)")
    ap.add_argument("--M", type=int, default=64)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--rerank", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", default="/tmp/fastface-bench")
    ap.add_argument("--out", default="bench/results/rerank.json")
    args = ap.parse_args(argv)

    data = SyntheticFaces(args.identities, args.per_identity, args.d, seed=0, n_groups=args.groups)
    n, d, k = data.n, args.d, args.k
    nlist = args.nlist or 2 ** round(np.log2(np.sqrt(n)))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    npy = work / f"synth-{n}x{d}-g{args.groups}.npy"
    if not npy.exists():
        t = time.perf_counter()
        data.write_npy(npy.with_suffix(".tmp.npy"))
        npy.with_suffix(".tmp.npy").rename(npy)
        print(f"generated {npy} in {time.perf_counter() - t:.0f}s", flush=True)
    xb_map = np.load(npy, mmap_mode="r")
    if args.queries == "enrolled":
        xq, _ = data.queries(args.nq, seed=1)
    else:
        xq = stranger_queries(data, args.nq, seed=1)
    gt_path = work / f"gt-{n}x{d}-g{args.groups}-{args.queries}-nq{args.nq}-k{k}.npy"
    if gt_path.exists():
        gt = np.load(gt_path)
    else:
        gt = ground_truth(xb_map, xq, k)[1]
        np.save(gt_path, gt)

    memory: dict[str, float] = {}
    build_s: dict[str, float] = {}
    codecs = {"ivfpq8": 8, "fastscan4": 4}
    del xb_map  # ground truth touched every page of this map: start from a clean slate
    base = mem_mb()
    indexes: dict[str, ShardedIndex] = {}
    for name, nbits in codecs.items():
        params = IVFPQParams(d, nlist, args.M, nbits=nbits, store_vectors="float16")
        path = work / f"idx-{name}-{n}x{d}-nl{nlist}-M{args.M}"
        t = time.perf_counter()
        ShardedIndex.build(npy, path, params, shard_size=n, progress=False).close()
        build_s[name] = time.perf_counter() - t
        indexes[name] = ShardedIndex.open(path)  # read-only: vectors memory-mapped
        print(f"{name}: index ready ({build_s[name]:.0f}s)", flush=True)
    memory["fastface_open"] = mem_delta(mem_mb(), base)

    # configurations: (method, codec, nprobe, rerank factor, search function)
    configs: list[tuple[str, str, int, int, Any]] = []
    for name, index in indexes.items():
        for nprobe in args.nprobe:
            configs.append(
                (
                    f"fastface-{name}",
                    name,
                    nprobe,
                    0,
                    lambda i=index, p=nprobe: i.search(xq, k, nprobe=p),
                )
            )
            for f in args.rerank:
                configs.append(
                    (
                        f"fastface-{name}+rerank-f16-disk",
                        name,
                        nprobe,
                        f,
                        lambda i=index, p=nprobe, f=f: i.search(xq, k, nprobe=p, rerank=f),
                    )
                )
    results: dict[int, tuple[float, list[float]]] = {}
    for c_i, (_, _, _, _, fn) in enumerate(configs):  # warm-up and recall, fastface only
        results[c_i] = (recall_at_k(fn()[1], gt, k), [])
    memory["fastface_after_search"] = mem_delta(mem_mb(), base)

    # FAISS: the same filled IVF-PQ indexes, refined from float32 vectors held in RAM
    before = mem_mb()
    xb = np.load(npy)  # read into memory, not mapped
    refined = {}
    for name, index in indexes.items():
        ivf = next(index.shards()).to_faiss()
        refined[name] = faiss.IndexRefineFlat(ivf, faiss.swig_ptr(xb))
    del xb
    memory["faiss_refine"] = mem_delta(mem_mb(), before)
    n_ff = len(configs)
    for name, ref in refined.items():
        for nprobe in args.nprobe:
            for f in args.rerank:
                sp = faiss.IndexRefineSearchParameters(
                    k_factor=float(f), base_index_params=faiss.SearchParametersIVF(nprobe=nprobe)
                )
                configs.append(
                    (
                        f"faiss-{name}+RefineFlat-f32-RAM",
                        name,
                        nprobe,
                        f,
                        lambda r=ref, sp=sp: r.search(xq, k, params=sp),
                    )
                )
    for c_i in range(n_ff, len(configs)):
        results[c_i] = (recall_at_k(configs[c_i][4]()[1], gt, k), [])

    # timing: every configuration once per round, rounds repeated, so that load from
    # other processes falls on both sides alike; medians reported
    for rnd in range(args.repeat):
        for c_i, (*_, fn) in enumerate(configs):
            t = time.perf_counter()
            fn()
            results[c_i][1].append(time.perf_counter() - t)
        print(f"timing round {rnd + 1}/{args.repeat} done", flush=True)
    rows = []
    for c_i, (method, codec, nprobe, f, _) in enumerate(configs):
        rec, times = results[c_i]
        secs = float(np.median(times))
        rows.append(
            {
                "method": method,
                "codec": codec,
                "nprobe": nprobe,
                "rerank": f,
                "R@10": rec,
                "qps": args.nq / secs,
                "ms_per_query": 1e3 * secs / args.nq,
                "times_s": times,
            }
        )
    print(f"\n{'method':40s} {'nprobe':>6s} {'rerank':>6s} {'R@10':>7s} {'QPS':>9s}")
    for r in sorted(rows, key=lambda r: (r["codec"], r["nprobe"], r["rerank"], r["method"])):
        print(
            f"{r['method']:40s} {r['nprobe']:6d} {r['rerank']:6d} {r['R@10']:7.4f} {r['qps']:9.0f}"
        )

    summary: dict[str, Any] = {}
    methods = sorted({r["method"] for r in rows})
    faiss_methods = [m for m in methods if m.startswith("faiss")]
    for target in TARGETS:
        best_faiss = max(
            (b["qps"] for m in faiss_methods if (b := best_at(rows, m, target))), default=None
        )
        per = {}
        for m in methods:
            b = best_at(rows, m, target)
            per[m] = (
                None
                if b is None
                else {
                    "qps": b["qps"],
                    "nprobe": b["nprobe"],
                    "rerank": b["rerank"],
                    "R@10": b["R@10"],
                    "ratio_to_best_faiss": None if best_faiss is None else b["qps"] / best_faiss,
                }
            )
        summary[f"R@10>={target}"] = per

    print(
        f"\nn={n} d={d} nlist={nlist} M={args.M} nq={args.nq} ({args.queries}); "
        "best QPS at each target, ratio to the best FAISS"
    )
    print(f"{'method':40s} " + " ".join(f"{'R@10>=' + str(t):>26s}" for t in TARGETS))
    for m in methods:
        cells = []
        for t in TARGETS:
            b = summary[f"R@10>={t}"][m]
            cells.append(
                f"{'-':>26s}"
                if b is None
                else f"{b['qps']:8.0f} qps x{b['ratio_to_best_faiss'] or 0:5.2f} "
                f"(np{b['nprobe']},f{b['rerank']})".rjust(26)
            )
        print(f"{m:40s} " + " ".join(cells))
    raw_f16 = n * d * 2 / 2**20
    ff, fr = memory["fastface_after_search"], memory["faiss_refine"]
    print(
        f"memory: fastface +{ff.get('rssanon', ff['rss']):.0f} MiB anonymous, "
        f"+{ff.get('rssfile', 0):.0f} MiB of mapped file pages touched (float16 vectors "
        f"file {raw_f16:.0f} MiB, on disk); FAISS refine +{fr.get('rssanon', fr['rss']):.0f} "
        "MiB anonymous for float32 vectors in RAM"
    )
    out = {
        "meta": bench_meta(["bench/rerank.py", *argv]),
        "config": {**vars(args), "n": n, "nlist": nlist},
        "build_seconds": build_s,
        "memory": memory,
        "rows": rows,
        "summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    for index in indexes.values():
        index.close()


if __name__ == "__main__":
    main(sys.argv[1:])
