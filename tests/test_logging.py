"""Libraries log, never print: library calls are silent unless asked, and report through logging."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np

import fastface
from fastface.datasets import SyntheticFaces, plant_duplicates


def test_the_fastface_logger_has_a_null_handler_and_no_level_of_its_own() -> None:
    logger = logging.getLogger("fastface")
    assert any(isinstance(h, logging.NullHandler) for h in logger.handlers)
    # nothing reaches stderr through Python's last-resort handler when the app configured nothing
    code = (
        "import fastface, numpy as np\n"
        "x = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)\n"
        "x /= np.linalg.norm(x, axis=1, keepdims=True)\n"
        "fastface.dedup_vectors(np.concatenate([x, x[:5]]), 0.99)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""


def test_dedup_is_silent_by_default_and_logs_what_it_did(capfd, caplog) -> None:
    x, _ = SyntheticFaces(50, 10, 32, seed=0).vectors()
    x, _ = plant_duplicates(x, 0.05, seed=0)
    with caplog.at_level(logging.INFO, logger="fastface"):
        result = fastface.dedup_vectors(x, 0.93)
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # no progress bar unless progress=True
    [rec] = [r for r in caplog.records if r.name == "fastface.dedup"]
    assert f"{x.shape[0]} vectors" in rec.getMessage()
    assert f"{result.pairs.shape[0]} pairs" in rec.getMessage()


def test_progress_bars_are_opt_in(capfd) -> None:
    x = np.random.default_rng(1).standard_normal((200, 8)).astype(np.float32)
    fastface.dedup_vectors(x, 0.99, progress=True)
    assert "dedup" in capfd.readouterr().err
