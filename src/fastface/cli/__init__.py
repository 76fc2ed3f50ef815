"""The ``fastface`` command line (also ``python -m fastface``).

One module per command group: :mod:`.index` (build, search, info, index
add/remove/compact, dedup), :mod:`.embed`, :mod:`.gallery`, :mod:`.bench`. The conventions
every command follows (exit codes, one-line errors, strict JSON and JSON
lines, progress bars only on a terminal) are in :mod:`._common`.
"""

from __future__ import annotations

import argparse
import sys

from ._common import EXIT_USAGE, Formatter, run, setup_logging

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from . import bench, embed, gallery, index

    parser = argparse.ArgumentParser(
        prog="fastface",
        description="Face search at scale: faces of image files to embeddings, sharded IVF-PQ\n"
        "indexes, near-duplicates, a gallery with data-subject rights, and benchmarks.\n\n"
        "Exit codes: 0 success, 1 runtime error, 2 usage error. Errors are one line on\n"
        "stderr (--debug for a traceback); results are JSON on stdout.",
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"fastface {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks instead of one-line errors"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log library messages to stderr (-v: info, -vv: debug); warnings always",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    index.register(sub)
    embed.register(sub)
    gallery.register(sub)
    bench.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``fastface`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help/--version (0) or a usage error (2)
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    setup_logging(args.verbose)
    name = " ".join(
        x
        for x in (
            args.command,
            getattr(args, "index_command", None),
            getattr(args, "gallery_command", None),
            getattr(args, "suite", None),
        )
        if x
    )
    return run(args, name)


if __name__ == "__main__":
    sys.exit(main())
