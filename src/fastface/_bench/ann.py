"""ANN benchmark: fastface IVF-PQ (1 and S shards) against FAISS, same run, same codec.

For every ``nprobe`` it prints one row per method (nprobe, R@1, R@10, QPS,
ms/query, QPS ratio to FAISS ``IndexIVFPQ``) and the exact ``IndexFlatIP`` row,
writes a JSON with the git sha, versions, ``build_info()`` and the machine, and
a recall-against-QPS plot beside it.

Fairness: fastface and FAISS search the *same trained codec* (FAISS's index is
a clone of fastface's codec filled with the same vectors), so the ratio
measures what fastface's wrapper and shard fan-out cost or save, nothing else.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..datasets import SyntheticFaces
from ..eval import ground_truth, identity_accuracy, recall_at_k
from ..index import IVFPQParams, ShardedIndex
from ..io import open_vectors
from .common import (
    Interleaved,
    PeakRSS,
    bench_meta,
    median_time,
    print_table,
    results_dir,
    write_results,
)

QUICK = {
    "n_identities": 10_000,
    "per_identity": 10,
    "d": 256,
    "nlist": 256,
    "M": 32,
    "nq": 500,
    "nprobe": [1, 4, 16, 64],
    "shards": [1, 4],
}
FULL = {
    "n_identities": 100_000,
    "per_identity": 10,
    "d": 512,
    "nlist": 1024,
    "M": 64,
    "nq": 1000,
    "nprobe": [1, 4, 8, 16, 32, 64, 128],
    "shards": [1, 4],
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quick",
        action="store_true",
        help="small set (100k x 256), finishes in under 2 minutes on 2 cores",
    )
    p.add_argument("--n-identities", type=int, help="synthetic identities (default 100000)")
    p.add_argument("--per-identity", type=int, help="vectors per identity (default 10)")
    p.add_argument("--d", type=int, help="dimension (default 512)")
    p.add_argument(
        "--groups",
        type=int,
        default=300,
        help="population groups of the synthetic set; 0 for none (default 300)",
    )
    p.add_argument(
        "--data",
        type=Path,
        help="use this .npy/.fvecs/.parquet instead of synthetic data (queries are "
        "then drawn from its rows with added noise)",
    )
    p.add_argument("--nlist", type=int)
    p.add_argument("--M", type=int, help="PQ sub-quantizers")
    p.add_argument("--nbits", type=int, default=8, choices=[4, 8])
    p.add_argument("--nq", type=int, help="number of queries")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobe", type=int, nargs="+", help="nprobe values to sweep")
    p.add_argument("--shards", type=int, nargs="+", help="shard counts to compare (default 1 4)")
    p.add_argument("--repeat", type=int, default=5, help="timed repeats per point (median)")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "fastface-bench",
        help="where data and indexes are written",
    )
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/ann[-quick].json)")
    from ..cli._ray import add_ray_option

    add_ray_option(p, "also search each index with RayShardedIndex (Ray actors serving the shards)")
    p.add_argument("--no-plot", action="store_true")


def _cfg(args: argparse.Namespace) -> dict[str, Any]:
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("n_identities", "per_identity", "d", "nlist", "M", "nq", "nprobe", "shards"):
        v = getattr(args, key)
        if v is not None:
            cfg[key] = v
    return cfg


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = _cfg(args)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    k = args.k
    # --- data
    if args.data is not None:
        src = open_vectors(args.data)
        data_path = Path(args.data)
        rng = np.random.default_rng(0)
        xq = src.sample(cfg["nq"], seed=0)
        xq = xq + rng.standard_normal(xq.shape).astype(np.float32) * 0.02
        xq /= np.linalg.norm(xq, axis=1, keepdims=True)
        qlabels = labels = None
        d = src.d
        data_desc: dict[str, Any] = {"file": str(data_path), "n": src.n, "d": d}
    else:
        d = cfg["d"]
        gen = SyntheticFaces(
            cfg["n_identities"], cfg["per_identity"], d, seed=0, n_groups=args.groups or None
        )
        data_path = work / f"synth-{gen.n_identities}x{gen.per_identity}x{d}-g{args.groups}.npy"
        if not data_path.exists():
            t0 = time.perf_counter()
            tmp = data_path.with_suffix(".partial.npy")
            gen.write_npy(tmp)
            os.replace(tmp, data_path)
            print(f"generated {data_path} in {time.perf_counter() - t0:.1f} s", flush=True)
        src = open_vectors(data_path)
        xq, qlabels = gen.queries(cfg["nq"], seed=1)
        labels = np.arange(gen.n) // gen.per_identity
        data_desc = {
            "synthetic": {
                "n_identities": gen.n_identities,
                "per_identity": gen.per_identity,
                "d": d,
                "n_groups": gen.n_groups,
                "intra_cos": gen.intra_cos,
            }
        }
    assert src.n is not None  # files and arrays know their size
    n = src.n
    params = IVFPQParams(d, cfg["nlist"], cfg["M"], nbits=args.nbits)
    print(f"n={n} d={d} nq={xq.shape[0]} k={k} params={params}", flush=True)

    # --- exact ground truth (NumPy, chunked) and the FAISS exact baseline
    gt_path = work / f"gt-{Path(src.describe()).name}-nq{xq.shape[0]}-k{k}.npy"
    t0 = time.perf_counter()
    if args.data is None and gt_path.exists():
        gt = np.load(gt_path)
    else:
        _, gt = ground_truth(src, xq, k)
        if args.data is None:
            np.save(gt_path, gt)
    gt_seconds = time.perf_counter() - t0

    # --- build: fastface shards (train once, build per shard count from the same codec)
    builds: dict[int, dict[str, Any]] = {}
    indexes: dict[int, ShardedIndex] = {}
    codec = None
    for S in cfg["shards"]:
        path = work / f"idx-{n}-{d}-{params.nlist}-{params.M}-{params.nbits}-s{S}"
        if path.exists():
            import shutil

            shutil.rmtree(path)
        shard_size = math.ceil(n / S)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            if codec is None:
                index = ShardedIndex.build(
                    src.path if src.path else xq,
                    path,
                    params,
                    shard_size=shard_size,
                    progress=False,
                )
                codec = index.codec
            else:
                index = ShardedIndex.create(path, codec, shard_size=shard_size)
                for lo, chunk in src.iter_chunks(100_000):
                    index.add(chunk, np.arange(lo, lo + chunk.shape[0]), commit=False)
                index.flush()
            build_s = time.perf_counter() - t0
        disk = sum(p.stat().st_size for p in path.iterdir())
        builds[S] = {
            "shards": S,
            "build_seconds": build_s,
            "peak_rss_gib": mem.peak / 2**30,
            "rss_growth_gib": (mem.peak - mem.start_rss) / 2**30,
            "peak_anon_gib": mem.peak_anon / 2**30,
            "anon_growth_gib": (mem.peak_anon - mem.start_anon) / 2**30,
            "disk_bytes": disk,
            "bytes_per_vector": disk / n,
        }
        indexes[S] = index
        print(
            f"built {S} shard(s) in {build_s:.1f} s, peak RSS {mem.peak / 2**30:.2f} GiB "
            f"(anonymous {mem.peak_anon / 2**30:.2f} GiB), "
            f"{disk / n:.1f} bytes/vector on disk",
            flush=True,
        )

    # --- FAISS IndexIVFPQ with the same codec and vectors; exact IndexFlatIP
    assert codec is not None
    ref = codec.faiss_index()
    t0 = time.perf_counter()
    for lo, chunk in src.iter_chunks(100_000):
        ref.add_with_ids(chunk, np.arange(lo, lo + chunk.shape[0], dtype=np.int64))
    faiss_add_s = time.perf_counter() - t0
    flat = faiss.IndexFlatIP(d) if params.metric == "ip" else faiss.IndexFlatL2(d)
    for _, chunk in src.iter_chunks(100_000):
        flat.add(chunk)

    def faiss_search(nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        sp = faiss.SearchParametersIVF()
        sp.nprobe = nprobe
        return ref.search(xq, k, params=sp)

    rows: list[dict[str, Any]] = []
    nq = xq.shape[0]

    def record(method: str, nprobe: int | None, I: np.ndarray, t: float) -> dict[str, Any]:
        row = {
            "method": method,
            "nprobe": nprobe,
            "R@1": recall_at_k(I, gt, 1),
            "R@10": recall_at_k(I, gt, min(10, k)),
            "QPS": nq / t,
            "ms_per_query": 1e3 * t / nq,
            "ratio_vs_faiss": None,
        }
        if labels is not None and qlabels is not None:
            row["identity_top1"] = identity_accuracy(I, labels, qlabels)
        rows.append(row)
        return row

    served: dict[int, Any] = {}
    if getattr(args, "ray", None) is not None:
        from ..distributed import RayShardedIndex, init

        init(args.ray or None)
        import ray

        # every index's actors at once: one shard each, sharing the cluster's CPUs
        share = float(ray.cluster_resources().get("CPU", 1)) / sum(indexes)
        served = {
            S: RayShardedIndex(index.path, actors=S, num_cpus_per_actor=min(1.0, share))
            for S, index in indexes.items()
        }
    for nprobe in cfg["nprobe"]:
        if nprobe > params.nlist:
            continue
        methods: dict[str, Any] = {
            "faiss IndexIVFPQ": lambda nprobe=nprobe: faiss_search(nprobe),
        }
        for S, index in indexes.items():
            methods[f"fastface {S} shard{'s' if S > 1 else ''}"] = (
                lambda index=index, nprobe=nprobe: index.search(xq, k, nprobe=nprobe)
            )
        for S, rx in served.items():
            methods[f"fastface {S} shard{'s' if S > 1 else ''} (Ray)"] = (
                lambda rx=rx, nprobe=nprobe: rx.search(xq, k, nprobe=nprobe)
            )
        # interleaved rounds: a busy machine slows every method alike
        bench = Interleaved()
        for name, fn in methods.items():
            bench.add(name, fn, args.repeat)
        faiss_qps = None
        for name, (t, (_, I)) in bench.run().items():
            row = record(name, nprobe, I, t)
            faiss_qps = faiss_qps or row["QPS"]
            row["ratio_vs_faiss"] = row["QPS"] / faiss_qps
    # exact search is slow at scale: time it on at most 200 queries, once per repeat
    n_flat = min(nq, 200)
    xq_flat = xq[:n_flat]
    t_flat = median_time(lambda: flat.search(xq_flat, k), repeat=max(1, args.repeat // 2), warmup=0)
    _, I_flat = flat.search(xq_flat, k)
    rows.append(
        {
            "method": "faiss IndexFlatIP (exact)",
            "nprobe": None,
            "R@1": recall_at_k(I_flat, gt[:n_flat], 1),
            "R@10": recall_at_k(I_flat, gt[:n_flat], min(10, k)),
            "QPS": n_flat / t_flat,
            "ms_per_query": 1e3 * t_flat / n_flat,
            "ratio_vs_faiss": None,
            "queries_timed": n_flat,
        }
    )

    table = print_table(
        rows,
        [
            ("method", "method", "s"),
            ("nprobe", "nprobe", ""),
            ("R@1", "R@1", ".3f"),
            ("R@10", "R@10", ".3f"),
            ("QPS", "QPS", ",.0f"),
            ("ms_per_query", "ms/query", ".3f"),
            ("ratio_vs_faiss", "vs FAISS", ".3f"),
        ],
    )
    ratios = [r["ratio_vs_faiss"] for r in rows if r["method"] == "fastface 1 shard"]
    summary = {
        "median_ratio_1_shard_vs_faiss": float(np.median(ratios)) if ratios else None,
        "ground_truth_seconds": gt_seconds,
        "faiss_add_seconds": faiss_add_s,
    }
    for S in cfg["shards"]:
        if S != 1 and 1 in indexes:
            mine = [r["QPS"] for r in rows if r["method"].startswith(f"fastface {S} ")]
            one = [r["QPS"] for r in rows if r["method"] == "fastface 1 shard"]
            summary[f"median_qps_ratio_{S}_shards_vs_1"] = float(
                np.median(np.array(mine) / np.array(one))
            )
    print({k_: (round(v, 3) if isinstance(v, float) else v) for k_, v in summary.items()})
    out = args.out or results_dir() / ("ann-quick.json" if args.quick else "ann.json")
    payload = {
        "meta": bench_meta(),
        "config": {
            **cfg,
            "k": k,
            "params": params.to_dict(),
            "data": data_desc,
            "repeat": args.repeat,
        },
        "builds": list(builds.values()),
        "rows": rows,
        "summary": summary,
        "table": table,
    }
    write_results(out, payload)
    if not args.no_plot:
        plot(
            rows,
            Path(out).with_suffix(".png"),
            title=f"n={n}, d={d}, {params.nlist} lists, M={params.M}x{params.nbits}b, k={k}",
        )
    for index in indexes.values():
        index.close()
    for rx in served.values():
        rx.close()
    print(f"wrote {out}", flush=True)
    return payload


def plot(rows: list[dict[str, Any]], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for m in methods:
        pts = [r for r in rows if r["method"] == m]
        xs = [r["R@10"] for r in pts]
        ys = [r["QPS"] for r in pts]
        if len(pts) == 1:
            ax.scatter(xs, ys, marker="*", s=120, label=m, zorder=3)
        else:
            ax.plot(xs, ys, marker="o", label=m)
            for r in pts:
                ax.annotate(
                    str(r["nprobe"]),
                    (r["R@10"], r["QPS"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(3, 3),
                )
    ax.set_yscale("log")
    ax.set_xlabel("R@10 (k-recall@10 against exact search)")
    ax.set_ylabel("queries per second (log)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench/ann.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
