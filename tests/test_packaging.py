"""What a plain `pip install fastface` (no extras) gives: the library and the CLI, no bench deps."""

from __future__ import annotations

import subprocess
import sys

BLOCK = "import sys\nfor m in ('psutil', 'matplotlib'):\n    sys.modules[m] = None\n"


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=300
    )


def test_library_and_cli_work_without_the_bench_extra() -> None:
    out = _run(
        "import fastface, numpy as np\n"
        "from fastface.cli import main\n"
        "from fastface import IVFPQIndex, IVFPQParams\n"
        "x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)\n"
        "x /= np.linalg.norm(x, axis=1, keepdims=True)\n"
        "index = IVFPQIndex(IVFPQParams(8, 4, 2, nbits=4))\n"
        "index.train(x)\n"
        "index.add(x)\n"
        "print(index.search(x[:1], 1, nprobe=4, rerank=300)[1][0, 0])\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "0"
    assert "usage: fastface" in out.stdout


def test_bench_without_the_extra_says_how_to_install_it() -> None:
    out = _run(
        "from fastface.cli import main\nraise SystemExit(main(['bench', 'ann', '--quick']))\n"
    )
    assert out.returncode != 0
    assert "fastface[bench]" in out.stderr
    assert "psutil" in out.stderr
    assert "Traceback" not in out.stderr
