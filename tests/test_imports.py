"""`import fastface` is light: no Numba, FAISS or optional dependency, and fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys

HEAVY = ["numba", "faiss", "onnxruntime", "cv2", "pyarrow", "tqdm", "matplotlib", "psutil"]


def _run(code: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=120
    )


def test_import_is_light_and_fast() -> None:
    code = (
        f"import json, sys, fastface; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    proc = _run(code, "-X", "importtime")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    # -X importtime: "import time: self [us] | cumulative | name"; the package's own line
    line = [x for x in proc.stderr.splitlines() if x.rstrip().endswith("| fastface")]
    cumulative_us = int(line[-1].split("|")[1])
    assert cumulative_us < 300_000, f"import fastface took {cumulative_us / 1e3:.0f} ms"


def test_names_load_on_first_use() -> None:
    code = (
        "import sys, fastface; "
        "assert 'faiss' not in sys.modules; "
        "fastface.IVFPQParams(8, 2, 2); "
        "assert 'faiss' in sys.modules and 'numba' not in sys.modules; "
        "assert fastface.__version__ and 'dedup' in dir(fastface); "
        "fastface.nothing_here"
    )
    proc = _run(code)
    assert proc.returncode == 1 and "has no attribute 'nothing_here'" in proc.stderr, proc.stderr


def test_openmp_wait_policy_default_respects_the_user() -> None:
    code = "import os, fastface; print(os.environ['OMP_WAIT_POLICY'])"
    env_default = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"},
    )
    assert env_default.stdout.strip() == "PASSIVE"
    chosen = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, OMP_WAIT_POLICY="ACTIVE"),
    )
    assert chosen.stdout.strip() == "ACTIVE"
