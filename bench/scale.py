"""Scale benchmark: 1M, 10M and 100M synthetic 128-d face-like vectors on one machine.

Steps (each resumable; results accumulate in ``--work-dir``, the report goes
to ``bench/results/scale.json`` and ``scale.png``)::

    python bench/scale.py build --n 100M          # streaming build (hours; resumes when rerun)
    python bench/scale.py truth --n 100M          # exact top-100 of 1,000 queries, chunked
    python bench/scale.py search --n 1M 10M 100M  # R@10 vs QPS, warm and cold, FAISS beside
    python bench/scale.py dedup --n 10M           # dedup time and pair recall (planted pairs)
    python bench/scale.py report                  # JSON summary + plot from what was measured

Data: :class:`fastface.datasets.SyntheticFaces` with ``n / 10`` identities of
10 samples, 1,000 population groups, d = 128, seed 0 (the 1M and 10M sets are
prefixes of the 100M one); queries are fresh samples of random identities.
Rows are regenerated from the seed whenever needed (build, ground truth), so
no vector file is ever written: only the index.

Every measured figure is written with the command, git sha, versions and the
machine's load at the time (``fastface._bench.common.bench_meta``).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fastface._bench.common import PeakRSS, bench_meta

D = 128
PER_IDENTITY = 10
GROUPS = 1000
SEED = 0
NQ = 1000
K = 10
GT_K = 100
log = logging.getLogger("fastface")


def parse_n(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in "KMB" else text) * mult)


def label(n: int) -> str:
    return f"{n // 10**6}M" if n % 10**6 == 0 else f"{n // 1000}k"


def dataset(n: int) -> Any:
    from fastface.datasets import SyntheticFaces

    return SyntheticFaces(
        n_identities=n // PER_IDENTITY, per_identity=PER_IDENTITY, d=D, seed=SEED, n_groups=GROUPS
    )


def queries(n: int) -> tuple[np.ndarray, np.ndarray]:
    return dataset(n).queries(NQ, seed=1)


def work(args: argparse.Namespace, n: int) -> Path:
    p = Path(args.work_dir) / label(n)
    p.mkdir(parents=True, exist_ok=True)
    return p


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def save_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def setup_logging(path: Path | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if path is not None:
        handlers.append(logging.FileHandler(path))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", handlers=handlers, force=True
    )


# --- build -------------------------------------------------------------------------------------
def default_spec(n: int) -> str:
    import fastface

    return fastface.auto_spec(n, D, memory_budget="8G").spec


def shard_size_for(n: int) -> int:
    return max(1_000_000, n // 20)


def cmd_build(args: argparse.Namespace) -> None:
    from fastface import ShardedIndex

    for n in map(parse_n, args.n):
        w = work(args, n)
        setup_logging(w / "build.log")
        spec = args.spec or default_spec(n)
        stats_path = w / "build-stats.json"
        stats = load_json(stats_path)
        stats.setdefault("spec", spec)
        stats.setdefault("sessions", [])
        if stats["spec"] != spec:
            raise SystemExit(f"{w}: was built with {stats['spec']!r}, not {spec!r}")
        session: dict[str, Any] = {"started": time.time(), "meta": bench_meta()}
        stats["sessions"].append(session)
        save_json(stats_path, stats)
        index_dir = w / "index"
        shard_size = shard_size_for(n)
        log.info("scale build: n=%d spec=%s shard_size=%d into %s", n, spec, shard_size, index_dir)
        t0 = time.perf_counter()
        with PeakRSS(interval=1.0) as mem:
            index = ShardedIndex.build(
                dataset(n),
                index_dir,
                spec,
                shard_size=shard_size,
                chunk_size=args.chunk_size,
                commit_every=shard_size,
                progress=False,
            )
            index.close()
        session.update(
            wall_s=time.perf_counter() - t0,
            peak_anon_gib=mem.peak_anon / 2**30,
            peak_rss_gib=mem.peak / 2**30,
            finished=time.time(),
        )
        save_json(stats_path, stats)
        log.info("scale build: %s done", label(n))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--work-dir",
        default=os.environ.get("FASTFACE_SCALE_DIR", "/work/scale-data"),
        help="where indexes, ground truth and partial results live",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the index of each N (resumable)")
    b.add_argument("--n", nargs="+", default=["1M"])
    b.add_argument("--spec", help="index spec (default: auto_spec(n, 128, memory_budget='8G'))")
    b.add_argument("--chunk-size", type=int, default=200_000)
    b.set_defaults(func=cmd_build)
    args = p.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    gc.enable()
    sys.exit(main())
