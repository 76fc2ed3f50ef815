"""fastface on Ray against the same work done locally, in one run, on this machine.

Three parts, each timed in interleaved rounds (medians; ratios are medians of
the per-round ratios):

* search: ``RayShardedIndex`` (actors memory-mapping groups of the shards,
  coarse assignment on the driver, one merge) against ``ShardedIndex`` on
  the same index directory (in memory, and memory-mapped), batched queries;
  the results are checked equal, and the time of a Ray search is split into
  driver assignment, the actors' own scan time, transfer and scheduling,
  and the merge;
* build: the encode-and-write phase of ``fastface.distributed.build`` with
  1 and 2 workers against ``ShardedIndex`` adding the same chunks locally,
  all from one trained codec (training is the same code on the driver);
* embedding: ``fastface.distributed.embed_images`` with 1 and 2 actors
  against ``FacePipeline`` (``faces.analyze``) on the same JPEG files; the
  vectors are checked equal; actor start-up (models loaded per actor) is
  measured apart.

The JSON's ``summary`` has ``search_qps_ratio_ray_vs_local``,
``build_speedup_2_vs_1_workers`` and ``embed_speedup_2_vs_1_actors``.

    python bench/distributed.py [--n 1000000] [--d 512] [--nlist 1024] [--M 64]
        [--shards 4] [--actors 2] [--nq 1000] [--repeat 5] [--build-n 1000000]
        [--build-rounds 2] [--images 192] [--embed-rounds 2] [--skip search,build,embed]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from fastface import IVFPQParams, ShardedIndex
from fastface._bench.common import bench_meta, print_table, results_dir, write_results
from fastface.datasets import SyntheticFaces


def rounds(
    methods: dict[str, Callable[[], Any]], repeat: int, warmup: bool = True
) -> dict[str, list[float]]:
    """Wall times of each method, taking turns, ``repeat`` rounds (after one warm-up each)."""
    if warmup:
        for fn in methods.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(repeat):
        for k, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i]."""
    return float(statistics.median(a / b for a, b in zip(num, den, strict=True)))


