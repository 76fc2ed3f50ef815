"""Data-subject rights at scale: erasure, purge, compaction, database size, audited search.

On a synthetic gallery (``fastface.datasets.SyntheticFaces``) of ``--n`` vectors
(IVF-PQ, trained before enrolment):

1. erasures of subjects spread over the gallery: time until the subject is
   invisible to every search (goal < 50 ms) and time of the physical purge,
   database included (shards rewritten, old files deleted, secrets shredded,
   freed pages returned, log truncated; goal < 0.5 s); each checked by
   searching the subject's own vectors with ``nprobe = nlist``;
2. ``compact()`` after deferred erasures, and with nothing pending (a full
   ``VACUUM`` of the database; goal < 10 s);
3. database bytes per vector (the vectors live once, in the index);
4. audited search QPS: exact scores (the default: PQ candidates re-scored
   from the stored vectors) against PQ-only scores, in interleaved rounds,
   with the self-score of enrolled vectors under each;
5. optionally (``--tombstones``) search QPS with 10% and 30% of the vectors
   tombstoned, against the same index compacted.

With ``--before REV`` the same run also measures the gallery as it was at git
revision ``REV`` (its ``src/fastface/gallery.py``, loaded from history; the
one-file gallery that kept embeddings in SQLite and scored with PQ): built
the same way (same shards), erasures interleaved with the new gallery's,
searches in the same rounds, its ``compact()`` timed after the new one's.

The gallery is built once per ``--dir`` (``gallery-base``) and copied for
each run, so a shared machine builds the 1M gallery once. Prints one table
and writes ``bench/results/rights.json``::

    python bench/rights.py --n 1000000 --dir /var/tmp/rights --build-only   # no lock needed
    flock /work/bench.lock python bench/rights.py --n 1000000 --dir /var/tmp/rights
    python bench/rights.py --n 100000 --quick                  # a smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fastface import Gallery, IVFPQParams, ShardedIndex
from fastface._bench.common import bench_meta
from fastface.datasets import SyntheticFaces
from fastface.gallery.vectors import VectorStore

RESULTS = Path(__file__).resolve().parent / "results"
PURPOSE = "bench"


def _name(i: int) -> str:
    return f"subject-{i}"


def load_before(rev: str, work: Path) -> Any:
    """The ``Gallery`` class of ``src/fastface/gallery.py`` at git revision ``rev``."""
    repo = Path(__file__).resolve().parents[1]
    src = subprocess.check_output(
        ["git", "-C", str(repo), "show", f"{rev}:src/fastface/gallery.py"]
    )
    path = work / f"gallery_{rev}.py"
    path.write_bytes(src)
    name = "fastface._gallery_before"  # a module of the package: its relative imports resolve
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod.Gallery


def build(
    args: argparse.Namespace, path: Path, data: SyntheticFaces, cls: Any = Gallery
) -> dict[str, float]:
    params = IVFPQParams(args.d, args.nlist, args.M, nbits=8)
    g = cls.create(
        path,
        d=args.d,
        params=params,
        purpose=PURPOSE,
        embedder_id="synthetic",
        embedder_version="0",
        shard_size=args.shard_size,
    )
    try:
        train = SyntheticFaces(args.train // 10, 10, args.d, seed=123).vectors()[0]
        t0 = time.perf_counter()
        g.train(train)
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        for lo, x, labels in data.chunks(args.chunk):
            g.enroll_many([_name(int(i)) for i in labels], x, legal_basis="contract")
            print(f"  enrolled {lo + x.shape[0]:>9,} / {data.n:,}", file=sys.stderr, flush=True)
        t_enrol = time.perf_counter() - t0
    finally:
        g.close()
    print(f"  train {t_train:.1f} s, enrol {t_enrol:.1f} s", file=sys.stderr)
    return {"train_s": t_train, "enrol_s": t_enrol}


def prepared(
    args: argparse.Namespace, work: Path, data: SyntheticFaces, cls: Any = Gallery, tag: str = ""
) -> tuple[Path, dict]:
    """A fresh copy of the base gallery (built first if missing or built with other params)."""
    base = work / f"gallery{tag}-base"
    stamp = base.with_name(f"gallery{tag}-base.json")
    want = {k: getattr(args, k) for k in ("n", "d", "per_identity", "nlist", "M", "shard_size")}
    info: dict[str, Any] = {}
    if base.exists() and stamp.exists() and json.loads(stamp.read_text()).get("params") == want:
        info = json.loads(stamp.read_text())
        print(f"  reusing {base}", file=sys.stderr)
    else:
        shutil.rmtree(base, ignore_errors=True)
        info = {"params": want, **build(args, base, data, cls)}
        stamp.write_text(json.dumps(info))
    if args.build_only:
        return base, info
    path = work / f"gallery{tag}"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(base, path)
    return path, info


_INDEX_PURGE_S: list[float] = []


def _timed_purge() -> None:
    """Time the index's part of each purge (shard rewrite, old files deleted, lists repacked)."""
    real = VectorStore.purge

    def purge(self: VectorStore) -> int:
        t0 = time.perf_counter()
        try:
            return real(self)
        finally:
            _INDEX_PURGE_S.append(time.perf_counter() - t0)

    VectorStore.purge = purge  # type: ignore[method-assign]


