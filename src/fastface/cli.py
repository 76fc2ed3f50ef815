"""The ``fastface`` command: benchmarks, building, searching and inspecting indexes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main"]


def _cmd_bench_ann(args: argparse.Namespace) -> int:
    from ._bench import ann

    ann.run(args)
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from .index import IVFPQParams, ShardedIndex

    params = IVFPQParams(
        args.d or _source_d(args.source, args.column),
        args.nlist,
        args.M,
        nbits=args.nbits,
        metric=args.metric,
    )
    index = ShardedIndex.build(
        args.source,
        args.index,
        params,
        shard_size=args.shard_size,
        chunk_size=args.chunk_size,
        train_size=args.train_size,
        column=args.column,
        progress=not args.quiet,
    )
    with index:
        print(json.dumps(_summary(index), indent=2))
    return 0


def _source_d(source: Path, column: str | None) -> int:
    from .datasets import open_vectors

    return open_vectors(source, column=column).d


def _cmd_search(args: argparse.Namespace) -> int:
    from .datasets import open_vectors
    from .index import ShardedIndex

    xq = open_vectors(args.queries, column=args.column).read_all()
    with ShardedIndex.open(args.index, mmap=args.mmap) as index:
        D, I = index.search(xq, args.k, nprobe=args.nprobe)
    out: Path | None = args.output
    if out is None or out.suffix == ".json":
        payload = {
            "k": args.k,
            "nprobe": args.nprobe,
            "metric": index.params.metric,
            "D": [[_json_float(v) for v in row] for row in D.tolist()],
            "I": I.tolist(),
        }
        text = json.dumps(payload)
        if out is None:
            print(text)
        else:
            out.write_text(text + "\n")
    elif out.suffix == ".npz":
        np.savez(out, D=D, I=I)
    else:
        raise SystemExit(f"--output must end in .json or .npz, got {out}")
    return 0


def _json_float(v: float) -> float | str:
    return v if np.isfinite(v) else ("-inf" if v < 0 else "inf")


def _summary(index: Any) -> dict[str, Any]:
    files = sorted(index.path.iterdir())
    return {
        "path": str(index.path),
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


def _cmd_info(args: argparse.Namespace) -> int:
    from .index import ShardedIndex

    with ShardedIndex.open(args.index) as index:  # verifies every checksum
        info = _summary(index)
    info["checksums"] = "verified"
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="fastface",
        description="Face search at scale: sharded IVF-PQ indexes, benchmarks and data-subject "
        "rights.",
    )
    parser.add_argument("--version", action="version", version=f"fastface {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    bench = sub.add_parser("bench", help="run a benchmark suite (prints a table, writes JSON)")
    bench_sub = bench.add_subparsers(dest="suite", metavar="SUITE", required=True)
    from ._bench import ann

    p_ann = bench_sub.add_parser(
        "ann",
        help="recall and QPS of fastface IVF-PQ vs FAISS IndexIVFPQ and exact IndexFlatIP",
        description=ann.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ann.add_arguments(p_ann)
    p_ann.set_defaults(func=_cmd_bench_ann)

    p_build = sub.add_parser(
        "build",
        help="build a sharded index directory from a vector file (resumable)",
        description="Stream vectors from .npy/.fvecs/.parquet into a sharded IVF-PQ index. "
        "Vectors get their row numbers as ids. Run the same command again to resume an "
        "interrupted build.",
    )
    p_build.add_argument("source", type=Path, help="vector file: .npy, .fvecs or .parquet")
    p_build.add_argument("index", type=Path, help="index directory to create")
    p_build.add_argument("--nlist", type=int, required=True, help="inverted lists")
    p_build.add_argument("--M", type=int, required=True, help="PQ sub-quantizers (divides d)")
    p_build.add_argument(
        "--nbits", type=int, default=8, choices=[8, 4], help="bits per code (4 = fast-scan)"
    )
    p_build.add_argument("--metric", default="ip", choices=["ip", "l2"])
    p_build.add_argument("--d", type=int, help="dimension (default: read from the file)")
    p_build.add_argument(
        "--shard-size", type=int, default=1_000_000, help="vectors per sealed shard"
    )
    p_build.add_argument("--chunk-size", type=int, default=100_000, help="rows per commit")
    p_build.add_argument("--train-size", type=int, help="training sample (default 256*nlist)")
    p_build.add_argument("--column", help="parquet column holding the vectors")
    p_build.add_argument("--quiet", action="store_true", help="no progress bar")
    p_build.set_defaults(func=_cmd_build)

    p_search = sub.add_parser(
        "search",
        help="search an index with a query file",
        description="Search an index directory; results go to stdout or --output as JSON "
        "(D, I lists) or .npz (arrays D and I).",
    )
    p_search.add_argument("index", type=Path)
    p_search.add_argument("queries", type=Path, help="query vectors: .npy, .fvecs or .parquet")
    p_search.add_argument("-k", type=int, default=10)
    p_search.add_argument("--nprobe", type=int, default=None)
    p_search.add_argument("--output", "-o", type=Path, help="result file (.json or .npz)")
    p_search.add_argument("--column", help="parquet column holding the queries")
    p_search.add_argument("--mmap", action="store_true", help="memory-map the shards")
    p_search.set_defaults(func=_cmd_search)

    p_info = sub.add_parser(
        "info",
        help="summary of an index directory (verifies checksums)",
        description="Print parameters, counts, shards and disk use of an index directory as "
        "JSON, after verifying every file against the manifest.",
    )
    p_info.add_argument("index", type=Path)
    p_info.set_defaults(func=_cmd_info)

    from . import cli_gallery

    cli_gallery.register(sub)
    from . import cli_embed

    cli_embed.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import FastfaceError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (FastfaceError, ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        print(f"fastface: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
