"""Coarse k-means at 8,192 lists: one flat k-means against two-level k-means.

Builds the same index twice from the same 1M rows of ``bench/scale.py``'s
synthetic faces (``IVF8192,PQ32,F16``, training on the library's default
sample), once with one flat k-means over all 8,192 lists and once with the
two-level k-means that fastface uses above ``TWO_LEVEL_FROM`` lists
(sqrt(nlist) first-level centroids, each cluster then split), and a third
time with two levels followed by ``--refine`` Lloyd iterations over all
lists (an experiment, not in the library); times each build, then searches
each with the 1,000 queries of
``bench/scale.py`` and scores R@10 against their exact ground truth.

Usage::

    python bench/scale.py truth --n 1M          # the ground truth, once
    python bench/two_level.py --truth /work/scale-data/1M/truth.npz \\
        --work-dir /tmp/two-level               # -> bench/results/two-level-1M.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale

import fastface.index.train as train
from fastface import ShardedIndex
from fastface._bench.common import bench_meta, results_dir, write_results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--truth", type=Path, required=True, help="bench/scale.py truth of 1M")
    p.add_argument("--work-dir", type=Path, required=True)
    p.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--rerank", type=int, default=4)
    p.add_argument("--refine", type=int, default=3, help="global iterations after two levels")
    p.add_argument("--out", type=Path, default=results_dir() / "two-level-1M.json")
    args = p.parse_args(argv)
    n = 1_000_000
    gt = np.load(args.truth)["I"]
    xq = scale.queries(n)[0]
    x = scale.dataset(n).rows(0, n)[0]
    spec = "IVF8192,PQ32,F16"
    rows: list[dict[str, Any]] = []
    two_level = train.two_level_kmeans

    def refined(x: np.ndarray, nlist: int, *, spherical: bool, seed: int = 0, **kw: Any) -> Any:
        """Two levels, then a few Lloyd iterations over all lists (not in the library)."""
        import faiss

        c = two_level(x, nlist, spherical=spherical, seed=seed, **kw)
        km: Any = faiss.Kmeans(x.shape[1], nlist, niter=args.refine, seed=seed, spherical=spherical)
        km.cp.max_points_per_centroid = 1 << 30  # every training row
        km.train(x, init_centroids=c)
        return np.ascontiguousarray(km.centroids, np.float32)

    methods = [
        ("two-level k-means", 4096, two_level),
        (f"two-level k-means + {args.refine} global iterations", 4096, refined),
        ("one flat k-means", 8192, two_level),
    ]
    for name, threshold, level2 in methods:
        train.TWO_LEVEL_FROM = threshold  # 8,192 lists: two levels above the threshold
        train.two_level_kmeans = level2
        path = args.work_dir / name.replace(" ", "-").replace("+", "and")
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        index = ShardedIndex.build(x, path, spec, shard_size=n)
        row: dict[str, Any] = {"training": name, "spec": spec, "build_s": time.perf_counter() - t0}
        for nprobe in args.nprobe:
            index.search(xq, scale.K, nprobe=nprobe, rerank=args.rerank)  # warm up
            t = time.perf_counter()
            _, ids = index.search(xq, scale.K, nprobe=nprobe, rerank=args.rerank)
            sec = time.perf_counter() - t
            row[f"nprobe_{nprobe}"] = {
                "recall_at_10": scale.recall10(ids, gt),
                "qps": len(xq) / sec,
            }
        index.close()
        print(json.dumps(row), flush=True)
        rows.append(row)
    write_results(args.out, {"meta": bench_meta(), "rerank": args.rerank, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
