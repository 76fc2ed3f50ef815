"""Shared benchmark helpers: timing, peak memory, metadata and result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psutil

__all__ = [
    "Interleaved",
    "PeakRSS",
    "bench_meta",
    "median_time",
    "print_table",
    "results_dir",
    "write_results",
]


def require_bench_extra() -> None:
    """Raise a clear error when the ``bench`` extra (psutil, matplotlib) is not installed."""
    import importlib

    missing = []
    for name in ("psutil", "matplotlib"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ModuleNotFoundError(
            f"the benchmarks need {', '.join(missing)}: install them with "
            "pip install 'fastface[bench]' (or pip install \".[bench]\" in a checkout)"
        )


def _psutil() -> Any:
    require_bench_extra()
    import psutil

    return psutil


def median_time(fn: Callable[[], Any], repeat: int = 5, *, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Interleaved:
    """Times functions in interleaved rounds, after one warm-up call each.

    Taking turns spreads a busy machine's slowdowns evenly over the methods
    compared, so their ratio stays fair. ``run`` returns, per key, the median
    time and the output of the last call.
    """

    def __init__(self) -> None:
        self.fns: dict[str, tuple[Callable[[], Any], int]] = {}

    def add(self, key: str, fn: Callable[[], Any], repeat: int) -> None:
        self.fns[key] = (fn, max(1, repeat))

    def run(self) -> dict[str, tuple[float, Any]]:
        outs = {k: fn() for k, (fn, _) in self.fns.items()}
        times: dict[str, list[float]] = {k: [] for k in self.fns}
        for rep in range(max((r for _, r in self.fns.values()), default=0)):
            for k, (fn, r) in self.fns.items():
                if rep < r:
                    t0 = time.perf_counter()
                    outs[k] = fn()
                    times[k].append(time.perf_counter() - t0)
        return {k: (statistics.median(times[k]), outs[k]) for k in self.fns}


class PeakRSS:
    """Samples this process's resident memory on a thread.

    ``peak`` is the peak resident set (bytes), which counts pages of
    memory-mapped files that were touched; ``peak_anon`` is the peak of
    ``rss - shared``, the process's own (anonymous) memory, which is what an
    index costs in RAM when its inputs are memory-mapped.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self.peak_anon = 0
        self.start_rss = 0
        self.start_anon = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        proc = _psutil().Process()
        while not self._stop.is_set():
            self._sample(proc)
            self._stop.wait(self.interval)

    def _sample(self, proc: psutil.Process) -> None:
        m = proc.memory_info()
        self.peak = max(self.peak, m.rss)
        self.peak_anon = max(self.peak_anon, m.rss - getattr(m, "shared", 0))

    def __enter__(self) -> PeakRSS:
        m = _psutil().Process().memory_info()
        self.start_rss = m.rss
        self.start_anon = m.rss - getattr(m, "shared", 0)
        self.peak, self.peak_anon = self.start_rss, self.start_anon
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample(_psutil().Process())


def _git_sha() -> str | None:
    """The checkout's commit: the working directory's, else the source tree's (editable)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        sha = _git_sha_at(root)
        if sha:
            return sha
    return None


def _git_sha_at(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        sha = out.stdout.strip()
        if out.returncode or not sha:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def bench_meta(command: list[str] | None = None) -> dict[str, Any]:
    """Git sha, versions, ``build_info()`` and the machine, for every result file."""
    from .._native import build_info

    vm = _psutil().virtual_memory()
    return {
        "command": " ".join(command if command is not None else sys.argv),
        "git_sha": _git_sha(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_info": build_info(),
        "load_avg_at_start": os.getloadavg(),
        "env": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ
        },
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_model": _cpu_model(),
            "logical_cores": os.cpu_count(),
            "memory_gib": round(vm.total / 2**30, 1),
            "platform": platform.platform(),
        },
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def results_dir() -> Path:
    env = os.environ.get("FASTFACE_BENCH_RESULTS")
    return Path(env) if env else Path.cwd() / "bench" / "results"


def write_results(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return path


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Print rows as a fixed-width table; ``columns`` are (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c[i].rjust(widths[i]) for i in range(len(columns))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text, flush=True)
    return text
