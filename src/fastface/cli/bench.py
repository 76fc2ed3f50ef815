"""``fastface bench ...``: the benchmark suites (need the ``bench`` extra)."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import Formatter

__all__ = ["register"]


def _ann(args: argparse.Namespace) -> int:
    from .._bench import ann
    from .._bench.common import require_bench_extra

    require_bench_extra()
    ann.run(args)
    return 0


def register(sub: Any) -> None:
    from .._bench import ann

    p = sub.add_parser(
        "bench",
        help="run a benchmark suite (prints a table, writes JSON)",
        description="Benchmark suites; each prints one table and writes JSON (and a PNG) under\n"
        "bench/results/. Needs the bench extra: pip install 'fastface[bench]'.",
        formatter_class=Formatter,
    )
    bsub = p.add_subparsers(dest="suite", metavar="SUITE", required=True)
    a = bsub.add_parser(
        "ann",
        help="recall and QPS of fastface IVF-PQ vs FAISS IndexIVFPQ and exact IndexFlatIP",
        description=ann.__doc__,
        formatter_class=Formatter,
    )
    ann.add_arguments(a)
    a.set_defaults(func=_ann)
