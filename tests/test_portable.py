"""The portable build: one module, SIMD kernels dispatched by CPU level, equal bytes on all."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastface

SCRIPT = Path(__file__).with_name("portable_align_hash.py")
LEVELS = {"x86-64-v2": "v2", "x86-64-v3": "v3", "x86-64-v4": "v4"}


@pytest.fixture(scope="module")
def saved_index(tmp_path_factory) -> Path:
    """An 8-bit index, queries and their coarse assignment, saved once for every child."""
    import numpy as np

    from fastface import IVFPQIndex, IVFPQParams
    from fastface.datasets import SyntheticFaces

    where = tmp_path_factory.mktemp("portable")
    data = SyntheticFaces(n_identities=200, per_identity=10, d=64, seed=3)
    xb, _ = data.vectors()
    xb[1000:1100] = xb[:100]  # exact duplicates: ties the scan must order by id
    q, _ = data.queries(50)
    index = IVFPQIndex(IVFPQParams(64, 16, 8, store_vectors=None))
    index.train(xb)
    index.add(xb)
    index.save(where / "shard.faiss")
    spilled = IVFPQIndex(index.codec.with_soar(1.0))  # every vector in two lists
    spilled.add(xb)
    spilled.save(where / "soar.faiss")
    Dq, Iq = index.assign(q, 8)
    np.save(where / "q.npy", q)
    np.save(where / "Dq.npy", Dq)
    np.save(where / "Iq.npy", Iq)
    return where


def _run(
    env_isa: str | None = None, prefix: tuple[str, ...] = (), index: Path | None = None
) -> tuple[str, str]:
    env = dict(os.environ)
    env.pop("FASTFACE_ISA", None)
    if env_isa is not None:
        env["FASTFACE_ISA"] = env_isa
    out = subprocess.run(
        [*prefix, sys.executable, str(SCRIPT), *([str(index)] if index else [])],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout.split()
    return out[-2], out[-1]


def _portable() -> bool:
    return "," in fastface.build_info()["simd_variants"]


def test_build_info_says_what_was_compiled_and_dispatched() -> None:
    info = fastface.build_info()
    variants = info["simd_variants"].split(",")
    assert info["simd_selected"] in variants
    if _portable():
        assert "-march=native" not in info["cxx_flags"]
        assert "-march=x86-64-v2" in info["cxx_flags"]
        assert variants == ["x86-64-v2", "x86-64-v3", "x86-64-v4"]


@pytest.mark.skipif(not _portable(), reason="a FASTFACE_NATIVE_ARCH=ON build has one variant")
def test_every_variant_this_cpu_runs_gives_the_same_bytes(saved_index: Path) -> None:
    best, ref = _run(index=saved_index)
    assert best == fastface.build_info()["simd_selected"]
    runnable = list(LEVELS)[: list(LEVELS).index(best) + 1]
    assert len(runnable) >= 1
    for level in runnable:
        got_level, digest = _run(LEVELS[level], index=saved_index)
        assert got_level == level
        assert digest == ref, f"{level} differs from {best}"


@pytest.mark.skipif(not _portable(), reason="a FASTFACE_NATIVE_ARCH=ON build has one variant")
@pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="qemu-user is not installed")
@pytest.mark.parametrize(("cpu", "level"), [("Nehalem", "x86-64-v2"), ("Haswell", "x86-64-v3")])
def test_runs_on_an_older_cpu_without_avx512(cpu: str, level: str, saved_index: Path) -> None:
    """Emulated older CPUs (no AVX-512; Nehalem has no AVX at all) pick their level."""
    _, ref = _run(index=saved_index)
    got_level, digest = _run(prefix=("qemu-x86_64", "-cpu", cpu), index=saved_index)
    assert got_level == level
    assert digest == ref
