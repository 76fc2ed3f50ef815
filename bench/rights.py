"""Data-subject rights at scale: erasure latency, physical purge, tombstone cost in search.

On a synthetic gallery (``fastface.datasets.SyntheticFaces``) of ``--n`` vectors:

1. time until an erased subject is invisible to search (goal: < 50 ms) and the
   time of its physical purge (shards rewritten, old files deleted, rows
   deleted and zeroed, SQLite's freed pages returned by an incremental vacuum;
   also without that vacuum, and the full ``VACUUM`` that ``compact()`` runs),
   each erasure checked by searching the subject's own vectors with
   ``nprobe = nlist``;
2. search QPS with 0%, 10% and 30% of the vectors tombstoned, side by side with
   the same index after compaction (goal: within 10% at 10%).

Prints one table and writes ``bench/results/rights.json``::

    python bench/rights.py --n 1000000          # the full size
    python bench/rights.py --n 100000 --quick   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fastface import Gallery, IVFPQParams, ShardedIndex
from fastface._bench.common import bench_meta, median_time
from fastface.datasets import SyntheticFaces

RESULTS = Path(__file__).resolve().parent / "results"


def build(args: argparse.Namespace, path: Path) -> tuple[Gallery, SyntheticFaces, float]:
    data = SyntheticFaces(args.n // args.per_identity, args.per_identity, args.d, seed=0)
    params = IVFPQParams(args.d, args.nlist, args.M, nbits=8)
    g = Gallery.create(
        path,
        d=args.d,
        params=params,
        purpose="bench",
        embedder_id="synthetic",
        embedder_version="0",
        shard_size=args.shard_size,
    )
    train = SyntheticFaces(args.train // 10, 10, args.d, seed=123).vectors()[0]
    t0 = time.perf_counter()
    g.train(train)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    for lo, x, labels in data.chunks(args.chunk):
        g.enroll_many([f"subject-{int(i)}" for i in labels], x, legal_basis="contract")
        print(f"  enrolled {lo + x.shape[0]:>9,} / {data.n:,}", file=sys.stderr, flush=True)
    t_enrol = time.perf_counter() - t0
    print(f"  train {t_train:.1f} s, enrol {t_enrol:.1f} s", file=sys.stderr)
    return g, data, t_enrol


def erasures(
    g: Gallery, data: SyntheticFaces, args: argparse.Namespace, *, vacuum: bool, offset: int
) -> list[dict[str, Any]]:
    """Erase subjects spread over the gallery (sealed shards and the open one)."""
    n_id = data.n_identities
    picks = (np.linspace(0, n_id - 1, args.erasures).astype(int) + offset) % n_id
    rows = []
    for ident in picks:
        name = f"subject-{int(ident)}"
        x, _ = data.rows(int(ident) * data.per_identity, (int(ident) + 1) * data.per_identity)
        r = g.erase_subject(name, vacuum=vacuum)
        m = g.search(x, args.k, requester="bench", purpose="bench", nprobe=args.nlist)
        leaked = sum(name in row for row in m.subject_ids)
        rows.append(
            {
                "subject": name,
                "records": r.records_erased,
                "shards_rewritten": r.shards_rewritten,
                "invisible_ms": r.invisible_ms,
                "purge_ms": r.purge_ms,
                "vacuum": vacuum,
                "returned_after_erasure": leaked,
            }
        )
    return rows


def qps_sweep(index_dir: Path, data: SyntheticFaces, args: argparse.Namespace) -> list[dict]:
    """QPS with a fraction of the vectors tombstoned vs the same index compacted.

    Each fraction starts from a copy of the full index: the tombstones are
    committed, a read-only copy is loaded with them, then the index is
    compacted, so both states are in memory at once and are timed
    alternately (the machine's load drifts).
    """
    q, _ = data.queries(args.nq, seed=7)

    def timed(ix: ShardedIndex) -> float:
        t0 = time.perf_counter()
        ix.search(q, args.k, nprobe=args.nprobe)
        return time.perf_counter() - t0

    with ShardedIndex.open(index_dir, mode="r") as full:
        every = np.concatenate([s.ids for s in full.shards()])
        every = every[full.contains(every)]
        n0 = every.size
        timed(full)
        base = args.nq / statistics.median(timed(full) for _ in range(args.repeat))
    order = np.random.default_rng(0).permutation(every)
    rows = [
        {
            "tombstoned": 0.0,
            "qps_tombstoned": base,
            "qps_compacted": base,
            "ratio": 1.0,
            "ntotal": n0,
        }
    ]
    for frac in args.fractions:
        work = index_dir.with_name(f"{index_dir.name}-{frac}")
        shutil.copytree(index_dir, work)
        try:
            with ShardedIndex.open(work, mode="a") as index:
                index.remove(order[: round(frac * n0)])  # commits the tombstones
                tomb = ShardedIndex.open(work, mode="r")
                pending = tomb.pending_removals
                t0 = time.perf_counter()
                index.compact()
                t_compact = time.perf_counter() - t0
                timed(tomb), timed(index)
                t_tomb, t_comp = [], []
                for _ in range(args.repeat):
                    t_tomb.append(timed(tomb))
                    t_comp.append(timed(index))
                tomb.close()
                ntotal = index.ntotal
        finally:
            shutil.rmtree(work, ignore_errors=True)
        with_tomb = args.nq / statistics.median(t_tomb)
        compacted = args.nq / statistics.median(t_comp)
        rows.append(
            {
                "tombstoned": frac,
                "qps_tombstoned": with_tomb,
                "qps_compacted": compacted,
                "ratio": with_tomb / compacted,
                "tombstones": pending,
                "compact_s": t_compact,
                "ntotal_after_compact": ntotal,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--per-identity", type=int, default=10)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--M", type=int, default=64)
    p.add_argument("--train", type=int, default=65_536)
    p.add_argument("--shard-size", type=int, default=250_000)
    p.add_argument("--chunk", type=int, default=50_000)
    p.add_argument("--nq", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--erasures", type=int, default=5)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3])
    p.add_argument("--dir", help="work directory (default: a temporary one, removed after)")
    p.add_argument("--out", default=str(RESULTS / "rights.json"))
    args = p.parse_args(argv)
    meta = bench_meta([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fastface-rights-"))
    path = work / "gallery"
    try:
        g, data, t_enrol = build(args, path)
        try:
            q, _ = data.queries(args.nq, seed=3)
            g_qps = args.nq / median_time(
                lambda: g.search(q, args.k, requester="bench", purpose="bench", nprobe=args.nprobe),
                args.repeat,
            )
            erase_rows = erasures(g, data, args, vacuum=True, offset=0)
            erase_rows += erasures(
                g, data, args, vacuum=False, offset=data.n_identities // (2 * args.erasures)
            )
            meta_bytes = (path / "meta.sqlite").stat().st_size
            t0 = time.perf_counter()
            g.compact()  # nothing pending: a full VACUUM of the metadata file
            t_full_vacuum = time.perf_counter() - t0
        finally:
            g.close()
        qps_rows = qps_sweep(path / "index", data, args)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    def med(key: str, vacuum: bool) -> float:
        return statistics.median(r[key] for r in erase_rows if r["vacuum"] is vacuum)

    print(
        f"\nfastface rights bench: n={args.n:,} d={args.d} nlist={args.nlist} M={args.M} "
        f"shard_size={args.shard_size:,} nq={args.nq} k={args.k} nprobe={args.nprobe}"
    )
    print(
        f"enrol {args.n / t_enrol:,.0f} vec/s; gallery.search (audited) {g_qps:,.0f} QPS; "
        f"metadata file {meta_bytes / 2**20:,.0f} MiB"
    )
    print(f"{'operation':<34}{'median':>12}{'goal':>12}")
    print(f"{'erase: invisible':<34}{med('invisible_ms', True):>10.1f}ms{'< 50 ms':>12}")
    print(f"{'erase: physical purge':<34}{med('purge_ms', True):>10.1f}ms{'':>12}")
    print(f"{'  the same without vacuum':<34}{med('purge_ms', False):>10.1f}ms{'':>12}")
    print(f"{'compact(): full VACUUM':<34}{t_full_vacuum * 1e3:>10.1f}ms{'':>12}")
    leaks = sum(r["returned_after_erasure"] for r in erase_rows)
    print(f"erased subjects returned by a search with nprobe=nlist: {leaks}")
    print(f"\n{'tombstoned':>10}{'QPS tombstoned':>16}{'QPS compacted':>15}{'ratio':>8}")
    for r in qps_rows:
        print(
            f"{r['tombstoned']:>10.0%}{r['qps_tombstoned']:>16,.0f}{r['qps_compacted']:>15,.0f}"
            f"{r['ratio']:>8.3f}"
        )

    out = {
        "meta": meta,
        "params": vars(args),
        "enrol_vectors_per_s": args.n / t_enrol,
        "gallery_search_qps": g_qps,
        "metadata_bytes": meta_bytes,
        "erasures": erase_rows,
        "summary": {
            "invisible_ms_median": med("invisible_ms", True),
            "purge_ms_median": med("purge_ms", True),
            "purge_ms_median_no_incremental_vacuum": med("purge_ms", False),
            "full_vacuum_ms": t_full_vacuum * 1e3,
            "erased_records_returned": leaks,
        },
        "tombstone_qps": qps_rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
