"""Open time and memory of index directories, each open in a fresh process.

For every directory and mode (in memory, memory-mapped) a child process
opens the index, runs one search of 200 queries, and reports the wall time
of the open, the growth of anonymous memory (heap: what the index holds),
of file-backed resident memory (mapped pages) and of the peak RSS. Rounds
are interleaved over directories and modes; medians are reported.

``--python`` runs the children with another interpreter, e.g. a virtual
environment with an older fastface, to compare versions on the same files
(``--label`` names the run in the JSON; runs with other labels are kept).

Usage::

    python bench/open.py /tmp/idx-1M-s1 /tmp/idx-1M-s4 --label after
    python bench/open.py /tmp/idx-1M-s1 /tmp/idx-1M-s4 --label before --python /tmp/old/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from fastface._bench.common import bench_meta, write_results

CHILD = textwrap.dedent(
    """
    import json, sys, time

    def status():
        out = {}
        for line in open("/proc/self/status"):
            k, v = line.split(":", 1)
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) / 1024  # MiB
        return out

    path, mmap = sys.argv[1], sys.argv[2] == "1"
    import numpy as np
    import fastface
    from fastface import ShardedIndex
    import faiss  # noqa: F401  (opening loads it anyway)

    before = status()
    t = time.perf_counter()
    index = ShardedIndex.open(path, mmap=mmap)
    t_open = time.perf_counter() - t
    after = status()
    q = np.random.default_rng(0).standard_normal((200, index.d)).astype(np.float32)
    t = time.perf_counter()
    index.search(q, 10, nprobe=16)
    t_search = time.perf_counter() - t
    end = status()
    print(json.dumps({
        "open_s": t_open,
        "first_search_s": t_search,
        "anon_mib": end["RssAnon"] - before["RssAnon"],
        "file_mib": end["RssFile"] - before["RssFile"],
        "peak_rss_growth_mib": end["VmHWM"] - before["VmRSS"],
        "anon_mib_after_open": after["RssAnon"] - before["RssAnon"],
        "fastface": getattr(fastface, "__version__", "?"),
    }))
    """
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--label", default="current")
    p.add_argument("--python", default=sys.executable, help="interpreter for the children")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench/results/index-open.json"))
    args = p.parse_args(argv)
    samples: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for d in args.dirs:
            for mmap in (False, True):
                proc = subprocess.run(
                    [args.python, "-c", CHILD, str(d), "1" if mmap else "0"],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                samples.setdefault((str(d), mmap), []).append(
                    json.loads(proc.stdout.strip().splitlines()[-1])
                )
    rows = []
    for (d, mmap), runs in samples.items():
        row: dict[str, Any] = {"dir": d, "mmap": mmap, "runs": len(runs)}
        for key in ("open_s", "first_search_s", "anon_mib", "file_mib", "peak_rss_growth_mib"):
            row[key] = float(np.median([r[key] for r in runs]))
        rows.append(row)
        print(
            f"{args.label:>8} {Path(d).name:>20} {'mmap' if mmap else 'RAM':>4}  "
            f"open {row['open_s']:.3f} s  search {row['first_search_s']:.3f} s  "
            f"anon {row['anon_mib']:.0f} MiB  file {row['file_mib']:.0f} MiB  "
            f"peak +{row['peak_rss_growth_mib']:.0f} MiB"
        )
    payload: dict[str, Any] = {}
    if args.out.exists():
        payload = json.loads(args.out.read_text())
    payload.setdefault("runs", {})[args.label] = {
        "python": args.python,
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    payload["meta"] = bench_meta()
    write_results(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
