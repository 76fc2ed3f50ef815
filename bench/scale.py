"""Scale benchmark: 1M, 10M and 100M synthetic 128-d face-like vectors on one machine.

Steps (each resumable; results accumulate in ``--work-dir``, the report goes
to ``bench/results/scale.json`` and ``scale.png``)::

    python bench/scale.py build --n 100M          # streaming build (hours; resumes when rerun)
    python bench/scale.py truth --n 100M          # exact top-100 of 1,000 queries, chunked
    python bench/scale.py --lock /work/bench.lock search --n 1M 10M 100M  # R@10 vs QPS
    python bench/scale.py --lock /work/bench.lock faiss --n 10M           # FAISS beside
    python bench/scale.py recall --n 100M         # R@10 of a search run made before its truth
    python bench/scale.py coarse --n 10M          # HNSW against exact coarse assignment
    python bench/scale.py dedup --n 10M           # dedup time and pair recall (planted pairs)
    python bench/scale.py bounds                  # memory copy rate, disk IOPS
    python bench/scale.py report                  # JSON summary + plot from what was measured

The measured figures and what they mean: docs/scaling.md.

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
import contextlib
import fcntl
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fastface._bench.common import PeakRSS, bench_meta, print_table, results_dir, write_results

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


def rows_at(gen: Any, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` (sorted, unique) of the generator, made block by block up to the last."""
    out = np.empty((ids.size, D), np.float32)
    step = 4096 * PER_IDENTITY * 5  # whole blocks of the generator
    for lo in range(0, int(ids[-1]) + 1 if ids.size else 0, step):
        sel = np.flatnonzero((ids >= lo) & (ids < lo + step))
        if sel.size:
            out[sel] = gen.rows(lo, min(lo + step, gen.n))[0][ids[sel] - lo]
    return out


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
        session: dict[str, Any] = {
            "started": time.time(),
            "meta": bench_meta(),
            "train_size": args.train_size,
        }
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
                train_size=args.train_size,
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


# --- ground truth ------------------------------------------------------------------------------
def chunk_top(S: np.ndarray, worst: np.ndarray, lo: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidates of one chunk's scores ``S`` for the running top-100, ``(nq, GT_K)`` padded.

    Only scores above each query's current worst can enter (ties go to the lower
    id, which is already in): once the top-100 has filled, few entries pass, so
    the costly selection runs on a handful of columns instead of the chunk.
    """
    nq, m = S.shape
    mask = np.greater(S, worst[:, None])
    counts = mask.sum(axis=1)
    width = int(counts.max(initial=0))
    if width > GT_K:  # the first chunks: select from the whole row
        kk = min(GT_K, m)
        top = np.argpartition(S, m - kk, axis=1)[:, m - kk :]
        Db = np.take_along_axis(S, top, 1)
        Ib = top.astype(np.int64) + lo
    else:
        r, c = np.nonzero(mask)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pos = np.arange(r.size) - starts[r]
        Db = np.full((nq, width), -np.inf, np.float32)
        Ib = np.full((nq, width), -1, np.int64)
        Db[r, pos] = S[r, c]
        Ib[r, pos] = c + lo
    pad = GT_K - Db.shape[1]
    if pad > 0:
        Db = np.pad(Db, ((0, 0), (0, pad)), constant_values=-np.inf)
        Ib = np.pad(Ib, ((0, 0), (0, pad)), constant_values=-1)
    return Db, Ib


def cmd_truth(args: argparse.Namespace) -> None:
    """Exact top-100 of the queries by brute force over rows regenerated chunk by chunk."""
    from fastface._native import merge_topk
    from fastface.kernels.exact import scores

    for n in map(parse_n, args.n):
        w = work(args, n)
        setup_logging(w / "truth.log")
        out = w / "truth.npz"
        if out.exists():
            log.info("truth %s: already there", label(n))
            continue
        nq = args.queries
        xq = queries(n)[0][:nq]
        gen = dataset(n)
        part = w / "truth-partial.npz"
        D = np.full((nq, GT_K), -np.inf, np.float32)
        I = np.full((nq, GT_K), -1, np.int64)
        start = 0
        if part.exists():
            z = np.load(part)
            if z["D"].shape[0] < nq:
                raise SystemExit(f"{part}: holds {z['D'].shape[0]} queries, not {nq}")
            # the first queries of a partial run for more queries are as good as any
            D, I, start = z["D"][:nq], z["I"][:nq], int(z["rows_done"])
        step = 4096 * PER_IDENTITY * 5  # whole blocks of the generator
        t0 = time.perf_counter()
        for lo in range(start, n, step):
            hi = min(lo + step, n)
            x, _ = gen.rows(lo, hi)
            S = scores(xq, x, "ip")
            Db, Ib = chunk_top(S, D.min(axis=1), lo)
            D, I = merge_topk(np.stack([D, Db]), np.stack([I, Ib]), GT_K, larger_is_better=True)
            if (hi // step) % 20 == 0 or hi == n:
                np.savez(part, D=D, I=I, rows_done=hi)
                rate = (hi - start) / (time.perf_counter() - t0)
                log.info("truth %s: %d rows (%.0f rows/s)", label(n), hi, rate)
        np.savez(out, D=D, I=I, xq=xq, seconds=time.perf_counter() - t0)
        part.unlink(missing_ok=True)


# --- search ------------------------------------------------------------------------------------
@contextlib.contextmanager
def bench_lock(path: str | None) -> Any:
    """Hold the machine-wide benchmark lock (flock) around a timed phase only."""
    if not path:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        log.info("waiting for %s", path)
        fcntl.flock(fd, fcntl.LOCK_EX)
        log.info("holding %s", path)
        yield
    finally:
        os.close(fd)


def index_files(path: Path) -> list[Path]:
    return [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]


def vector_files(path: Path) -> list[Path]:
    return [p for p in index_files(path) if p.name.endswith((".f16.npy", ".f32.npy"))]


def drop_cache(path: Path) -> None:
    """Evict the index files' pages from the page cache (those not mapped in a process)."""
    for p in index_files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _libc() -> Any:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def evict_mapped(index: Any) -> None:
    """Take the re-rank vectors of an open index out of the page cache, the index left open.

    ``posix_fadvise`` skips pages a process maps, so each shard's vector mapping is first
    paged out (``MADV_PAGEOUT``, Linux >= 5.4), then its file's pages are dropped."""
    import ctypes

    libc = _libc()
    madv_pageout = 21
    for shard in index.shards():
        v = shard.vectors
        if v is None or not v.nbytes:
            continue
        addr = v.ctypes.data - v.ctypes.data % _PAGE
        size = v.ctypes.data + v.nbytes - addr
        if libc.madvise(addr, size, madv_pageout) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"madvise(MADV_PAGEOUT): {os.strerror(err)}")
    drop_cache(index.path)