def erasures(
    g: Gallery,
    data: SyntheticFaces,
    args: argparse.Namespace,
    *,
    offset: int,
    purge: bool,
    old: Any = None,
) -> list[dict[str, Any]]:
    """Erase subjects spread over the gallery (sealed shards and the open one); with ``old``
    (the gallery before), the same subject there right after, timed the same way."""
    n_id = data.n_identities
    picks = (np.linspace(0, n_id - 1, args.erasures).astype(int) + offset) % n_id
    rows = []
    for ident in picks:
        name = _name(int(ident))
        _INDEX_PURGE_S.clear()
        x, _ = data.rows(int(ident) * data.per_identity, (int(ident) + 1) * data.per_identity)
        t0 = time.perf_counter()
        r = g.erase_subject(name, purge=purge)
        call_ms = (time.perf_counter() - t0) * 1e3
        m = g.search(x, args.k, requester="bench", purpose=PURPOSE, nprobe=args.nlist)
        row = {
            "subject": name,
            "records": r.records_erased,
            "shards_rewritten": r.shards_rewritten,
            "invisible_ms": r.invisible_ms,
            "purge_ms": r.purge_ms,
            "index_purge_ms": sum(_INDEX_PURGE_S) * 1e3,
            "purge_status": r.purge_status,
            "call_ms": call_ms,
            "deferred": not purge,
            "returned_after_erasure": sum(name in row for row in m.subject_ids),
        }
        if old is not None:
            t0 = time.perf_counter()
            ro = old.erase_subject(name, purge=purge)
            row["before"] = {
                "invisible_ms": ro.invisible_ms,
                "purge_ms": ro.purge_ms,
                "call_ms": (time.perf_counter() - t0) * 1e3,
            }
        rows.append(row)
    return rows


def search_rounds(
    g: Gallery, data: SyntheticFaces, args: argparse.Namespace, old: Any = None
) -> dict[str, Any]:
    """Audited search, exact vs PQ-only scores (and the gallery before: PQ scores, its
    default), timed alternately; self-scores of enrolled rows."""
    q, _ = data.queries(args.nq, seed=3)
    rng = np.random.default_rng(5)
    rows = np.sort(rng.choice(data.n, args.nq, replace=False))
    enrolled = np.stack([data.rows(int(r), int(r) + 1)[0][0] for r in rows])
    kw = {"requester": "bench", "purpose": PURPOSE, "nprobe": args.nprobe}

    def run(which: str) -> float:
        t0 = time.perf_counter()
        if which == "before":
            old.search(q, args.k, **kw)
        else:
            g.search(q, args.k, exact=which == "exact", **kw)
        return time.perf_counter() - t0

    kinds = ["exact", "pq_only"] + (["before"] if old is not None else [])
    for k in kinds:
        run(k)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.repeat):
        for k in kinds:
            times[k].append(run(k))
    self_exact = g.search(enrolled, 1, **kw)
    self_pq = g.search(enrolled, 1, exact=False, **kw)
    qps = {k: args.nq / statistics.median(v) for k, v in times.items()}
    out = {
        "qps_exact": qps["exact"],
        "qps_pq_only": qps["pq_only"],
        "exact_over_pq": qps["exact"] / qps["pq_only"],
        "rounds_s": times,
        "self_score_exact_min": float(self_exact.scores[:, 0].min()),
        "self_score_exact_median": float(np.median(self_exact.scores[:, 0])),
        "self_score_pq_min": float(self_pq.scores[:, 0].min()),
        "self_score_pq_median": float(np.median(self_pq.scores[:, 0])),
    }
    if old is not None:
        before = old.search(enrolled, 1, **kw)
        out["qps_before"] = qps["before"]
        out["self_score_before_min"] = float(before.scores[:, 0].min())
        out["self_score_before_median"] = float(np.median(before.scores[:, 0]))
    return out


