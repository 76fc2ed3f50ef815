"""CUDA kernels against their CPU twins (the emulation, fastface's CPU paths, FAISS).

Marked ``gpu``: skipped only where no CUDA device is present (with one, a
missing CuPy or CUDA module fails). ``bench/gpu_check.sh`` runs them on the measurement machine.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

import fastface
from fastface import IVFPQIndex, IVFPQParams
from fastface.datasets import SyntheticFaces
from fastface.faces import align, template
from fastface.gpu import align as gpu_align
from fastface.gpu import encode, from_cpu
from fastface.gpu._adapter import _codec_of, codec_arrays


def _gpu_present() -> bool:
    """A CUDA device is visible: to the CUDA module if built, else to nvidia-smi."""
    try:
        from fastface import _cuda

        return bool(_cuda.device_count() > 0)
    except ImportError:
        if shutil.which("nvidia-smi") is None:
            return False
        proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        return proc.returncode == 0 and "GPU" in proc.stdout


# Skipped only where no GPU is present: with a GPU, a missing CuPy or CUDA module fails.
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _gpu_present(), reason="no CUDA device present"),
]


def test_gpu_path_available() -> None:
    from fastface.gpu._backend import _cuda_status

    ok, why = _cuda_status()
    assert ok, why
    info = fastface.build_info()
    assert info["cuda_built"] and info["cuda_device_count"] > 0


@pytest.fixture(scope="module")
def cp():  # type: ignore[no-untyped-def]
    import cupy

    return cupy


def _faces(seed: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(250, 250), (300, 180), (96, 140)]
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    lm, idx = [], []
    for i, (h, w) in enumerate(shapes):
        for scale, angle in [(1.4, 0.2), (0.8, -0.7), (2.5, 3.0)]:
            c, s = np.cos(angle), np.sin(angle)
            pts = (template("arcface") - 56) @ np.array([[c, -s], [s, c]]) * scale
            lm.append(pts + np.array([w / 2, h / 2]) + rng.normal(0, 2, pts.shape))
            idx.append(i)
    return imgs, np.array(lm), np.array(idx)


@pytest.mark.parametrize("kernel", ["float", "fixed"])
@pytest.mark.parametrize("output", ["uint8", "float32_nchw"])
def test_align_cuda_equals_emulation_and_cpu(kernel: str, output: str, cp) -> None:  # type: ignore[no-untyped-def]
    imgs, lm, idx = _faces(0)
    kw = {"image_index": idx, "kernel": kernel, "output": output}
    cpu, _ = align(imgs, lm, **kw)  # type: ignore[arg-type]
    emu, _ = gpu_align(imgs, lm, device="emulate", **kw)  # type: ignore[arg-type]
    dev, _ = gpu_align([cp.asarray(im) for im in imgs], lm, device="cuda", **kw)  # type: ignore[arg-type]
    assert isinstance(dev, cp.ndarray)
    host, _ = align(imgs, lm, device="cuda", **kw)  # type: ignore[arg-type]
    assert isinstance(host, np.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(dev), emu)
    np.testing.assert_array_equal(host, emu)
    step = 1.0 if output == "uint8" else 1 / 127.5
    assert np.abs(host.astype(np.float64) - cpu).max() <= step + 1e-6


def test_align_cuda_batch_torch_and_stream(cp) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, (4, 250, 250, 3), dtype=np.uint8)
    lm = template("arcface")[None].repeat(4, 0) * 1.5 + 20
    want, _ = align(batch, lm)
    stream = cp.cuda.Stream(non_blocking=True)
    got, _ = gpu_align(cp.asarray(batch), lm, device="cuda", stream=stream)
    stream.synchronize()
    np.testing.assert_array_equal(cp.asnumpy(got), want)
    torch = pytest.importorskip("torch")
    t, _ = gpu_align(torch.as_tensor(batch, device="cuda"), lm, device="cuda")
    assert isinstance(t, torch.Tensor) and t.is_cuda
    np.testing.assert_array_equal(t.cpu().numpy(), want)


@pytest.fixture(scope="module")
def gallery() -> tuple[np.ndarray, np.ndarray]:
    data = SyntheticFaces(n_identities=1000, per_identity=20, d=64, seed=0, n_groups=20)
    xb, _ = data.vectors()
    xq, _ = data.queries(300, seed=3)
    return xb, xq


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("nbits", [8, 4])
def test_ivfpq_cuda_equals_emulation(gallery, metric: str, nbits: int, cp) -> None:  # type: ignore[no-untyped-def]
    xb, xq = gallery
    cpu = IVFPQIndex(IVFPQParams(64, 64, 16, nbits=nbits, metric=metric))  # type: ignore[arg-type]
    cpu.train(xb)
    cpu.add(xb)
    g = from_cpu(cpu, device="cuda")
    e = from_cpu(cpu, device="emulate")
    for lut in ("float32", "float16"):
        for nsplit in (1, 4):
            D, I = g.search(xq, 10, nprobe=8, lut=lut, nsplit=nsplit)  # type: ignore[arg-type]
            De, Ie = e.search(xq, 10, nprobe=8, lut=lut, nsplit=nsplit)  # type: ignore[arg-type]
            np.testing.assert_allclose(D, De, atol=1e-4, rtol=0)
            assert (Ie == I).mean() > 0.99
    if nbits == 8:
        Dc, Ic = cpu.search(xq, 10, nprobe=8)
        D, I = g.search(xq, 10, nprobe=8)
        np.testing.assert_allclose(D, Dc, atol=1e-4, rtol=0)
        assert (Ic == I).mean() > 0.99
    # device arrays in, device arrays out
    D, I = g.search(cp.asarray(xq), 10, nprobe=8)
    assert isinstance(D, cp.ndarray) and isinstance(I, cp.ndarray)


@pytest.mark.parametrize("vectors_on", ["device", "host"])
def test_rerank_cuda_equals_cpu(gallery, vectors_on: str, cp) -> None:  # type: ignore[no-untyped-def]
    xb, xq = gallery
    cpu = IVFPQIndex(IVFPQParams(64, 64, 16))
    cpu.train(xb)
    cpu.add(xb)
    g = from_cpu(cpu, device="cuda", vectors_on=vectors_on)
    D, I = g.search(xq, 10, nprobe=8, rerank=8)
    Dc, Ic = cpu.search(xq, 10, nprobe=8, rerank=8)
    np.testing.assert_allclose(D, Dc, atol=1e-5, rtol=0)
    assert (Ic == I).mean() > 0.995


def test_encode_cuda_equals_emulation(gallery, cp) -> None:  # type: ignore[no-untyped-def]
    xb, _ = gallery
    cpu = IVFPQIndex(IVFPQParams(64, 64, 16))
    cpu.train(xb)
    c = codec_arrays(_codec_of(cpu))
    kw = {"metric": "ip", "by_residual": c["by_residual"], "nbits": 8}
    lists, codes = encode(cp.asarray(xb), c["centroids"], c["codebook"], device="cuda", **kw)  # type: ignore[arg-type]
    le, ce = encode(xb, c["centroids"], c["codebook"], device="emulate", **kw)  # type: ignore[arg-type]
    assert (cp.asnumpy(lists) == le).mean() > 0.999
    assert (cp.asnumpy(codes) == ce).all(axis=1).mean() > 0.99
