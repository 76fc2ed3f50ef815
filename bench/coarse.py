"""Coarse assignment: fastface's exhaustive kernel against FAISS's flat quantizer search.

For each (d, nlist, nprobe) of a grid, 1,000 random queries against random
centroids, squared L2: ``fastface._native.coarse_topk`` (blocked scoring in a
fixed order, linear-time selection) and ``faiss.IndexFlatL2.search`` (BLAS,
then a heap of ``nprobe``), timed in interleaved rounds (medians). The rule
``fastface.index.params.own_coarse_kernel_pays`` is read from these figures;
the JSON records, per point, which path it picks and whether that was the
faster one here.

Usage::

    python bench/coarse.py                       # -> bench/results/coarse-kernel.json
    python bench/coarse.py --repeat 9 --nq 500
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # two OpenMP runtimes in one process

import argparse
import statistics
import sys
import time
from typing import Any

import faiss
import numpy as np

from fastface._bench.common import bench_meta, results_dir, write_results
from fastface._native import coarse_topk
from fastface.index.params import own_coarse_kernel_pays

GRID = [
    (48, 4096),
    (128, 2048),
    (128, 8192),
    (512, 2048),
]
NPROBES = [1, 8, 32, 128, 512]


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default=str(results_dir() / "coarse-kernel.json"))
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for d, nlist in GRID:
        x = rng.standard_normal((args.nq, d)).astype(np.float32)
        c = rng.standard_normal((nlist, d)).astype(np.float32)
        ct = np.ascontiguousarray(c.T)
        cn = (c.astype(np.float64) ** 2).sum(1).astype(np.float32)
        flat = faiss.IndexFlatL2(d)
        flat.add(c)
        for nprobe in NPROBES:
            ours = lambda x=x, ct=ct, p=nprobe, cn=cn: coarse_topk(x, ct, p, centroid_norms=cn)  # noqa: E731
            theirs = lambda f=flat, x=x, p=nprobe: f.search(x, p)  # noqa: E731
            agree = float((ours()[1] == theirs()[1]).mean())
            t_ours, t_faiss = [], []
            for _ in range(args.repeat):
                t = time.perf_counter()
                ours()
                t_ours.append(time.perf_counter() - t)
                t = time.perf_counter()
                theirs()
                t_faiss.append(time.perf_counter() - t)
            mo, mf = statistics.median(t_ours), statistics.median(t_faiss)
            pick = own_coarse_kernel_pays(d, nlist, nprobe)
            row = {
                "d": d,
                "nlist": nlist,
                "nprobe": nprobe,
                "fastface_ms": 1e3 * mo,
                "faiss_ms": 1e3 * mf,
                "faiss_over_fastface": mf / mo,
                "same_lists": agree,
                "rule_picks": "fastface" if pick else "faiss",
                "rule_picks_faster": pick == (mo < mf),
            }
            rows.append(row)
            print(
                f"d={d:4d} nlist={nlist:5d} nprobe={nprobe:4d}: fastface {1e3 * mo:6.1f} ms, "
                f"FAISS {1e3 * mf:6.1f} ms ({mf / mo:4.2f}x), rule picks {row['rule_picks']}"
                f"{'' if row['rule_picks_faster'] else ' (the slower one here)'}",
                flush=True,
            )
    payload = {
        "meta": bench_meta(["bench/coarse.py", *argv]),
        "config": {"nq": args.nq, "repeat": args.repeat, "metric": "l2"},
        "rows": rows,
    }
    print(f"wrote {write_results(args.out, payload)}")


if __name__ == "__main__":
    main(sys.argv[1:])