def qps_sweep(index_dir: Path, data: SyntheticFaces, args: argparse.Namespace) -> list[dict]:
    """QPS with a fraction of the vectors tombstoned vs the same index compacted."""
    q, _ = data.queries(args.nq, seed=7)

    def timed(ix: ShardedIndex) -> float:
        t0 = time.perf_counter()
        ix.search(q, args.k, nprobe=args.nprobe)
        return time.perf_counter() - t0

    rows = []
    with ShardedIndex.open(index_dir, mode="r") as full:
        every = full.live_ids()
    order = np.random.default_rng(0).permutation(every)
    for frac in args.fractions:
        work = index_dir.with_name(f"{index_dir.name}-{frac}")
        shutil.copytree(index_dir, work)
        try:
            with ShardedIndex.open(work, mode="a") as index:
                index.remove(order[: round(frac * every.size)])
                tomb = ShardedIndex.open(work, mode="r")
                index.compact()
                timed(tomb), timed(index)
                t_tomb, t_comp = [], []
                for _ in range(args.repeat):
                    t_tomb.append(timed(tomb))
                    t_comp.append(timed(index))
                tomb.close()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rows.append(
            {
                "tombstoned": frac,
                "qps_tombstoned": args.nq / statistics.median(t_tomb),
                "qps_compacted": args.nq / statistics.median(t_comp),
                "ratio": statistics.median(t_comp) / statistics.median(t_tomb),
            }
        )
    return rows