# --- search ---------------------------------------------------------------------------------
def prepare_search(args: argparse.Namespace, work: Path) -> tuple[Any, Path, IVFPQParams]:
    """The vectors and the index searched (made once, kept in the work directory)."""
    gen = SyntheticFaces(args.n // 10, 10, args.d, seed=0, n_groups=300)
    data = work / f"synth-{gen.n_identities}x10x{args.d}-g300.npy"
    params = IVFPQParams(args.d, args.nlist, args.M)
    path = work / f"idx-{args.n}-{args.d}-{args.nlist}-{args.M}-s{args.shards}"
    state = ShardedIndex.inspect(path)["build"] if (path / "manifest.json").exists() else None
    if (state or {}).get("complete"):  # the queries come from the generator, not the file
        return gen, path, params
    if not data.exists():
        t0 = time.perf_counter()
        tmp = data.with_suffix(".partial.npy")
        gen.write_npy(tmp)
        os.replace(tmp, data)
        print(f"generated {data} in {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    ShardedIndex.build(
        data, path, params, shard_size=math.ceil(args.n / args.shards), progress=False
    ).close()
    print(f"built {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return gen, path, params


def bench_search(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from fastface.distributed import RayShardedIndex

    gen, path, params = prepare_search(args, work)
    xq, _ = gen.queries(args.nq, seed=1)
    k = 10
    local = ShardedIndex.open(path)
    mapped = ShardedIndex.open(path, mmap=True)
    # both sets of actors live at once (they take turns): half a CPU each on paper, one
    # thread each in fact (Ray sets OMP_NUM_THREADS=1 for less than 2 CPUs)
    cpus = args.cpus_per_actor / 2
    rx_mem = RayShardedIndex(path, actors=args.actors, num_cpus_per_actor=cpus, mmap=False)
    rx_map = RayShardedIndex(path, actors=args.actors, num_cpus_per_actor=cpus, mmap=True)
    print(f"Ray actors: {rx_mem.groups} (shards per actor)", flush=True)
    pool = ThreadPoolExecutor(2)
    rows = []
    points = [
        {"batch": args.nq, "nprobe": 16, "rerank": None},
        {"batch": args.nq, "nprobe": 16, "rerank": 4},
        {"batch": args.nq, "nprobe": 64, "rerank": None},
        {"batch": max(1, args.nq // 10), "nprobe": 16, "rerank": None},
    ]
    breakdown = {}
    ray_mem = f"RayShardedIndex ({len(rx_mem.groups)} actors, in memory)"
    ray_map = f"RayShardedIndex ({len(rx_map.groups)} actors, mmap)"
    ray_two = f"RayShardedIndex ({len(rx_mem.groups)} actors, in memory), 2 batches in flight"
    for pt in points:
        b, nprobe, rr = pt["batch"], pt["nprobe"], pt["rerank"]
        batches = [xq[i : i + b] for i in range(0, args.nq, b)]

        def run(
            index: Any, batches: list[Any] = batches, nprobe: int = nprobe, rr: Any = rr
        ) -> Any:
            return [index.search(q, k, nprobe=nprobe, rerank=rr) for q in batches]

        def run2(
            index: Any, batches: list[Any] = batches, nprobe: int = nprobe, rr: Any = rr
        ) -> Any:  # two driver threads: one batch's assignment overlaps another's scan
            return list(pool.map(lambda x: index.search(x, k, nprobe=nprobe, rerank=rr), batches))

        methods = {
            "ShardedIndex (in memory)": lambda run=run: run(local),
            ray_mem: lambda run=run: run(rx_mem),
            "ShardedIndex (mmap)": lambda run=run: run(mapped),
            ray_map: lambda run=run: run(rx_map),
        }
        if len(batches) > 1:
            methods[ray_two] = lambda run2=run2: run2(rx_mem)
        ref = run(local)
        same = {
            m: all(
                np.array_equal(a[0], g[0]) and np.array_equal(a[1], g[1])
                for a, g in zip(ref, fn(), strict=True)
            )
            for m, fn in methods.items()
        }
        times = rounds(methods, args.repeat)
        stages: dict[str, list[float]] = {}
        for _ in range(args.repeat):
            for q in batches:
                rx_mem.search(q, k, nprobe=nprobe, rerank=rr)
                for st, v in rx_mem.last_timing.items():
                    stages.setdefault(st, []).append(v)
        stage_med = {st: float(statistics.median(v)) for st, v in stages.items()}
        stage_med["transfer_and_scheduling_s"] = (
            stage_med["scan_wall_s"]
            - stage_med["scan_actor_s"]
            + stage_med.get("rescore_wall_s", 0.0)
            - stage_med.get("rescore_actor_s", 0.0)
        )
        label = f"batch {b}, nprobe {nprobe}" + (f", rerank {rr}" if rr else "")
        breakdown[label] = stage_med
        for m in methods:
            t = statistics.median(times[m])
            base = "ShardedIndex (mmap)" if m == ray_map else "ShardedIndex (in memory)"
            rows.append(
                {
                    "point": label,
                    "method": m,
                    "QPS": args.nq / t,
                    "ms_per_batch": 1e3 * t / len(batches),
                    "vs": base,
                    "ratio": ratio(times[base], times[m]),
                    "identical_results": same[m],
                }
            )
    table = print_table(
        rows,
        [
            ("point", "point", "s"),
            ("method", "method", "s"),
            ("QPS", "QPS", ",.0f"),
            ("ms_per_batch", "ms/batch", ".2f"),
            ("ratio", "vs local twin", ".3f"),
        ],
    )
    print("per-batch stages of a Ray search, actors in memory (medians):", flush=True)
    for label, st in breakdown.items():
        print(f"  {label}: " + ", ".join(f"{s} {v * 1e3:.2f} ms" for s, v in st.items()))
    main_label = f"batch {args.nq}, nprobe 16"

    def pick(point: str, method: str) -> float:
        return float(
            next(r["ratio"] for r in rows if r["point"] == point and r["method"] == method)
        )

    out = {
        "index": {
            "path": str(path),
            "n": args.n,
            "params": params.to_dict(),
            "shards": args.shards,
        },
        "actors": rx_mem.groups,
        "cpus_per_actor_reserved": cpus,
        "k": k,
        "nq": args.nq,
        "rows": rows,
        "stages_ray_in_memory": breakdown,
        "table": table,
        "qps_ratio_ray_vs_local": pick(main_label, ray_mem),
        "qps_ratio_ray_mmap_vs_local_mmap": pick(main_label, ray_map),
        "all_identical": all(r["identical_results"] for r in rows),
    }
    rx_mem.close()
    rx_map.close()
    pool.shutdown()
    return out


# --- build ----------------------------------------------------------------------------------
def prepare_build(args: argparse.Namespace, work: Path) -> tuple[Path, Any, float]:
    """The rows built and the codec they are encoded with (trained once, kept)."""
    from fastface.index.train import default_train_size

    src = work / f"build-{args.build_n}.npy"  # the first rows of the searched vectors
    if not src.exists():
        data = sorted(work.glob(f"synth-*x10x{args.d}-g300.npy"))
        whole = next(p for p in data if np.load(p, mmap_mode="r").shape[0] >= args.build_n)
        np.save(src, np.load(whole, mmap_mode="r")[: args.build_n])
    params = IVFPQParams(args.d, args.nlist, args.M)
    shard_size = math.ceil(args.build_n / args.shards)
    codec_dir = work / f"build-codec-{args.build_n}-{args.d}-{args.nlist}-{args.M}"
    if (codec_dir / "manifest.json").exists():
        with ShardedIndex.open(codec_dir) as c:
            if c.is_trained:
                return src, c.codec, float((c.build_state or {}).get("train_seconds", 0.0))
    shutil.rmtree(codec_dir, ignore_errors=True)
    t0 = time.perf_counter()
    with ShardedIndex.create(codec_dir, params, shard_size=shard_size) as c:
        from fastface.io import open_vectors

        limit = default_train_size(params)
        c.train(open_vectors(src).sample(limit, seed=0), max_points=limit, seed=0)
        train_s = time.perf_counter() - t0
        c.set_build_state({"train_seconds": train_s})
        codec = c.codec
    print(f"trained the codec in {train_s:.0f} s", flush=True)
    return src, codec, train_s


def bench_build(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from fastface.distributed import build

    src, codec, train_s = prepare_build(args, work)
    params = codec.params
    shard_size = math.ceil(args.build_n / args.shards)

    def local() -> None:
        path = work / "build-local"
        shutil.rmtree(path, ignore_errors=True)
        from fastface.io import open_vectors

        with ShardedIndex.create(path, codec, shard_size=shard_size) as index:
            for lo, chunk in open_vectors(src).iter_chunks(100_000):
                index.add(chunk, np.arange(lo, lo + chunk.shape[0]), commit=False)
            index.flush()

    def ray_build(workers: int) -> Callable[[], None]:
        def fn() -> None:
            path = work / f"build-ray{workers}"
            shutil.rmtree(path, ignore_errors=True)
            build(src, path, codec, shard_size=shard_size, workers=workers).close()

        return fn

    methods = {"local ShardedIndex": local, "Ray, 1 worker": ray_build(1)}
    methods["Ray, 2 workers"] = ray_build(2)
    times = rounds(methods, args.build_rounds, warmup=False)
    same = _manifest_content(work / "build-ray2") == _manifest_content(work / "build-local")
    rows = []
    keys = list(methods)
    for m in keys:
        t = statistics.median(times[m])
        rows.append(
            {
                "method": m,
                "seconds": t,
                "vectors_per_s": args.build_n / t,
                "ratio_vs_local": ratio(times[keys[0]], times[m]),
            }
        )
    table = print_table(
        rows,
        [
            ("method", "method", "s"),
            ("seconds", "s", ".1f"),
            ("vectors_per_s", "vectors/s", ",.0f"),
            ("ratio_vs_local", "vs local", ".2f"),
        ],
    )
    return {
        "n": args.build_n,
        "shards": args.shards,
        "params": params.to_dict(),
        "train_seconds": train_s,
        "rows": rows,
        "table": table,
        "identical_files": same,
        "speedup_2_vs_1_workers": ratio(times["Ray, 1 worker"], times["Ray, 2 workers"]),
    }


def _manifest_content(path: Path) -> Any:
    import json

    man = json.loads((path / "manifest.json").read_text())
    return [
        (s["number"], s["count"], {k: v["sha256"] for k, v in s["files"].items()})
        for s in man["shards"]
    ]


# --- embedding ------------------------------------------------------------------------------
def prepare_embed(args: argparse.Namespace, work: Path) -> Path:
    """The folder of JPEG files embedded (bench/pipeline.py's, made once)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pipeline import make_folder

    folder = work / f"images-{args.images}"
    if not folder.exists():
        tmp = work / f"images-{args.images}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        make_folder(tmp, args.images)
        os.replace(tmp, folder)
    return folder


def bench_embed(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from fastface import faces
    from fastface.distributed import embed_images

    folder = prepare_embed(args, work)
    paths = sorted(str(p) for p in folder.glob("*.jpg"))
    emb = faces.dlib_onnx_embedder()
    out = {1: work / "embed-1.parquet", 2: work / "embed-2.parquet"}
    results: dict[str, Any] = {}

    def local() -> None:
        results["local"] = faces.analyze(paths, embedder=emb, batch_size=8)

    def ray_embed(actors: int) -> Callable[[], None]:
        def fn() -> None:
            embed_images(paths, out[actors], batch_size=8, actors=actors, force=True)

        return fn

    methods = {"FacePipeline (local)": local, "Ray, 1 actor": ray_embed(1)}
    methods["Ray, 2 actors"] = ray_embed(2)
    times = rounds(methods, args.embed_rounds, warmup=False)
    # start-up alone: one batch of 8 images (actors made, models loaded, one batch)
    startup = {
        a: statistics.median(
            _timed(
                lambda a=a: embed_images(
                    paths[:8], work / f"startup-{a}.parquet", batch_size=8, actors=a, force=True
                )
            )
            for _ in range(2)
        )
        for a in (1, 2)
    }
    got = np.asarray(pq.read_table(out[2]).column("embedding").to_pylist(), np.float32)
    same = bool(np.array_equal(got, results["local"].embeddings))
    rows = []
    keys = list(methods)
    for m in keys:
        t = statistics.median(times[m])
        rows.append(
            {
                "method": m,
                "seconds": t,
                "images_per_s": len(paths) / t,
                "ratio_vs_local": ratio(times[keys[0]], times[m]),
            }
        )
    table = print_table(
        rows,
        [
            ("method", "method", "s"),
            ("seconds", "s", ".1f"),
            ("images_per_s", "images/s", ".1f"),
            ("ratio_vs_local", "vs local", ".2f"),
        ],
    )
    return {
        "images": len(paths),
        "faces": len(results["local"]),
        "rows": rows,
        "table": table,
        "startup_seconds_8_images": {f"{a} actor(s)": s for a, s in startup.items()},
        "identical_vectors": same,
        "speedup_2_vs_1_actors": ratio(times["Ray, 1 actor"], times["Ray, 2 actors"]),
    }


@contextlib.contextmanager
def bench_lock(path: Path | None) -> Iterator[None]:
    """Hold ``flock(path)`` (no-op without a path); records the load when taken."""
    if path is None:
        yield
        return
    import fcntl

    with open(path, "a") as f:
        t0 = time.perf_counter()
        fcntl.flock(f, fcntl.LOCK_EX)
        print(
            f"took {path} after {time.perf_counter() - t0:.0f} s, load {os.getloadavg()}",
            flush=True,
        )
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench/distributed.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--M", type=int, default=64)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--actors", type=int, default=2, help="groups of shards (one actor each)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--nq", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--build-n", type=int, default=1_000_000)
    p.add_argument("--build-rounds", type=int, default=2)
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--embed-rounds", type=int, default=2)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: search,build,embed")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "fastface-bench",
    )
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/distributed.json)")
    p.add_argument(
        "--prepare",
        action="store_true",
        help="only make the vectors, the index, the codec and the images (no timing, no lock)",
    )
    p.add_argument(
        "--lock",
        type=Path,
        help="a file locked (flock) while the parts are timed: benchmarks never time at once",
    )
    args = p.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    if args.prepare:
        if not {"search", "build"} <= skip:
            prepare_search(args, work)
        if "build" not in skip:
            prepare_build(args, work)
        if "embed" not in skip:
            prepare_embed(args, work)
        return 0
    import ray

    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    meta = bench_meta()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload: dict[str, Any] = {"meta": meta, "config": config}
    summary: dict[str, Any] = {}
    # one hold of the lock for the three timed parts (prepared beforehand: --prepare)
    lock = contextlib.ExitStack()
    lock.enter_context(bench_lock(args.lock))
    meta["load_avg_when_locked"] = os.getloadavg()
    if "search" not in skip:
        payload["search"] = bench_search(args, work)
        summary["search_qps_ratio_ray_vs_local"] = payload["search"]["qps_ratio_ray_vs_local"]
        summary["search_qps_ratio_ray_mmap_vs_local_mmap"] = payload["search"][
            "qps_ratio_ray_mmap_vs_local_mmap"
        ]
        summary["search_identical_results"] = payload["search"]["all_identical"]
    if "build" not in skip:
        payload["build"] = bench_build(args, work)
        summary["build_speedup_2_vs_1_workers"] = payload["build"]["speedup_2_vs_1_workers"]
        summary["build_identical_files"] = payload["build"]["identical_files"]
    if "embed" not in skip:
        payload["embed"] = bench_embed(args, work)
        summary["embed_speedup_2_vs_1_actors"] = payload["embed"]["speedup_2_vs_1_actors"]
        summary["embed_identical_vectors"] = payload["embed"]["identical_vectors"]
    lock.close()
    summary["load_avg_at_end"] = os.getloadavg()
    summary["command"] = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
    payload["summary"] = summary
    print(summary, flush=True)
    out = args.out or results_dir() / "distributed.json"
    write_results(out, payload)
    print(f"wrote {out}", flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
