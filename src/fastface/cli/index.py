"""Index commands: ``build``, ``search``, ``info``, ``index add|remove|compact``, ``dedup``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ._common import (
    Formatter,
    UsageError,
    add_progress_flags,
    input_file,
    output_file,
    positive_int,
    progress_wanted,
    write_json,
    write_jsonl,
)
from ._ray import add_ray_option

__all__ = ["register"]

VECTOR_SUFFIXES = (".npy", ".fvecs", ".parquet", ".pq")


def _index_dir(value: str) -> Path:
    p = Path(value)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: no such index directory")
    return p


def _read_vectors(path: Path, column: str | None) -> np.ndarray:
    from ..io import open_vectors

    return open_vectors(path, column=column).read_all()


def summary(index: Any) -> dict[str, Any]:
    """Parameters, counts and disk use of an open ShardedIndex."""
    files = sorted(index.path.iterdir())
    return {
        "path": str(index.path),
        "spec": index.params.spec,
        "params": index.params.to_dict(),
        "ntotal": index.ntotal,
        "is_trained": index.is_trained,
        "shard_size": index.shard_size,
        "nshards": index.nshards,
        "shard_counts": index.shard_counts,
        "pending_removals": index.pending_removals,
        "disk_bytes": sum(p.stat().st_size for p in files if p.is_file()),
        "build": index.build_state,
    }


# --- build -----------------------------------------------------------------------------------
def _build_params(args: argparse.Namespace) -> tuple[Any, str | None]:
    """The codec to build: ``--spec``, the legacy ``--nlist/--M`` fields, or auto_spec's choice
    (with its reason)."""
    import sys

    from ..index import IVFPQParams, auto_spec, parse_spec
    from ..io import open_vectors

    src = open_vectors(args.source, column=args.column)
    d = args.d or src.d
    fields = args.nlist is not None or args.M is not None
    try:
        if args.spec is not None:
            if fields or args.nbits is not None or args.store_vectors is not None:
                raise UsageError(
                    "--spec names the whole codec: leave out --nlist, --M, --nbits, --store-vectors"
                )
            return parse_spec(args.spec, d, metric=args.metric), None
        if fields:
            if args.nlist is None or args.M is None:
                raise UsageError("--nlist and --M go together (or pass --spec, or neither)")
            store: Any = args.store_vectors or "float16"
            return IVFPQParams(
                d,
                args.nlist,
                args.M,
                nbits=args.nbits or 8,
                metric=args.metric,
                store_vectors=None if store == "none" else store,
            ), None
        if args.nbits is not None or args.store_vectors is not None:
            raise UsageError("--nbits and --store-vectors go with --nlist and --M")
        assert src.n is not None  # a file's size is known
        choice = auto_spec(src.n, d, memory_budget=args.memory_budget, metric=args.metric)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from e
    print(f"fastface build: chose {choice.spec}: {choice.reason}", file=sys.stderr)
    return choice.params, choice.reason


def _build(args: argparse.Namespace) -> int:
    from ..index import IVFPQParams, ShardedIndex

    params, reason = _build_params(args)
    kw = {"shard_size": args.shard_size, "chunk_size": args.chunk_size, "column": args.column}
    if args.ray is not None:  # a Ray Data job: the same files as the local build
        from ..distributed import build
        from ._ray import start

        if args.commit_every is not None:
            raise UsageError("--commit-every is for local builds: a --ray build commits once")
        if not isinstance(params, IVFPQParams):
            raise UsageError(f"--ray builds IVF-PQ indexes; {params.spec} is flat: leave out --ray")
        start(args.ray)
        kw.update(workers=args.workers)
        index = build(args.source, args.index, params, train_size=args.train_size, **kw)
    else:
        index = ShardedIndex.build(
            args.source,
            args.index,
            params,
            commit_every=args.commit_every,
            train_size=args.train_size,
            progress=progress_wanted(args),
            **kw,
        )
    with index:
        out = summary(index)
        if reason is not None:
            out["auto_spec"] = reason
        write_json(out)
    return 0


# --- search ----------------------------------------------------------------------------------
def _results(D: np.ndarray, I: np.ndarray) -> list[dict[str, Any]]:
    """One record per query; padded entries (id -1) are left out, so every score is finite."""
    rows = []
    for q, (d_row, i_row) in enumerate(zip(D.tolist(), I.tolist(), strict=True)):
        keep = [j for j, i in enumerate(i_row) if i >= 0]
        rows.append(
            {"query": q, "ids": [i_row[j] for j in keep], "scores": [d_row[j] for j in keep]}
        )
    return rows


def _search(args: argparse.Namespace) -> int:
    from ..index import ShardedIndex

    xq = _read_vectors(args.queries, args.column)
    with ShardedIndex.open(args.index, mmap=args.mmap) as index:
        nlist = index.params.nlist
        if args.nprobe is not None and args.nprobe > nlist:
            raise UsageError(f"--nprobe {args.nprobe} exceeds --nlist {nlist} of this index")
        nprobe = args.nprobe if args.nprobe is not None else min(16, nlist)
        D, I = index.search(xq, args.k, nprobe=nprobe, rerank=args.rerank)
        metric = index.params.metric
    params = {
        "index": str(args.index),
        "queries": str(args.queries),
        "k": args.k,
        "nprobe": nprobe,
        "rerank": args.rerank,
        "metric": metric,
        "scores": "exact" if args.rerank else "approximate (PQ)",
    }
    out: Path | None = args.output
    if out is not None and out.suffix == ".npz":
        np.savez(out, D=D, I=I)
        write_json({"params": params, "output": str(out), "nq": int(I.shape[0])})
        return 0
    if out is not None and out.suffix == ".jsonl":
        with open(out, "w") as f:
            write_jsonl(_results(D, I), f)
        write_json({"params": params, "output": str(out), "nq": int(I.shape[0])})
        return 0
    payload = {"params": params, "results": _results(D, I)}
    if out is None:
        write_json(payload)
    else:
        with open(out, "w") as f:
            write_json(payload, f)
    return 0


# --- info ------------------------------------------------------------------------------------
def _info(args: argparse.Namespace) -> int:
    from ..index import ShardedIndex

    with ShardedIndex.open(args.index) as index:  # verifies every checksum
        info = summary(index)
    info["checksums"] = "verified"
    write_json(info)
    return 0


# --- index add | remove | compact -----------------------------------------------------------
def _read_ids(path: Path | None, given: list[int] | None) -> np.ndarray:
    if path is None:
        return np.asarray(given or [], dtype=np.int64)
    arr = np.load(path, allow_pickle=False)
    if arr.dtype.kind not in "iu":
        raise UsageError(f"--ids-file {path}: expected integer ids, got {arr.dtype}")
    return arr.reshape(-1)


def _add(args: argparse.Namespace) -> int:
    from ..index import ShardedIndex

    x = _read_vectors(args.vectors, args.column)
    ids = _read_ids(args.ids_file, None) if args.ids_file is not None else None
    if ids is not None and ids.size != x.shape[0]:
        raise UsageError(
            f"--ids-file {args.ids_file}: holds {ids.size} ids for {x.shape[0]} vectors"
        )
    with ShardedIndex.open(args.index, mode="a") as index:
        added = index.add(x, ids)
        out = {
            "added": int(added.size),
            "first_id": int(added.min()) if added.size else None,
            "last_id": int(added.max()) if added.size else None,
            "ntotal": index.ntotal,
        }
    write_json(out)
    return 0


def _remove(args: argparse.Namespace) -> int:
    from ..index import ShardedIndex

    if (args.ids_file is None) == (not args.ids):
        raise UsageError("pass ids as arguments or with --ids-file, not both or neither")
    ids = _read_ids(args.ids_file, args.ids)
    with ShardedIndex.open(args.index, mode="a") as index:
        removed = index.remove(ids)
        out = {
            "asked": int(ids.size),
            "removed": removed,
            "ntotal": index.ntotal,
            "pending_removals": index.pending_removals,
        }
    write_json(out)
    return 0


def _compact(args: argparse.Namespace) -> int:
    from ..index import ShardedIndex

    with ShardedIndex.open(args.index, mode="a") as index:
        out = dict(index.compact())
        out["ntotal"] = index.ntotal
    write_json(out)
    return 0


# --- dedup -----------------------------------------------------------------------------------
def _dedup(args: argparse.Namespace) -> int:
    import sys

    from .. import dedup
    from ..index import ShardedIndex

    if not -1.0 < args.threshold <= 1.0:
        raise UsageError(f"--threshold {args.threshold}: a cosine must be in (-1, 1]")
    with ShardedIndex.open(args.index) as index:
        if args.nprobe > index.params.nlist:
            raise UsageError(
                f"--nprobe {args.nprobe} exceeds --nlist {index.params.nlist} of this index"
            )
        result = dedup(index, args.threshold, nprobe=args.nprobe, progress=progress_wanted(args))
    groups = (
        {"representative": int(g[0]), "size": int(g.size), "ids": g}
        for g in result.groups(min_size=args.min_size)
    )
    if args.output is None:
        write_jsonl(groups)
    else:
        with open(args.output, "w") as f:
            write_jsonl(groups, f)
    multi = int((result.sizes >= args.min_size).sum())
    print(
        f"fastface dedup: {result.ids.size} vectors, {multi} groups of >= {args.min_size} "
        f"at cosine >= {args.threshold} (nprobe {args.nprobe}), {result.pairs.shape[0]} pairs",
        file=sys.stderr,
    )
    return 0


# --- wiring ----------------------------------------------------------------------------------
def register(sub: Any) -> None:
    p = sub.add_parser(
        "build",
        help="build a sharded index directory from a vector file (resumable)",
        description="Stream vectors from .npy/.fvecs/.parquet into a sharded index.\n"
        "The codec is an index spec (--spec 'OPQ32,IVF65536_HNSW32,PQ32,F16', 'Flat', ...;\n"
        "see docs/scaling.md), or --nlist/--M fields; with neither, auto_spec chooses\n"
        "from the file's size and --memory-budget and says what it chose and why (stderr).\n"
        "Vectors get their row numbers as ids. Run the same command again to resume an\n"
        "interrupted build. Prints the index summary as JSON.",
        formatter_class=Formatter,
    )
    p.add_argument("source", type=input_file(VECTOR_SUFFIXES), help="vector file")
    p.add_argument("index", type=Path, help="index directory to create (or resume)")
    p.add_argument(
        "--spec",
        help="index spec naming the codec, e.g. 'IVF4096,PQ32,F16' (default: chosen by auto_spec)",
    )
    p.add_argument(
        "--memory-budget",
        help="RAM for the searchable index when auto_spec chooses, e.g. 8G (default: no limit)",
    )
    p.add_argument("--nlist", type=positive_int, help="inverted lists (instead of --spec)")
    p.add_argument("--M", type=positive_int, help="PQ sub-quantizers, divides d (with --nlist)")
    p.add_argument(
        "--nbits", type=int, choices=[8, 4], help="bits per code, 4: fast-scan (default 8)"
    )
    p.add_argument("--metric", default="ip", choices=["ip", "l2"], help="similarity")
    p.add_argument(
        "--store-vectors",
        choices=["float16", "float32", "none"],
        help="raw vectors kept on disk for exact re-ranking and dedup (default float16)",
    )
    p.add_argument("--d", type=positive_int, help="dimension (default: read from the file)")
    p.add_argument(
        "--shard-size", type=positive_int, default=1_000_000, help="vectors per sealed shard"
    )
    p.add_argument("--chunk-size", type=positive_int, default=100_000, help="rows per batch")
    p.add_argument(
        "--commit-every",
        type=positive_int,
        help="rows between commits (default: every chunk; a commit also follows every sealed "
        "shard)",
    )
    p.add_argument(
        "--train-size",
        type=positive_int,
        help="training sample (default: 256 * nlist, 64 * nlist past 16384 lists)",
    )
    p.add_argument("--column", help="parquet column holding the vectors (default: the first)")
    add_ray_option(p, "encode and write the shards in parallel")
    p.add_argument("--workers", type=positive_int, help="with --ray: workers (default: CPUs)")
    add_progress_flags(p)
    p.set_defaults(func=_build)

    p = sub.add_parser(
        "search",
        help="search an index with a file of queries",
        description="Search an index directory. Output: one JSON document with the parameters\n"
        "used and, per query, the ids and scores found (padded entries left out); or\n"
        "-o FILE.jsonl (one line per query), or -o FILE.npz (arrays D and I, padded with\n"
        "-1 and -inf/+inf as the Python API returns them).",
        formatter_class=Formatter,
    )
    p.add_argument("index", type=_index_dir, help="index directory")
    p.add_argument("queries", type=input_file(VECTOR_SUFFIXES), help="query vectors")
    p.add_argument("-k", type=positive_int, default=10, help="results per query")
    p.add_argument(
        "--nprobe", type=positive_int, help="lists scanned per query (default: min(16, nlist))"
    )
    p.add_argument(
        "--rerank",
        type=positive_int,
        help="re-score k * RERANK candidates exactly from the stored vectors (exact scores)",
    )
    p.add_argument(
        "-o", "--output", type=output_file((".json", ".jsonl", ".npz")), help="result file"
    )
    p.add_argument("--column", help="parquet column holding the queries")
    p.add_argument("--mmap", action="store_true", help="memory-map the shards instead of loading")
    p.set_defaults(func=_search)

    p = sub.add_parser(
        "info",
        help="summary of an index directory (verifies checksums)",
        description="Print parameters, counts, shards and disk use of an index directory as\n"
        "JSON, after verifying every file against the manifest.",
        formatter_class=Formatter,
    )
    p.add_argument("index", type=_index_dir, help="index directory")
    p.set_defaults(func=_info)

    p = sub.add_parser(
        "index",
        help="change an index: add vectors, remove ids, compact",
        description="Change an existing index directory; each command commits before it exits.",
        formatter_class=Formatter,
    )
    isub = p.add_subparsers(dest="index_command", metavar="COMMAND", required=True)
    c = isub.add_parser(
        "add",
        help="add vectors (ids: consecutive after the largest, or --ids-file)",
        description="Add the vectors of a file to the index and commit.",
        formatter_class=Formatter,
    )
    c.add_argument("index", type=_index_dir, help="index directory")
    c.add_argument("vectors", type=input_file(VECTOR_SUFFIXES), help="vectors to add")
    c.add_argument("--ids-file", type=input_file((".npy",)), help="int64 .npy, one id per vector")
    c.add_argument("--column", help="parquet column holding the vectors")
    c.set_defaults(func=_add)
    c = isub.add_parser(
        "remove",
        help="remove ids (invisible at once; bytes dropped by compact)",
        description="Remove vectors by id and commit; unknown ids are ignored.",
        formatter_class=Formatter,
    )
    c.add_argument("index", type=_index_dir, help="index directory")
    c.add_argument("ids", type=int, nargs="*", help="ids to remove")
    c.add_argument("--ids-file", type=input_file((".npy",)), help="int64 .npy of ids to remove")
    c.set_defaults(func=_remove)
    c = isub.add_parser(
        "compact",
        help="rewrite shards without removed vectors",
        description="Rewrite every shard that holds removed vectors, without them.",
        formatter_class=Formatter,
    )
    c.add_argument("index", type=_index_dir, help="index directory")
    c.set_defaults(func=_compact)

    p = sub.add_parser(
        "dedup",
        help="near-duplicate groups of an index (JSON lines)",
        description="Groups of vectors whose cosine reaches --threshold (transitively), from the\n"
        "index's stored vectors; one JSON line per group: representative (lowest id),\n"
        "size, ids. A summary goes to stderr.",
        formatter_class=Formatter,
    )
    p.add_argument("index", type=_index_dir, help="index directory (with stored vectors)")
    p.add_argument("--threshold", type=float, required=True, help="cosine, e.g. 0.95")
    p.add_argument("--nprobe", type=positive_int, default=8, help="lists probed per vector")
    p.add_argument("--min-size", type=positive_int, default=2, help="smallest group listed")
    p.add_argument("-o", "--output", type=output_file((".jsonl",)), help="write groups here")
    add_progress_flags(p)
    p.set_defaults(func=_dedup)