def _before_summary(
    args: argparse.Namespace,
    before: dict[str, Any],
    rows: list[dict[str, Any]],
    search: dict[str, Any],
    ntotal: int,
) -> dict[str, Any] | None:
    if not args.before:
        return None
    return {
        "revision": args.before,
        "invisible_ms_median": statistics.median(r["before"]["invisible_ms"] for r in rows),
        "purge_ms_median": statistics.median(r["before"]["purge_ms"] for r in rows),
        "compact_idle_s": before["compact_idle_s"],
        "database_bytes_per_vector": before["database_bytes"] / ntotal,
        "search_qps": search["qps_before"],
        "self_score_min": search["self_score_before_min"],
        "build": before["build"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--per-identity", type=int, default=10)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--M", type=int, default=64)
    p.add_argument("--train", type=int, default=65_536)
    p.add_argument("--shard-size", type=int, default=50_000)
    p.add_argument("--chunk", type=int, default=50_000)
    p.add_argument("--nq", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--erasures", type=int, default=5)
    p.add_argument("--deferred", type=int, default=20, help="erasures left to compact()")
    p.add_argument("--tombstones", action="store_true", help="also the tombstone QPS sweep")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3])
    p.add_argument("--quick", action="store_true", help="fewer rounds and erasures")
    p.add_argument("--dir", help="work directory, kept (the base gallery is reused from it)")
    p.add_argument("--before", metavar="REV", help="also measure the gallery at git revision REV")
    p.add_argument(
        "--build-only",
        action="store_true",
        help="build the base galleries in --dir and stop (run the timed part later, under the "
        "machine's benchmark lock)",
    )
    p.add_argument("--out", default=str(RESULTS / "rights.json"))
    args = p.parse_args(argv)
    if args.build_only and not args.dir:
        p.error("--build-only needs --dir (where the base galleries are kept)")
    if args.quick:
        args.repeat, args.erasures, args.deferred, args.nq = 3, 3, 5, 200
    meta = bench_meta([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    _timed_purge()
    data = SyntheticFaces(args.n // args.per_identity, args.per_identity, args.d, seed=0)

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fastface-rights-"))
    work.mkdir(parents=True, exist_ok=True)
    before: dict[str, Any] = {}
    old = None
    try:
        path, build_info = prepared(args, work, data)
        if args.before:
            cls = load_before(args.before, work)
            old_path, before["build"] = prepared(args, work, data, cls, "-before")
        if args.build_only:
            print(f"built the base galleries in {work}", file=sys.stderr)
            return 0
        if args.before:
            old = cls.open(old_path)
            before["database_bytes"] = (old_path / "meta.sqlite").stat().st_size
        t0 = time.perf_counter()
        g = Gallery.open(path)
        open_s = time.perf_counter() - t0
        try:
            ntotal = g.ntotal
            index_dir = Path(g.index.path)
            db_bytes = (path / "meta.sqlite").stat().st_size
            search = search_rounds(g, data, args, old)
            now_rows = erasures(g, data, args, offset=0, purge=True, old=old)
            half = data.n_identities // (2 * max(args.erasures, 1))
            later = argparse.Namespace(**{**vars(args), "erasures": args.deferred})
            deferred_rows = erasures(g, data, later, offset=half, purge=False)
            t0 = time.perf_counter()
            compacted = g.compact()
            compact_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            g.compact()  # nothing pending: the full VACUUM and the log truncation
            compact_idle_s = time.perf_counter() - t0
            if old is not None:
                t0 = time.perf_counter()
                old.compact()  # nothing pending there either: its full VACUUM
                before["compact_idle_s"] = time.perf_counter() - t0
            db_bytes_after = (path / "meta.sqlite").stat().st_size
            verified = g.verify()
        finally:
            g.close()
            if old is not None:
                old.close()
        qps_rows = qps_sweep(index_dir, data, args) if args.tombstones else []
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    def med(key: str) -> float:
        return float(statistics.median(r[key] for r in now_rows))

    leaks = sum(r["returned_after_erasure"] for r in now_rows + deferred_rows)
    print(
        f"\nfastface rights bench: n={args.n:,} d={args.d} nlist={args.nlist} M={args.M} "
        f"shard_size={args.shard_size:,} nq={args.nq} k={args.k} nprobe={args.nprobe}"
    )
    print(
        f"open {open_s:.2f} s (integrity check, reconciliation); database "
        f"{db_bytes / ntotal:.1f} bytes/vector ({db_bytes / 2**20:.0f} MiB)"
    )
    print(f"{'operation':<40}{'median':>12}{'goal':>12}")
    print(f"{'erase: invisible':<40}{med('invisible_ms'):>10.1f}ms{'< 50 ms':>12}")
    print(f"{'erase: physical purge incl. database':<40}{med('purge_ms'):>10.1f}ms{'< 500 ms':>12}")
    print(f"{'  of which the index (rewrite, repack)':<40}{med('index_purge_ms'):>10.1f}ms{'':>12}")
    print(f"{'erase: whole call':<40}{med('call_ms'):>10.1f}ms{'':>12}")
    print(
        f"{f'compact() after {args.deferred} deferred erasures':<40}{compact_s * 1e3:>10.1f}ms"
        f"{'< 10 s':>12}"
    )
    print(f"{'compact() with nothing pending':<40}{compact_idle_s * 1e3:>10.1f}ms{'< 10 s':>12}")
    print(f"erased subjects returned by a search with nprobe=nlist: {leaks}")
    if old is not None:
        bs = _before_summary(args, before, now_rows, search, ntotal)
        print(
            f"before ({args.before}, same run, same shards): invisible "
            f"{bs['invisible_ms_median']:.1f} ms, purge {bs['purge_ms_median']:.1f} ms, "
            f"compact {bs['compact_idle_s']:.1f} s, "
            f"database {bs['database_bytes_per_vector']:.0f} bytes/vector, search (PQ scores) "
            f"{bs['search_qps']:,.0f} QPS, self-score min {bs['self_score_min']:.4f}"
        )
    print(
        f"audited search: exact {search['qps_exact']:,.0f} QPS, PQ-only "
        f"{search['qps_pq_only']:,.0f} QPS ({search['exact_over_pq']:.2f}x); self-score min "
        f"exact {search['self_score_exact_min']:.4f}, PQ {search['self_score_pq_min']:.4f}"
    )
    for r in qps_rows:
        print(
            f"  {r['tombstoned']:.0%} tombstoned: {r['qps_tombstoned']:,.0f} QPS vs compacted "
            f"{r['qps_compacted']:,.0f} ({r['ratio']:.3f})"
        )

    out = {
        "meta": meta,
        "params": vars(args),
        "build": build_info,
        "open_s": open_s,
        "ntotal": ntotal,
        "database_bytes": db_bytes,
        "database_bytes_per_vector": db_bytes / ntotal,
        "database_bytes_after_compact": db_bytes_after,
        "search": search,
        "erasures": now_rows,
        "deferred_erasures": deferred_rows,
        "compact": {"after_deferred_s": compact_s, "result": compacted, "idle_s": compact_idle_s},
        "verified": verified,
        "summary": {
            "invisible_ms_median": med("invisible_ms"),
            "purge_ms_median": med("purge_ms"),
            "index_part_of_purge_ms_median": med("index_purge_ms"),
            "erase_call_ms_median": med("call_ms"),
            "compact_s": compact_s,
            "compact_idle_s": compact_idle_s,
            "database_bytes_per_vector": db_bytes / ntotal,
            "search_qps_exact": search["qps_exact"],
            "search_qps_pq_only": search["qps_pq_only"],
            "erased_records_returned": leaks,
            "before": _before_summary(args, before, now_rows, search, ntotal),
        },
        "tombstone_qps": qps_rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