def resident_fraction(files: list[Path]) -> float:
    """Fraction of these files' pages in the page cache (``mincore`` on a fresh mapping)."""
    import ctypes
    import mmap

    libc = _libc()
    total = resident = 0
    for p in files:
        size = p.stat().st_size
        if not size:
            continue
        # a private mapping (ctypes needs a writable buffer); nothing is written or read
        with open(p, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
            pages = (size + _PAGE - 1) // _PAGE
            vec = (ctypes.c_ubyte * pages)()
            buf = (ctypes.c_char * 1).from_buffer(m)
            addr = ctypes.addressof(buf)
            rc = libc.mincore(addr, size, vec)
            del buf
            if rc != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore: {os.strerror(err)}")
            resident += int((np.frombuffer(vec, np.uint8) & 1).sum())
            total += pages
    return resident / max(total, 1)


def anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def recall10(I: np.ndarray, gt: np.ndarray) -> float:
    """R@10 over the queries that have ground truth (the first ``len(gt)``)."""
    I = I[: gt.shape[0]]
    hits = [np.intersect1d(I[i, :K], gt[i, :K]).size for i in range(I.shape[0])]
    return float(np.sum(hits)) / (I.shape[0] * K)


def faiss_with_codes(index: Any, refine: np.ndarray | None) -> Any:
    """FAISS holding the same codec and codes (read from the shard files: no re-encoding),
    with an ``IndexRefineFlat`` of the float32 rows when ``refine`` is given."""
    import faiss

    full = index.codec.faiss_index()
    ivf = faiss.extract_index_ivf(full)
    # IndexRefine wants base and refine index equally full when it is made: make it empty
    ref = faiss.IndexRefineFlat(full) if refine is not None else None
    for s in index.shards():
        # a shard file is a plain IndexIVFPQ (flat quantizer): FAISS reads it as it is
        part = faiss.deserialize_index(np.frombuffer(b"".join(s.serialize()), np.uint8))
        ivf.merge_from(part, 0)
        del part
    full.ntotal = ivf.ntotal
    if ref is None:
        return full
    flat = faiss.downcast_index(ref.refine_index)
    flat.add(refine)
    ref.ntotal = full.ntotal
    return ref


def faiss_search(fidx: Any, xq: np.ndarray, nprobe: int, rerank: int | None) -> Any:
    import faiss

    from fastface.index.params import hnsw_ef, nest_probe

    ivfp = faiss.SearchParametersIVF(nprobe=nprobe)
    base = fidx.base_index if rerank is not None else fidx
    ivf = faiss.extract_index_ivf(base)
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        qp = faiss.SearchParametersHNSW()
        qp.efSearch = hnsw_ef(nprobe)  # the same beam as fastface's coarse pass
        ivfp.quantizer_params = qp
    elif isinstance(quantizer, faiss.IndexIVF):  # two-level: the same top lists as fastface
        qp = faiss.SearchParametersIVF(nprobe=nest_probe(nprobe, ivf.nlist, quantizer.nlist))
        ivfp.quantizer_params = qp
    if rerank is None:
        return fidx.search(xq, K, params=ivfp)
    rp = faiss.IndexRefineSearchParameters(k_factor=rerank, base_index_params=ivfp)
    return fidx.search(xq, K, params=rp)


def cmd_search(args: argparse.Namespace) -> None:
    from fastface import ShardedIndex

    for n in map(parse_n, args.n):
        w = work(args, n)
        setup_logging(w / "search.log")
        # without ground truth yet (it takes longest at 100M) the result ids are kept and
        # `recall` scores them later: the queries are the same, regenerated from the seed
        gt = np.load(w / "truth.npz")["I"] if (w / "truth.npz").exists() else None
        xq = queries(n)[0]
        found: dict[str, np.ndarray] = {}
        path = w / "index"
        res: dict[str, Any] = {"n": n, "meta": bench_meta(), "rows": []}
        disk = sum(p.stat().st_size for p in index_files(path))
        res["disk_bytes"] = disk
        res["disk_bytes_per_vector"] = disk / n
        # open: cold (files evicted first), every file's checksum verified; memory-mapped,
        # or the default (codes packed in RAM, re-rank vectors mapped from disk)
        mmap = args.open == "mmap"
        res["open"] = args.open
        gc.collect()
        drop_cache(path)
        a0 = anon_bytes()
        t0 = time.perf_counter()
        index = ShardedIndex.open(path, mmap=mmap)
        res["open_s"] = time.perf_counter() - t0
        res["open_anon_gib"] = (anon_bytes() - a0) / 2**30
        res["nshards"] = index.nshards
        res["spec"] = index.params.spec
        log.info("search %s: opened %s in %.1f s", label(n), res["spec"], res["open_s"])
        with bench_lock(args.lock), PeakRSS(interval=0.2) as mem:
            for cache in args.cache:
                pts = [(p, r) for p in args.nprobe for r in args.rerank]
                if cache == "cold":
                    pts = [
                        (p, r) for p, r in pts if p in args.cold_nprobe and r == args.cold_rerank
                    ]
                for nprobe, rerank in pts:
                    times = []
                    out = None
                    resident = []
                    for _ in range(args.repeat if cache == "warm" else args.cold_repeat):
                        if cache == "cold" and not mmap:
                            # codes stay in RAM: the re-rank rows leave the page cache
                            # (pages just faulted in may sit in a per-CPU LRU batch that
                            # MADV_PAGEOUT skips: ~2% at 20k rows; a second pass takes them)
                            for _ in range(3):
                                evict_mapped(index)
                                left = resident_fraction(vector_files(path))
                                if left == 0.0:
                                    break
                            resident.append(left)
                        elif cache == "cold":
                            # pages this process has mapped are not evicted by fadvise: close,
                            # evict, reopen (open reads every file to verify it), evict again
                            index.close()
                            drop_cache(path)
                            index = ShardedIndex.open(path, mmap=True)
                            drop_cache(path)
                        elif out is None:
                            index.search(xq, K, nprobe=nprobe, rerank=rerank or None)  # warm up
                        t = time.perf_counter()
                        out = index.search(xq, K, nprobe=nprobe, rerank=rerank or None)
                        times.append(time.perf_counter() - t)
                    assert out is not None
                    sec = float(np.median(times))
                    found[f"{cache}-{nprobe}-{rerank}"] = out[1]
                    row = {
                        "method": "fastface",
                        "cache": cache,
                        "nprobe": nprobe,
                        "rerank": rerank,
                        "recall_at_10": None if gt is None else recall10(out[1], gt),
                        "qps": NQ / sec,
                        "ms_per_query": 1e3 * sec / NQ,
                    }
                    if resident:  # checked: the cold run starts with the rows evicted
                        row["vectors_resident_before"] = resident
                    res["rows"].append(row)
                    log.info("search %s: %s", label(n), json.dumps(row))
        if args.reference:
            # a reference where exact ground truth costs too much (100M): the top-10 of a
            # far wider search (many lists, many exactly re-scored candidates); its own R@10
            # against exact truth is measured at the sizes that have truth
            m, nprobe, rerank = args.reference
            _, ref = index.search(xq[:m], K, nprobe=nprobe, rerank=rerank)
            np.save(w / "reference.npy", ref)
            res["reference"] = {"queries": m, "nprobe": nprobe, "rerank": rerank}
            if gt is not None:
                res["reference"]["recall_at_10_vs_truth"] = recall10(ref, gt)
        res["search_peak_anon_gib"] = (mem.peak_anon) / 2**30
        res["search_peak_rss_gib"] = mem.peak / 2**30
        index.close()
        # runs of other caches made before (e.g. a cold run alone) are kept beside these
        old = load_json(w / "search.json")
        keep = [r for r in old.get("rows", []) if r["cache"] not in args.cache]
        res["rows"] = keep + res["rows"]
        res["runs"] = [*old.get("runs", []), {"cache": args.cache, "meta": res["meta"]}]
        if (w / "search-ids.npz").exists():
            prev = dict(np.load(w / "search-ids.npz"))
            found = {
                **{k: v for k, v in prev.items() if k.split("-")[0] not in args.cache},
                **found,
            }
        np.savez(w / "search-ids.npz", **found)
        save_json(w / "search.json", res)


def cmd_recall(args: argparse.Namespace) -> None:
    """Fill in R@10 of a search run made before its ground truth was there."""
    for n in map(parse_n, args.n):
        w = work(args, n)
        res = load_json(w / "search.json")
        found = np.load(w / "search-ids.npz")
        if not (w / "truth.npz").exists():
            ref = np.load(w / "reference.npy")
            for row in res["rows"]:
                key = f"{row['cache']}-{row['nprobe']}-{row['rerank']}"
                row["recall_at_10_vs_reference"] = recall10(found[key], ref)
            save_json(w / "search.json", res)
            continue
        gt = np.load(w / "truth.npz")["I"]
        for row in res["rows"]:
            row["recall_at_10"] = recall10(
                found[f"{row['cache']}-{row['nprobe']}-{row['rerank']}"], gt
            )
        save_json(w / "search.json", res)
        print(label(n), [(r["nprobe"], r["rerank"], r["recall_at_10"]) for r in res["rows"]])


def cmd_faiss(args: argparse.Namespace) -> None:
    """FAISS with the same codec and codes, interleaved with fastface on the same points."""
    from fastface import ShardedIndex

    for n in map(parse_n, args.n):
        w = work(args, n)
        setup_logging(w / "faiss.log")
        gt, xq = np.load(w / "truth.npz")["I"], queries(n)[0]
        path = w / "index"
        refine = n * D * 4 <= args.faiss_ram
        res: dict[str, Any] = {"n": n, "meta": bench_meta(), "rows": [], "refine": refine}
        gc.collect()
        a0 = anon_bytes()
        index = ShardedIndex.open(path, mmap=True) if "fastface" in args.methods else None
        ff_anon = anon_bytes() - a0
        # codes in RAM (the default open): sealed shards' lists packed list by list, the
        # re-rank vectors still memory-mapped from disk
        a0 = anon_bytes()
        t0 = time.perf_counter()
        index_ram = ShardedIndex.open(path)
        res["fastface_ram_open_s"] = time.perf_counter() - t0
        ff_ram_anon = anon_bytes() - a0
        x = None
        if refine:
            x = np.empty((n, D), np.float32)
            gen = dataset(n)
            step = 4096 * PER_IDENTITY * 5
            for lo in range(0, n, step):
                x[lo : lo + step] = gen.rows(lo, min(lo + step, n))[0]
        a1 = anon_bytes()
        t0 = time.perf_counter()
        fidx = faiss_with_codes(index or index_ram, x)
        res["faiss_load_s"] = time.perf_counter() - t0
        del x
        gc.collect()
        res["faiss_anon_gib"] = (anon_bytes() - a1) / 2**30 + (n * D * 4 if refine else 0) / 2**30
        res["fastface_anon_gib"] = ff_anon / 2**30 if index is not None else None
        res["fastface_ram_anon_gib"] = ff_ram_anon / 2**30
        log.info(
            "faiss %s: refine=%s anon %.2f GiB (fastface %s mmap, %.2f codes in RAM)",
            label(n),
            refine,
            res["faiss_anon_gib"],
            "-" if index is None else f"{res['fastface_anon_gib']:.2f}",
            res["fastface_ram_anon_gib"],
        )
        timed = bench_lock(args.lock)
        timed.__enter__()
        # (the index, queries and FAISS index bound now: these loop over N)
        runs: dict[str, Any] = {
            "fastface": lambda p, r, _rr, ix=index, q=xq: ix.search(
                q, K, nprobe=p, rerank=r or None
            ),
            "fastface-ram": lambda p, r, _rr, ix=index_ram, q=xq: ix.search(
                q, K, nprobe=p, rerank=r or None
            ),
            "faiss": lambda p, _r, rr, fx=fidx, q=xq: faiss_search(fx, q, p, rr),
        }
        runs = {m: f for m, f in runs.items() if m in args.methods}
        pts = [(p, r) for p in args.nprobe for r in args.rerank]
        for nprobe, rerank in pts:
            rr = (rerank or None) if refine else None
            # FAISS without refine has no rerank: once per nprobe, at the first rerank
            todo = {
                m: f for m, f in runs.items() if m != "faiss" or refine or rerank == args.rerank[0]
            }
            times: dict[str, list[float]] = {m: [] for m in todo}
            outs = {m: f(nprobe, rerank, rr) for m, f in todo.items()}  # warm-up
            for _ in range(args.repeat):  # interleaved rounds
                for m, f in todo.items():
                    t = time.perf_counter()
                    outs[m] = f(nprobe, rerank, rr)
                    times[m].append(time.perf_counter() - t)
            for method in todo:
                tt, out = times[method], outs[method]
                sec = float(np.median(tt))
                ours = method.startswith("fastface")
                row = {
                    "method": method if ours or refine else "faiss-no-refine",
                    "cache": "warm",
                    "nprobe": nprobe,
                    "rerank": rerank if ours or refine else None,
                    "recall_at_10": recall10(out[1], gt),
                    "qps": NQ / sec,
                    "ms_per_query": 1e3 * sec / NQ,
                }
                res["rows"].append(row)
                log.info("faiss %s: %s", label(n), json.dumps(row))
        timed.__exit__(None, None, None)
        if index is not None:
            index.close()
        index_ram.close()
        save_json(w / "faiss.json", res)


# --- dedup --------------------------------------------------------------------------------------
def cmd_dedup(args: argparse.Namespace) -> None:
    """Dedup of N rows plus planted near copies of 1% of them, built like the others."""
    from fastface import ShardedIndex, dedup
    from fastface.datasets import plant_duplicates

    n = parse_n(args.n[0])
    w = work(args, n)
    setup_logging(w / "dedup.log")
    if args.existing:  # time only: the search index has no planted pairs to find
        with ShardedIndex.open(w / "index") as index:  # codes in RAM (the default open)
            t0 = time.perf_counter()
            with PeakRSS(interval=0.5) as mem:
                r = dedup(index, args.threshold, nprobe=args.nprobe[0])
            run = {
                "n": n,
                "index": "the search index (no planted pairs)",
                "nprobe": args.nprobe[0],
                "threshold": args.threshold,
                "seconds": time.perf_counter() - t0,
                "pairs_found": int(r.pairs.shape[0]),
                "peak_anon_gib": mem.peak_anon / 2**30,
                "meta": bench_meta(),
            }
        log.info("dedup %s: %s", label(n), json.dumps(run, default=str)[:300])
        save_json(w / "dedup-existing.json", run)
        return
    planted = w / "planted.npz"
    if not planted.exists():
        gen = dataset(n)
        rng = np.random.default_rng(11)
        originals = np.sort(rng.choice(n, size=n // 100, replace=False))
        xo = rows_at(gen, originals)
        y, origin = plant_duplicates(xo, 1.0, copies=(1, 3), cos=(0.95, 0.99), seed=12)
        copies = y[originals.size :]
        np.savez(planted, copies=copies, origin=originals[origin[originals.size :]])
    z = np.load(planted)
    copies, origin = z["copies"], z["origin"]
    total = n + copies.shape[0]
    gen = dataset(n)

    def chunks(start: int) -> Any:
        step = 4096 * PER_IDENTITY * 5
        lo = start
        while lo < n:
            hi = min(lo - lo % step + step, n)
            yield gen.rows(lo, hi)[0]
            lo = hi
        yield copies[max(0, lo - n) :]

    path = w / "dedup-index"
    spec = args.spec or default_spec(total)
    t0 = time.perf_counter()
    index = ShardedIndex.build(
        chunks,
        path,
        spec,
        shard_size=shard_size_for(total),
        chunk_size=200_000,
        commit_every=shard_size_for(total),
    )
    build_s = time.perf_counter() - t0
    index.close()
    built = load_json(w / "dedup-build.json")
    built["build_s"] = built.get("build_s", 0.0) + build_s
    save_json(w / "dedup-build.json", built)
    if args.build_only:
        return
    # the default open: codes in RAM, packed list by list (the scans dedup runs are 2x
    # faster than through the memory-mapped files at 10M; docs/scaling.md)
    index = ShardedIndex.open(path)
    res: dict[str, Any] = {
        "n": total,
        "planted_copies": int(copies.shape[0]),
        "spec": spec,
        "build_s": built["build_s"],
        "meta": bench_meta(),
        "runs": [],
    }
    copy_ids = np.arange(n, total, dtype=np.int64)
    truth = np.sort(np.stack([origin, copy_ids], axis=1), axis=1)
    for nprobe in args.nprobe:
        t0 = time.perf_counter()
        with PeakRSS(interval=0.5) as mem:
            r = dedup(index, args.threshold, nprobe=nprobe)
        sec = time.perf_counter() - t0
        keys = r.pairs[:, 0] * total + r.pairs[:, 1]
        tkeys = truth[:, 0] * total + truth[:, 1]
        found = np.isin(tkeys, keys)
        run = {
            "nprobe": nprobe,
            "threshold": args.threshold,
            "seconds": sec,
            "pairs_found": int(r.pairs.shape[0]),
            "planted_pair_recall": float(found.mean()),
            "peak_anon_gib": mem.peak_anon / 2**30,
        }
        res["runs"].append(run)
        log.info("dedup %s: %s", label(total), json.dumps(run))
    index.close()
    save_json(w / "dedup.json", res)


# --- coarse stage diagnostic ----------------------------------------------------------------------
def cmd_coarse(args: argparse.Namespace) -> None:
    """Where the true neighbours' lists are: the codec's quantizer (HNSW or two-level) against
    exact coarse assignment (untimed; keys before the two-level quantizer said `hnsw`)."""
    import faiss

    from fastface import ShardedIndex

    for n in map(parse_n, args.n):
        w = work(args, n)
        setup_logging(w / "coarse.log")
        m = args.queries
        gt = np.load(w / "truth.npz")["I"][:m, :K]
        xq = queries(n)[0][:m]
        ids, rows = truth_rows(w, n, m)
        pos = {int(i): j for j, i in enumerate(ids)}
        with ShardedIndex.open(w / "index", mmap=True) as index:
            codec = index.codec
            q = faiss.downcast_index(codec.coarse_quantizer())
            cent = (q.storage if hasattr(q, "storage") else q).reconstruct_n(0, q.ntotal)
            at_add = codec.encode(rows)[0]
            exact = np.argmax(codec.rotate(rows) @ cent.T, axis=1)
            res: dict[str, Any] = {
                "n": n,
                "queries": m,
                "nlist": int(q.ntotal),
                "add_assignment_exact_share": float((at_add == exact).mean()),
                "probes": [],
            }
            for nprobe in args.nprobe:
                _, Ih = codec.assign(xq, nprobe)
                Ie = np.argsort(-(codec.rotate(xq) @ cent.T), axis=1)[:, :nprobe]
                hit_h = [[at_add[pos[int(t)]] in set(Ih[i]) for t in gt[i]] for i in range(m)]
                hit_e = [[exact[pos[int(t)]] in set(Ie[i]) for t in gt[i]] for i in range(m)]
                same = [len(set(Ih[i]) & set(Ie[i])) / nprobe for i in range(m)]
                res["probes"].append(
                    {
                        "nprobe": nprobe,
                        "true_top10_in_probed_lists_codec": float(np.mean(hit_h)),
                        "true_top10_in_probed_lists_exact": float(np.mean(hit_e)),
                        "codec_probes_that_are_exact_probes": float(np.mean(same)),
                    }
                )
        log.info("coarse %s: %s", label(n), json.dumps(res))
        save_json(w / "coarse.json", res)


def exact_quantizer(codec: Any) -> Any:
    """A FAISS flat index over the codec's centroids, in its metric: the exact nearest lists
    of (rotated) rows, to compare the HNSW walk or the two-level search with."""
    import faiss

    p = codec.params
    flat = faiss.IndexFlatIP(p.d) if p.metric == "ip" else faiss.IndexFlatL2(p.d)
    flat.add(np.ascontiguousarray(codec.centroids, np.float32))
    return flat


def cmd_dedup_coverage(args: argparse.Namespace) -> None:
    """Which planted pairs dedup can find: a pair is checked when one vector's resident list
    (its first probe) is among the other's ``nprobe`` probes; dedup scores checked pairs
    exactly, so the share of covered pairs is its planted-pair recall. Probes from the HNSW
    walk at several depths and from exact assignment over every centroid (the walk timed)."""

    from fastface import ShardedIndex

    n = parse_n(args.n[0])
    w = work(args, n)
    setup_logging(w / "dedup-coverage.log")
    z = np.load(w / "planted.npz")
    copies, origin = z["copies"], z["origin"]
    uo, inv = np.unique(origin, return_inverse=True)
    xo = rows_at(dataset(n), uo)
    # as dedup reads them: float16 rows from the index files, made unit length
    pair = [xo[inv].astype(np.float16).astype(np.float32), copies.astype(np.float16)]
    a, b = (np.ascontiguousarray(v, np.float32) for v in pair)
    for v in (a, b):
        v /= np.linalg.norm(v, axis=1, keepdims=True)
    kmax = max(args.nprobe)
    res: dict[str, Any] = {
        "n": n + copies.shape[0],
        "pairs": int(copies.shape[0]),
        "pair_cos_min": float((a * b).sum(1).min()),
        "meta": bench_meta(),
        "rows": [],
    }
    with ShardedIndex.open(w / "dedup-index", mmap=True) as index:
        codec = index.codec
        res["spec"] = index.params.spec
        probes: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
        with bench_lock(args.lock):
            for ef in args.ef:
                t0 = time.perf_counter()
                pa = codec.assign(a, kmax, ef_search=ef)[1]
                pb = codec.assign(b, kmax, ef_search=ef)[1]
                probes[f"hnsw ef {ef}"] = (pa, pb, time.perf_counter() - t0)
        flat = exact_quantizer(index.codec)
        t0 = time.perf_counter()
        ea = flat.search(codec.rotate(a), kmax)[1]
        eb = flat.search(codec.rotate(b), kmax)[1]
        probes["exact"] = (ea, eb, time.perf_counter() - t0)
    for name, (pa, pb, sec) in probes.items():
        row: dict[str, Any] = {
            "assignment": name,
            "seconds_for_all_pairs": sec,
            "vectors_per_s": 2 * a.shape[0] / sec,
            "first_probe_is_exact_nearest": float((pa[:, 0] == ea[:, 0]).mean()),
        }
        for nprobe in args.nprobe:
            hit = (pa[:, :nprobe] == pb[:, :1]).any(1) | (pb[:, :nprobe] == pa[:, :1]).any(1)
            row[f"covered_nprobe_{nprobe}"] = float(hit.mean())
        res["rows"].append(row)
        log.info("dedup coverage %s: %s", label(n), json.dumps(row))
    save_json(w / "dedup-coverage.json", res)


def cmd_add_depth(args: argparse.Namespace) -> None:
    """How often the HNSW walk over the centroids finds a row's nearest list, per depth
    (the add walks at ``EF_ADD``), and how fast: rows of the index's own data."""
    from fastface import ShardedIndex

    for n in map(parse_n, args.n):
        w = work(args, n)
        setup_logging(w / "add-depth.log")
        with ShardedIndex.open(w / "index", mmap=True) as index:
            codec = index.codec
            x = dataset(n).rows(n // 2, n // 2 + args.rows)[0]
            xr = codec.rotate(x)
            exact = exact_quantizer(index.codec).search(xr, 1)[1][:, 0]
            res: dict[str, Any] = {
                "n": n,
                "nlist": index.params.nlist,
                "rows": args.rows,
                "meta": bench_meta(),
                "depths": [],
            }
            with bench_lock(args.lock):
                for ef in args.ef:
                    codec.assign(x[:256], 1, ef_search=ef)  # warm up
                    t0 = time.perf_counter()
                    got = codec.assign(x, 1, ef_search=ef)[1][:, 0]
                    sec = time.perf_counter() - t0
                    row = {
                        "ef": ef,
                        "nearest_list_share": float((got == exact).mean()),
                        "rows_per_s": x.shape[0] / sec,
                    }
                    res["depths"].append(row)
                    log.info("add depth %s: %s", label(n), json.dumps(row))
        save_json(w / "add-depth.json", res)


def truth_rows(w: Path, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of the first ``m`` queries' true top-10 (sorted unique ids, rows), regenerated
    one by one (~50 ms each at 100M) and kept in ``truth-rows.npz`` for the next run."""
    cache = w / "truth-rows.npz"
    ids = np.unique(np.load(w / "truth.npz")["I"][:m, :K].ravel())
    if cache.exists():
        z = np.load(cache)
        if np.isin(ids, z["ids"]).all():
            return ids, z["rows"][np.searchsorted(z["ids"], ids)]
    gen = dataset(n)
    rows = np.stack([gen.rows(int(i), int(i) + 1)[0][0] for i in ids])
    np.savez(cache, ids=ids, rows=rows)
    return ids, rows


def compare_quantizers(
    codec: Any, xa: np.ndarray, rr: np.ndarray, home_of: np.ndarray, xq: np.ndarray, args: Any
) -> dict[str, Any]:
    """Exact, HNSW32 and the codec's two-level quantizer over ``codec``'s centroids: per
    method the add's nearest-list share and speed on rows ``xa``, then the share of the
    true top-10 (rows ``rr``; ``home_of`` (queries, 10) indexes them) in the queries'
    probed lists and the coarse pass's speed. All inputs rotated already."""
    import faiss

    from fastface.index.params import EF_ADD, NEST_PROBE_ADD, hnsw_ef, nest_probe

    p = codec.params
    metric = faiss.METRIC_INNER_PRODUCT if p.metric == "ip" else faiss.METRIC_L2
    flat = exact_quantizer(codec)
    methods: dict[str, Any] = {"exact": (flat, None, lambda k: None)}
    t0 = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(p.d, 32, metric)
    hnsw.hnsw.efConstruction = 40
    hnsw.add(np.ascontiguousarray(codec.centroids, np.float32))
    out: dict[str, Any] = {"hnsw_build_s": time.perf_counter() - t0, "methods": {}}

    def hp(ef: int) -> Any:
        sp = faiss.SearchParametersHNSW()
        sp.efSearch = ef
        return sp

    methods["hnsw32"] = (hnsw, hp(EF_ADD), lambda k: hp(hnsw_ef(k)))
    nested = faiss.downcast_index(codec.coarse_quantizer())
    if isinstance(nested, faiss.IndexIVF):
        top = nested.nlist
        methods[f"ivf{top}"] = (
            nested,
            faiss.SearchParametersIVF(nprobe=NEST_PROBE_ADD),
            lambda k, top=top: faiss.SearchParametersIVF(nprobe=nest_probe(k, p.nlist, top)),
        )
    exact_add = flat.search(xa, 1)[1][:, 0]
    m = xq.shape[0]
    with bench_lock(args.lock):
        for name, (q, add_params, query_params) in methods.items():

            def search(x: np.ndarray, k: int, sp: Any, q: Any = q) -> Any:
                return q.search(x, k) if sp is None else q.search(x, k, params=sp)

            # the exact add is timed on a tenth of the rows: it is ~30x slower
            sub = xa if name != "exact" else xa[: max(1, xa.shape[0] // 10)]
            search(sub[:256], 1, add_params)  # warm up
            t = time.perf_counter()
            got = search(sub, 1, add_params)[1][:, 0]
            add_s = time.perf_counter() - t
            row: dict[str, Any] = {
                "add_nearest_list_share": float((got == exact_add[: sub.shape[0]]).mean()),
                "add_rows_per_s": sub.shape[0] / add_s,
                "probes": [],
            }
            home = search(rr, 1, add_params)[1][:, 0][home_of]  # (m, 10) lists of the truth
            for nprobe in args.nprobe:
                t = time.perf_counter()
                probes = search(xq, nprobe, query_params(nprobe))[1]
                sec = time.perf_counter() - t
                hit = np.mean([np.isin(home[i], probes[i]) for i in range(m)])
                row["probes"].append(
                    {
                        "nprobe": nprobe,
                        "true_top10_in_probed_lists": float(hit),
                        "coarse_queries_per_s": m / sec,
                    }
                )
            out["methods"][name] = row
            log.info("quantizers %s: %s", name, json.dumps(row))
    return out


def cmd_quantizers(args: argparse.Namespace) -> None:
    """Coarse quantizers over the built codec's centroids, side by side: exact (FAISS flat),
    an HNSW32 graph (built here as the library builds it, efConstruction 40) and the
    codec's two-level IVF when it has one. Per quantizer: the share of rows its add puts in
    their nearest list and the add's speed, then how often the true top-10 of the queries
    lie in the probed lists (each method's own add for the neighbours, its own probes for
    the queries: what a search can reach before any scan) and the coarse pass's speed.

    ``--second``: the same on a second, different data set, in memory (no index, no
    ``--work-dir`` data): ``--second-n`` rows of 64-d synthetic faces with 4 samples per
    identity, 50 looser population groups (intra-identity cosine 0.5, group cosine 0.5),
    a codec ``IVF<nlist>_IVF<nlist/64>,PQ16`` trained on all of them, exact truth."""
    from fastface import ShardedIndex

    if args.second:
        cmd_quantizers_second(args)
        return
    n = parse_n(args.n[0])
    w = work(args, n)
    setup_logging(w / "quantizers.log")
    m = args.queries
    gt = np.load(w / "truth.npz")["I"][:m, :K]
    ids, rows = truth_rows(w, n, m)
    with ShardedIndex.open(w / "index", mmap=True) as index:
        codec = index.codec
        xq = np.ascontiguousarray(codec.rotate(queries(n)[0][:m]), np.float32)
        rr = np.ascontiguousarray(codec.rotate(rows), np.float32)
        xa = np.ascontiguousarray(codec.rotate(dataset(n).rows(n // 2, n // 2 + args.rows)[0]))
        res: dict[str, Any] = {
            "n": n,
            "nlist": index.params.nlist,
            "spec": index.params.spec,
            "queries": m,
            "add_rows": args.rows,
            "meta": bench_meta(),
        }
        res.update(compare_quantizers(codec, xa, rr, np.searchsorted(ids, gt), xq, args))
    save_json(w / "quantizers.json", res)


def cmd_quantizers_second(args: argparse.Namespace) -> None:
    from fastface.datasets import SyntheticFaces
    from fastface.eval import ground_truth
    from fastface.index import Codec, parse_spec

    n = parse_n(args.second_n)
    out = Path(args.work_dir) / "quantizers-second.json"
    setup_logging(Path(args.work_dir) / "quantizers-second.log")
    gen = SyntheticFaces(
        n_identities=n // 4,
        per_identity=4,
        d=64,
        seed=3,
        intra_cos=0.5,
        n_groups=50,
        group_cos=0.5,
    )
    xb = gen.vectors()[0]
    xq = gen.queries(args.queries, seed=11)[0]
    nlist = args.second_nlist
    spec = f"IVF{nlist}_IVF{nlist // 64},PQ16"
    t0 = time.perf_counter()
    codec = Codec.train(parse_spec(spec, 64), xb)
    train_s = time.perf_counter() - t0
    _, gt = ground_truth(xb, xq, K)
    ids = np.unique(gt.ravel())
    res: dict[str, Any] = {
        "data": repr(gen),
        "n": n,
        "spec": spec,
        "train_s": train_s,
        "queries": args.queries,
        "add_rows": min(args.rows, n),
        "meta": bench_meta(),
    }
    res.update(
        compare_quantizers(codec, xb[: args.rows], xb[ids], np.searchsorted(ids, gt), xq, args)
    )
    save_json(out, res)


# --- bounds --------------------------------------------------------------------------------------
def cmd_bounds(args: argparse.Namespace) -> None:
    """Memory bandwidth (a large copy) and random 4 KiB read IOPS of the disk (O_DIRECT)."""
    w = Path(args.work_dir)
    setup_logging(w / "bounds.log")
    res: dict[str, Any] = {"meta": bench_meta()}
    a = np.ones(1 << 28, np.uint8)
    b = np.empty_like(a)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t)
    res["memory_copy_gb_s"] = 2 * a.nbytes / min(times) / 1e9  # read + write
    del a, b
    target = max(
        Path(args.work_dir).glob("*/index/shard-*.f16.npy"), key=lambda p: p.stat().st_size
    )
    size = target.stat().st_size
    fd = os.open(target, os.O_RDONLY | os.O_DIRECT)
    import mmap

    buf = mmap.mmap(-1, 4096)
    rng = np.random.default_rng(0)
    offs = rng.integers(0, size // 4096, 20000) * 4096
    t = time.perf_counter()
    for off in offs:
        os.preadv(fd, [buf], int(off))
    sec = time.perf_counter() - t
    res["disk_random_4k_iops_qd1"] = offs.size / sec
    big = mmap.mmap(-1, 1 << 24)
    t = time.perf_counter()
    done = 0
    for off in range(0, min(size, 2 << 30) - (1 << 24), 1 << 24):
        done += os.preadv(fd, [big], off)
    res["disk_sequential_mb_s"] = done / (time.perf_counter() - t) / 1e6
    os.close(fd)
    res["file"] = str(target)
    log.info("bounds: %s", json.dumps(res, default=str)[:400])
    save_json(w / "bounds.json", res)


# --- report --------------------------------------------------------------------------------------
def build_log_summary(path: Path) -> dict[str, Any]:
    """Sessions of a build from its log: start, last commit, training time."""
    import datetime as dt

    def stamp(line: str) -> float:
        return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()

    sessions: list[dict[str, Any]] = []
    train_s = None
    if path.exists():
        for line in path.read_text().splitlines():
            if "scale build: n=" in line:
                sessions.append({"start": stamp(line), "useful_s": 0.0, "rows": 0})
            elif sessions and ("rows committed" in line or "build: complete" in line):
                sessions[-1]["useful_s"] = stamp(line) - sessions[-1]["start"]
                if "rows committed" in line:
                    sessions[-1]["rows"] = int(line.split("build: ")[1].split()[0])
            elif "codec trained in" in line:
                train_s = float(line.rsplit("in ", 1)[1].split()[0])
    return {"sessions": sessions, "train_s": train_s}


def best_point(rows: list[dict[str, Any]], target: float = 0.95) -> dict[str, Any] | None:
    """The fastest operating point reaching ``target`` R@10, else the most accurate one."""
    rows = [r for r in rows if r["recall_at_10"] is not None]
    if not rows:
        return None
    ok = [r for r in rows if r["recall_at_10"] >= target]
    if ok:
        return max(ok, key=lambda r: r["qps"])
    return max(rows, key=lambda r: (r["recall_at_10"], r["qps"]))


def cmd_report(args: argparse.Namespace) -> None:
    root = Path(args.work_dir)
    per_n: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name[0].isdigit()]
    for w in sorted(dirs, key=lambda p: parse_n(p.name)):
        n = parse_n(w.name)
        build = load_json(w / "build-stats.json")
        search = load_json(w / "search.json")
        basis = "exact"
        if search.get("rows") and all(r["recall_at_10"] is None for r in search["rows"]):
            # no exact ground truth at this N: R@10 against the wide-search reference
            basis = "reference"
            for r in search["rows"]:
                r["recall_at_10"] = r.get("recall_at_10_vs_reference")
        search["recall_basis"] = basis
        fa = load_json(w / "faiss.json")
        dd = load_json(w / "dedup.json")
        truth = w / "truth.npz"
        sessions = build.get("sessions", [])
        build_s = sum(x.get("wall_s", 0.0) for x in sessions) or None
        from_log = build_log_summary(w / "build.log")
        if sessions and any("wall_s" not in x for x in sessions) and from_log["sessions"]:
            # an interrupted session has no wall_s: count it up to its last commit (the log)
            build_s = sum(x["useful_s"] for x in from_log["sessions"])
        build_anon = max((x.get("peak_anon_gib", 0.0) for x in sessions), default=None)
        entry: dict[str, Any] = {
            "n": n,
            "spec": build.get("spec"),
            "build_s": build_s,
            "build_sessions": len(sessions),
            "build_complete": all("wall_s" in x for x in sessions) and bool(sessions),
            "build_peak_anon_gib": build_anon,
            "build_log": from_log,
            "truth_s": float(np.load(truth)["seconds"]) if truth.exists() else None,
            "search": search,
            "faiss": fa,
            "dedup": dd,
            "dedup_existing": load_json(w / "dedup-existing.json"),
            "coarse": load_json(w / "coarse.json"),
            "add_depth": load_json(w / "add-depth.json"),
            "quantizers": load_json(w / "quantizers.json"),
            "dedup_coverage": load_json(w / "dedup-coverage.json"),
        }
        per_n.append(entry)
        disk = search.get("disk_bytes_per_vector")
        if disk is None and (w / "index").is_dir():  # no search run here: the files
            disk = sum(f.stat().st_size for f in index_files(w / "index")) / n
        common = {
            "n": n,
            "build_s": build_s,
            "disk_bytes_per_vector": disk,
            "open_s": search.get("open_s"),
        }
        for cache in ("warm", "cold"):
            rows = [r for r in search.get("rows", []) if r["cache"] == cache]
            b = best_point(rows)
            if b is not None:
                summary.append(
                    {
                        **common,
                        "method": f"fastface ({search.get('spec')}, "
                        + ("codes in RAM" if search.get("open") == "ram" else "mmap")
                        + f", {cache} cache)"
                        + ("" if basis == "exact" else ", R@10 vs reference"),
                        "recall_basis": basis,
                        "recall_at_10": b["recall_at_10"],
                        "qps": b["qps"],
                        "nprobe": b["nprobe"],
                        "rerank": b["rerank"],
                        "peak_anon_gib": search.get("search_peak_anon_gib"),
                        "peak_rss_gib": search.get("search_peak_rss_gib"),
                    }
                )
        for method in ("fastface", "fastface-ram", "faiss", "faiss-no-refine"):
            rows = [r for r in fa.get("rows", []) if r["method"] == method]
            b = best_point(rows)
            if b is None:
                continue
            name = {
                "fastface": "fastface, mmap (same run as FAISS, warm)",
                "fastface-ram": "fastface, codes in RAM (same run as FAISS, warm)",
                "faiss": "FAISS IndexRefineFlat (float32 in RAM)",
                "faiss-no-refine": "FAISS same codec, codes only (no refine)",
            }[method]
            anon = {
                "fastface": search.get("search_peak_anon_gib", fa.get("fastface_anon_gib")),
                "fastface-ram": fa.get("fastface_ram_anon_gib"),
            }.get(method, fa.get("faiss_anon_gib"))
            summary.append(
                {
                    "n": n,
                    "method": name,
                    "recall_at_10": b["recall_at_10"],
                    "qps": b["qps"],
                    "nprobe": b["nprobe"],
                    "rerank": b["rerank"],
                    # fastface mmap: the search run's peak (the files' pages are page cache);
                    # codes in RAM: what opening added; FAISS: codes, lists and refine rows
                    "peak_anon_gib": anon,
                    "peak_rss_gib": search.get("search_peak_rss_gib")
                    if method == "fastface"
                    else anon,
                    "build_s": build_s if method.startswith("fastface") else None,
                    "disk_bytes_per_vector": disk if method.startswith("fastface") else None,
                }
            )
    payload = {
        "meta": bench_meta(),
        "dataset": {
            "generator": "fastface.datasets.SyntheticFaces",
            "d": D,
            "per_identity": PER_IDENTITY,
            "n_groups": GROUPS,
            "seed": SEED,
            "queries": NQ,
            "k": K,
        },
        "bounds": load_json(root / "bounds.json"),
        "summary": summary,
        "per_n": per_n,
    }
    out = args.out or results_dir() / "scale.json"
    write_results(out, payload)
    print_table(
        summary,
        [
            ("n", "N", ",d"),
            ("method", "method", "s"),
            ("recall_at_10", "R@10", ".4f"),
            ("qps", "QPS", ".0f"),
            ("nprobe", "nprobe", "d"),
            ("rerank", "rerank", "d"),
            ("peak_anon_gib", "anon GiB", ".2f"),
            ("build_s", "build s", ".0f"),
            ("disk_bytes_per_vector", "disk B/vec", ".1f"),
        ],
    )
    plot(per_n, out.with_suffix(".png"))
    print(f"wrote {out}")


def plot(per_n: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(17, 5))

    def front(rows: list[dict[str, Any]], style: str, **kw: Any) -> None:
        """The Pareto front of some search rows on the recall-speed panel, if any."""
        pts = _pareto(rows)
        if pts:
            ax[0].plot([r["recall_at_10"] for r in pts], [r["qps"] for r in pts], style, **kw)

    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for c, e in zip(colors, per_n, strict=False):
        lab = label(e["n"])
        ref = " (R@10 vs reference)" if e["search"].get("recall_basis") != "exact" else ""
        for cache, style in (("warm", "-"), ("cold", ":")):
            rows = [r for r in e["search"].get("rows", []) if r["cache"] == cache]
            front(rows, style, marker="o", ms=3, color=c, label=f"fastface {lab} {cache}{ref}")
        same_run = [
            ("faiss", "s", "--", f"faiss {lab}"),
            ("faiss-no-refine", "x", "--", f"faiss-no-refine {lab}"),
            ("fastface-ram", "^", "-.", f"fastface codes in RAM {lab} (same run as FAISS)"),
        ]
        if not e["search"].get("rows"):  # no search run at this N: FAISS's run's mmap rows
            same_run.append(("fastface", "o", "-", f"fastface {lab} mmap (same run as FAISS)"))
        for method, marker, style, name in same_run:
            rows = [r for r in e["faiss"].get("rows", []) if r["method"] == method]
            front(rows, style, marker=marker, ms=3 if marker == "o" else 4, color=c, label=name)
    ax[0].set_xlabel("R@10")
    ax[0].set_ylabel("queries per second (batch of 1,000, 2 cores)")
    ax[0].set_yscale("log")
    ax[0].axvline(0.95, color="grey", lw=0.5)
    ax[0].legend(fontsize=7)
    ax[0].set_title("recall against speed (re-ranked from on-disk float16)")
    ns = [e["n"] for e in per_n]
    for key, name in (("build_s", "build s"), ("truth_s", "ground truth s")):
        vals = [e.get(key) for e in per_n]
        pts = [(n, v) for n, v in zip(ns, vals, strict=True) if v]
        if pts:
            ax[1].plot(*zip(*pts, strict=True), marker="o", label=name)
    opens = [(e["n"], e["search"].get("open_s")) for e in per_n if e["search"].get("open_s")]
    if opens:
        ax[1].plot(*zip(*opens, strict=True), marker="o", label="open s (cold, verified)")
    ax[1].set_xscale("log")
    ax[1].set_yscale("log")
    ax[1].set_xlabel("N")
    ax[1].legend()
    ax[1].set_title("time against N")
    for key, name in (("build_peak_anon_gib", "build peak anon GiB"),):
        pts = [(e["n"], e.get(key)) for e in per_n if e.get(key)]
        if pts:
            ax[2].plot(*zip(*pts, strict=True), marker="o", label=name)
    pts = [
        (e["n"], e["search"]["search_peak_anon_gib"])
        for e in per_n
        if e["search"].get("search_peak_anon_gib")
    ]
    if pts:
        ax[2].plot(*zip(*pts, strict=True), marker="o", label="search peak anon GiB")
    pts = [
        (e["n"], e["search"]["disk_bytes_per_vector"] / 100)
        for e in per_n
        if e["search"].get("disk_bytes_per_vector")
    ]
    if pts:
        ax[2].plot(*zip(*pts, strict=True), marker="s", label="disk bytes/vector / 100")
    ax[2].set_xscale("log")
    ax[2].set_yscale("log")
    ax[2].set_xlabel("N")
    ax[2].legend()
    ax[2].set_title("memory and disk against N")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = [r for r in rows if r["recall_at_10"] is not None]
    rows = sorted(rows, key=lambda r: (-r["recall_at_10"], -r["qps"]))
    out: list[dict[str, Any]] = []
    best = -1.0
    for r in rows:
        if r["qps"] > best:
            out.append(r)
            best = r["qps"]
    return sorted(out, key=lambda r: r["recall_at_10"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--lock", help="flock this file around timed phases only (e.g. /work/bench.lock)"
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
    b.add_argument("--chunk-size", type=int, default=204_800)
    b.add_argument(
        "--train-size",
        type=int,
        help="rows sampled to train the codec (default: the library's, at most 2 GiB)",
    )
    b.set_defaults(func=cmd_build)
    t = sub.add_parser("truth", help="exact top-100 of the 1,000 queries (resumable)")
    t.add_argument("--n", nargs="+", default=["1M"])
    t.add_argument(
        "--queries", type=int, default=NQ, help="ground truth of the first this many queries"
    )
    t.set_defaults(func=cmd_truth)
    s = sub.add_parser("search", help="R@10 against QPS, warm and cold page cache")
    s.add_argument("--n", nargs="+", default=["1M"])
    s.add_argument("--cache", nargs="+", default=["warm", "cold"], choices=["warm", "cold"])
    s.add_argument(
        "--open",
        choices=["ram", "mmap"],
        default="mmap",
        help="mmap: codes and vectors mapped; ram: the library's default open (codes packed "
        "in RAM, re-rank vectors mapped); cold then evicts the vectors, the index stays open",
    )
    s.add_argument("--repeat", type=int, default=3)
    s.add_argument("--cold-repeat", type=int, default=1)
    s.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    s.add_argument(
        "--reference",
        type=int,
        nargs=3,
        metavar=("QUERIES", "NPROBE", "RERANK"),
        help="also save a wide search's top-10 of the first QUERIES queries (untimed)",
    )
    s.add_argument(
        "--rerank", type=int, nargs="+", default=[2, 4, 8], help="0: codes only, no re-rank"
    )
    s.add_argument(
        "--cold-nprobe",
        type=int,
        nargs="+",
        default=[8, 16, 32, 64],
        help="cold cache: only these nprobe, at --cold-rerank (mmap: each run reopens the index)",
    )
    s.add_argument("--cold-rerank", type=int, default=4)
    s.set_defaults(func=cmd_search)
    rc = sub.add_parser("recall", help="R@10 of a search run made before the ground truth")
    rc.add_argument("--n", nargs="+", default=["1M"])
    rc.set_defaults(func=cmd_recall)
    f = sub.add_parser("faiss", help="FAISS with the same codec and codes, interleaved")
    f.add_argument("--n", nargs="+", default=["1M"])
    f.add_argument("--repeat", type=int, default=3)
    f.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    f.add_argument(
        "--rerank", type=int, nargs="+", default=[2, 4, 8], help="0: codes only, no re-rank"
    )
    f.add_argument(
        "--methods",
        nargs="+",
        choices=["fastface", "fastface-ram", "faiss"],
        default=["fastface", "fastface-ram", "faiss"],
        help="fastface: memory-mapped; fastface-ram: codes in RAM (the default open)",
    )
    f.add_argument(
        "--faiss-ram",
        type=int,
        default=6 << 30,
        help="float32 rows for IndexRefineFlat only when they take at most this many bytes",
    )
    f.set_defaults(func=cmd_faiss)
    dd = sub.add_parser("dedup", help="dedup time and planted-pair recall")
    dd.add_argument("--n", nargs=1, default=["10M"])
    dd.add_argument("--spec")
    dd.add_argument("--build-only", action="store_true", help="build the index, time nothing")
    dd.add_argument(
        "--existing", action="store_true", help="time dedup of the search index (no planting)"
    )
    dd.add_argument("--threshold", type=float, default=0.9)
    dd.add_argument("--nprobe", type=int, nargs="+", default=[2])
    dd.set_defaults(func=cmd_dedup)
    dc = sub.add_parser(
        "dedup-coverage", help="planted pairs dedup can reach: HNSW depths against exact lists"
    )
    dc.add_argument("--n", nargs=1, default=["10M"])
    dc.add_argument("--ef", type=int, nargs="+", default=[32, 64, 128, 256])
    dc.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    dc.set_defaults(func=cmd_dedup_coverage)
    ad = sub.add_parser("add-depth", help="HNSW walk depth against nearest-list share, speed")
    ad.add_argument("--n", nargs="+", default=["10M"])
    ad.add_argument("--rows", type=int, default=20_000)
    ad.add_argument("--ef", type=int, nargs="+", default=[64, 128, 256, 512])
    ad.set_defaults(func=cmd_add_depth)
    co = sub.add_parser("coarse", help="true neighbours' lists: the codec's against exact")
    co.add_argument("--n", nargs="+", default=["10M"])
    co.add_argument("--queries", type=int, default=100)
    co.add_argument("--nprobe", type=int, nargs="+", default=[16, 64, 512])
    co.set_defaults(func=cmd_coarse)
    qz = sub.add_parser(
        "quantizers", help="exact, HNSW and two-level coarse quantizers on the built codec"
    )
    qz.add_argument("--n", nargs=1, default=["100M"])
    qz.add_argument("--queries", type=int, default=1000)
    qz.add_argument("--rows", type=int, default=20_000)
    qz.add_argument("--nprobe", type=int, nargs="+", default=[64, 128, 256, 512])
    qz.add_argument("--second", action="store_true", help="a second, different data set")
    qz.add_argument("--second-n", default="2M")
    qz.add_argument("--second-nlist", type=int, default=65536)
    qz.set_defaults(func=cmd_quantizers)
    bo = sub.add_parser("bounds", help="memory bandwidth and disk IOPS of this machine")
    bo.set_defaults(func=cmd_bounds)
    r = sub.add_parser("report", help="JSON summary and plot from what was measured")
    r.add_argument("--out", type=Path, help="JSON path (default bench/results/scale.json)")
    r.set_defaults(func=cmd_report)
    args = p.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    gc.enable()
    sys.exit(main())
