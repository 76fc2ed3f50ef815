"""What the portable build costs: align throughput of the dispatched kernels against -march=native.

The default build targets x86-64-v2 and carries the align kernels for v2, v3
(AVX2) and v4 (AVX-512), chosen by CPU at run time. This script builds a
second copy of the native module with ``FASTFACE_NATIVE_ARCH=ON`` (into
``build/bench-native``) and times, in child processes taking turns round after
round (interleaved, so the machine's drift hits every variant alike):

  * native:   the -march=native build,
  * portable: the default build, dispatched (the best level this CPU has),
  * v3, v2:   the default build forced down with ``FASTFACE_ISA``.

Each child aligns ``--faces`` crops (250 x 250 images -> 112 x 112) with the
float kernel, the fixed-point kernel and the fused float32 NCHW output, and
reports the median of ``--repeat`` calls. Prints one table (medians over
rounds, faces/s and the ratio to native) and writes bench/results/portable.json.

    python bench/portable.py [--faces 2000] [--rounds 5] [--repeat 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import fastface
from fastface._bench.common import bench_meta, print_table, write_results

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ("float", "fixed", "float32_nchw")

CHILD = r"""
import json, sys, time, statistics
sys.path.insert(0, {bench!r})
from align import make_inputs
import fastface
from fastface.faces import align
imgs, lm = make_inputs({faces})
out = {{"isa": fastface.build_info()["simd_selected"]}}
calls = {{
    "float": lambda: align(imgs, lm, threads={threads}),
    "fixed": lambda: align(imgs, lm, kernel="fixed", threads={threads}),
    "float32_nchw": lambda: align(imgs, lm, output="float32_nchw", threads={threads}),
}}
for fn in calls.values():
    fn()
times = {{k: [] for k in calls}}
for _ in range({repeat}):
    for k, fn in calls.items():
        t0 = time.perf_counter(); fn(); times[k].append(time.perf_counter() - t0)
out.update({{k: {faces} / statistics.median(v) for k, v in times.items()}})
print(json.dumps(out))
"""


def build_native(build_dir: Path) -> Path:
    """Configure and build ``_C`` with FASTFACE_NATIVE_ARCH=ON; return the shadow package root."""
    import pybind11

    cmake_dir = build_dir / "cmake"
    cmake_dir.mkdir(parents=True, exist_ok=True)
    pkg_root = build_dir / "site"
    pkg = pkg_root / "fastface"
    args = [
        "cmake",
        str(ROOT),
        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={pkg}",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        "-DCMAKE_BUILD_TYPE=Release",
        "-DFASTFACE_NATIVE_ARCH=ON",
        "-DFASTFACE_CUDA=OFF",
    ]
    if shutil.which("ninja"):
        args.append("-GNinja")
    subprocess.run(args, cwd=cmake_dir, check=True, capture_output=True)
    subprocess.run(["cmake", "--build", ".", "--parallel"], cwd=cmake_dir, check=True)
    # the Python sources of this checkout, beside the native module just built
    src = Path(fastface.__file__).resolve().parent
    for item in src.iterdir():
        if item.suffix == ".so" or item.name == "__pycache__":
            continue
        link = pkg / item.name
        if not link.exists():
            link.symlink_to(item)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    if not (pkg / f"_C{suffix}").exists():
        raise RuntimeError(f"native build produced no {pkg / ('_C' + suffix)}")
    return pkg_root


def run_child(args: argparse.Namespace, pythonpath: str | None, isa: str | None) -> dict:
    env = dict(os.environ)
    env.pop("FASTFACE_ISA", None)
    if isa:
        env["FASTFACE_ISA"] = isa
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    code = CHILD.format(
        bench=str(ROOT / "bench"), faces=args.faces, threads=args.threads, repeat=args.repeat
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faces", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    if "," not in fastface.build_info()["simd_variants"]:
        sys.exit(
            "the installed fastface is not a portable build; reinstall without "
            "FASTFACE_NATIVE_ARCH=ON"
        )
    native_root = build_native(ROOT / "build" / "bench-native")
    variants: dict[str, tuple[str | None, str | None]] = {
        "native": (str(native_root), None),
        "portable": (None, None),
        "v3": (None, "v3"),
        "v2": (None, "v2"),
    }
    samples: dict[str, list[dict]] = {k: [] for k in variants}
    keys = list(variants)
    for r in range(args.rounds):
        order = keys[r % len(keys) :] + keys[: r % len(keys)]  # rotate who goes first
        for k in order:
            samples[k].append(run_child(args, *variants[k]))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    rows: list[dict[str, Any]] = []
    native = {kern: statistics.median(s[kern] for s in samples["native"]) for kern in KERNELS}
    for k in keys:
        row: dict[str, Any] = {"variant": k, "isa": samples[k][0]["isa"]}
        for kern in KERNELS:
            v = statistics.median(s[kern] for s in samples[k])
            row[f"{kern}_per_s"] = v
            row[f"{kern}_vs_native"] = v / native[kern]
        rows.append(row)
    cols = [("variant", "variant", "s"), ("isa", "isa", "s")]
    for kern in KERNELS:
        cols += [(f"{kern}_per_s", f"{kern} faces/s", ",.0f"), (f"{kern}_vs_native", "x", ".3f")]
    print_table(rows, cols)
    portable = next(r for r in rows if r["variant"] == "portable")
    payload = {
        "meta": bench_meta([Path(sys.executable).name, *sys.argv]),
        "params": vars(args),
        "statistic": "median over rounds of each child's median over --repeat calls",
        "summary": {
            f"portable_vs_native_{kern}": portable[f"{kern}_vs_native"] for kern in KERNELS
        },
        "rows": rows,
        "samples": samples,
    }
    path = write_results(ROOT / "bench" / "results" / "portable.json", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
