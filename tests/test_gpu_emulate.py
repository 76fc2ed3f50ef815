"""The GPU kernels' per-thread code, run on the CPU (``device="emulate"``), against twins.

``fastface._cuda_emu`` is compiled from the same headers as the CUDA kernels
and runs every block of the grid sequentially; the Python driver is the one
the GPU path runs. Twins: ``faces.align`` (CPU warp), FAISS, NumPy.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from fastface import IVFPQIndex, IVFPQParams, ShardedIndex
from fastface.datasets import SyntheticFaces
from fastface.faces import align, template
from fastface.gpu import GpuIVFPQ, add_encoded, encode, from_cpu, get_backend
from fastface.gpu import align as gpu_align
from fastface.gpu._adapter import _codec_of, codec_arrays, list_arrays

EMU = "emulate"


# --- alignment ------------------------------------------------------------------------------
def _faces(rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    shapes = [(250, 250), (300, 180), (96, 140), (250, 250)]
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    base = template("arcface")
    lm, idx = [], []
    for i, (h, w) in enumerate(shapes):
        for scale, shift, angle in [(1.4, 15.0, 0.2), (0.8, -20.0, -0.7), (2.5, 60.0, 3.0)]:
            c, s = np.cos(angle), np.sin(angle)
            pts = (base - 56) @ np.array([[c, -s], [s, c]]) * scale + [w / 2 + shift, h / 2]
            lm.append(pts + rng.normal(0, 2, pts.shape))
            idx.append(i)
    return imgs, np.array(lm), np.array(idx)


@pytest.mark.parametrize("kernel", ["float", "fixed"])
@pytest.mark.parametrize("output", ["uint8", "float32_nchw"])
def test_align_kernel_matches_cpu_align(kernel: str, output: str) -> None:
    """Images of different sizes in one batch, faces partly outside, rotations; BGR output."""
    rng = np.random.default_rng(1)
    imgs, lm, idx = _faces(rng)
    kw = {"image_index": idx, "kernel": kernel, "output": output, "rgb": False}
    want, M = align(imgs, lm, **kw)  # type: ignore[arg-type]
    got, M2 = gpu_align(imgs, lm, device=EMU, **kw)  # type: ignore[arg-type]
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(M, M2)
    step = 1.0 if output == "uint8" else 1.0 / 127.5
    diff = np.abs(got.astype(np.float64) - want) / step
    assert diff.max() <= 1.0 + 1e-6  # the stated bound: one grey level
    assert (diff > 1e-6).mean() < 1e-3  # and in practice equal
    assert (want != 0).mean() > 0.5  # the crops are not empty


def test_align_kernel_batch_array_dlib_template() -> None:
    rng = np.random.default_rng(2)
    batch = rng.integers(0, 256, (3, 200, 220, 3), dtype=np.uint8)
    lm = template("dlib")[None] * [[[1.2]], [[0.9]], [[1.6]]] + 20
    want, _ = align(batch, lm, template="dlib")
    got, _ = gpu_align(batch, lm, template="dlib", device=EMU)
    np.testing.assert_array_equal(got, want)


def test_align_device_hook_in_faces_align() -> None:
    rng = np.random.default_rng(3)
    batch = rng.integers(0, 256, (2, 120, 120, 3), dtype=np.uint8)
    lm = template("arcface")[None].repeat(2, 0) + 4
    np.testing.assert_array_equal(align(batch, lm, device=EMU).crops, align(batch, lm).crops)


# --- float16 and selection ------------------------------------------------------------------
def test_half_conversion_matches_numpy() -> None:
    native = get_backend(EMU).native
    rng = np.random.default_rng(4)
    x = np.concatenate(
        [
            rng.normal(0, 1, 2000),
            rng.normal(0, 1e-5, 500),  # float16 subnormals
            rng.uniform(6e4, 7e4, 50),  # overflow to inf
            [0.0, -0.0, 65504.0, 65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, np.inf, -np.inf],
        ]
    ).astype(np.float32)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    got = np.array(native.to_half(x.tolist()), np.uint16)
    np.testing.assert_array_equal(got, want.view(np.uint16))
    back = np.array(native.from_half(got.tolist()), np.float32)
    np.testing.assert_array_equal(back, want.astype(np.float32))


def _ref_topk(
    scores: np.ndarray, ids: np.ndarray, k: int, larger: bool
) -> tuple[np.ndarray, np.ndarray]:
    """NumPy twin: sort by (score, id), best first; id -1 dropped; padded."""
    nq = scores.shape[0]
    D = np.full((nq, k), -np.inf if larger else np.inf, np.float32)
    I = np.full((nq, k), -1, np.int64)
    for i in range(nq):
        keep = ids[i] >= 0
        s, d = scores[i][keep], ids[i][keep]
        order = np.lexsort((d, -s if larger else s))[:k]
        D[i, : order.size], I[i, : order.size] = s[order], d[order]
    return D, I


@pytest.mark.parametrize("larger", [True, False])
@pytest.mark.parametrize("k", [1, 7, 100, 700])
def test_select_kernel_exact_with_ties(larger: bool, k: int) -> None:
    be = get_backend(EMU)
    rng = np.random.default_rng(k)
    n = 1500
    scores = rng.integers(0, 40, (5, n)).astype(np.float32)  # many ties
    ids = rng.permutation(10 * n)[: 5 * n].reshape(5, n).astype(np.int64)
    ids[rng.random(ids.shape) < 0.1] = -1
    from fastface.gpu.ivfpq import _select

    D, I = _select(be, scores, ids, k, larger, None)
    Dr, Ir = _ref_topk(scores, ids, k, larger)
    np.testing.assert_array_equal(I, Ir)
    np.testing.assert_array_equal(D, Dr)
    # fewer candidates than k: padding
    D, I = _select(be, scores[:, :3].copy(), ids[:, :3].copy(), 5, larger, None)
    assert (I[:, 3:] == -1).all() and np.isinf(D[:, 3:]).all()


# --- IVF-PQ ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gallery() -> tuple[np.ndarray, np.ndarray]:
    data = SyntheticFaces(n_identities=300, per_identity=20, d=32, seed=0, n_groups=10)
    xb, _ = data.vectors()
    xq, _ = data.queries(40, seed=5)
    return xb, xq


def _cpu_index(xb: np.ndarray, metric: str, nbits: int) -> IVFPQIndex:
    idx = IVFPQIndex(IVFPQParams(32, 16, 8, nbits=nbits, metric=metric))  # type: ignore[arg-type]
    idx.train(xb)
    idx.add(xb)
    return idx


def _numpy_ivfpq(
    g: GpuIVFPQ,
    codec: dict,
    codes: list,
    ids: list,
    q: np.ndarray,
    k: int,
    nprobe: int,
    removed: np.ndarray | None = None,
    lut16: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """NumPy twin of IVF-PQ search: decode every code of the probed lists, exact float64 sums."""
    C, B = codec["centroids"].astype(np.float64), codec["codebook"].astype(np.float64)
    M, _, dsub = B.shape
    ip = codec["metric"] == "ip"
    qd = q.astype(np.float64)
    coarse = qd @ C.T if ip else (C * C).sum(1)[None] - 2 * qd @ C.T
    probes = np.argsort(-coarse if ip else coarse, axis=1, kind="stable")[:, :nprobe]
    D = np.full((len(q), k), -np.inf if ip else np.inf, np.float32)
    I = np.full((len(q), k), -1, np.int64)
    for i in range(len(q)):
        s_all, id_all = [], []
        for lst in probes[i]:
            c, idl = codes[lst], ids[lst]
            if idl.size == 0:
                continue
            if codec["nbits"] == 4:
                c = np.stack([c & 15, c >> 4], axis=2).reshape(len(c), -1)[:, :M]
            r = qd[i] - C[lst] if (codec["by_residual"] and not ip) else qd[i]
            sub = r.reshape(M, 1, dsub)
            lut = (sub * B).sum(2) if ip else ((sub - B) ** 2).sum(2)  # (M, ksub)
            if lut16:
                lut = lut.astype(np.float32).astype(np.float16).astype(np.float64)
            s = lut[np.arange(M)[None, :], c].sum(1)
            if ip and codec["by_residual"]:
                s = s + qd[i] @ C[lst]
            keep = np.ones(idl.size, bool) if removed is None else ~np.isin(idl, removed)
            s_all.append(s[keep])
            id_all.append(idl[keep])
        s, d = np.concatenate(s_all), np.concatenate(id_all)
        order = np.lexsort((d, -s if ip else s))[:k]
        D[i, : order.size], I[i, : order.size] = s[order], d[order]
    return D, I


def _assert_same_topk(D, I, Dr, Ir, tol: float = 1e-4) -> None:  # type: ignore[no-untyped-def]
    """Equal up to distances within tol; ids may differ only where scores are within tol."""
    np.testing.assert_allclose(D, Dr, atol=tol, rtol=0)
    diff = Ir != I
    if diff.any():
        # swapped near-ties: the score at that rank agrees, and the id sets match row-wise
        # except at the boundary of near-equal scores
        rows = np.flatnonzero(diff.any(1))
        for r in rows:
            j = np.flatnonzero(diff[r])
            near = np.abs(Dr[r][:, None] - Dr[r][None, j]) <= tol
            assert near.any(), (r, j)
    assert diff.mean() < 0.02


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_ivfpq_8bit_matches_faiss(gallery, metric: str) -> None:  # type: ignore[no-untyped-def]
    xb, xq = gallery
    cpu = _cpu_index(xb, metric, 8)
    g = from_cpu(cpu, device=EMU)
    for nprobe in (1, 4, 16):
        D, I = g.search(xq, 10, nprobe=nprobe)
        Dc, Ic = cpu.search(xq, 10, nprobe=nprobe)
        _assert_same_topk(D, I, Dc, Ic)
        np.testing.assert_allclose(D, Dc, atol=1e-4, rtol=0)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("nbits", [8, 4])
def test_ivfpq_matches_numpy_decoding(gallery, metric: str, nbits: int) -> None:  # type: ignore[no-untyped-def]
    """4-bit: FAISS's fast scan quantises its tables, so the twin is exact NumPy decoding."""
    xb, xq = gallery
    cpu = _cpu_index(xb, metric, nbits)
    ivf = _codec_of(cpu)
    codec = codec_arrays(ivf)
    codes, ids = list_arrays(ivf)
    g = GpuIVFPQ(
        codec["centroids"],
        codec["codebook"],
        codes,
        ids,
        metric=codec["metric"],
        by_residual=codec["by_residual"],
        nbits=codec["nbits"],
        device=EMU,
    )
    for nsplit in (1, 3):
        D, I = g.search(xq, 20, nprobe=5, nsplit=nsplit)
        Dr, Ir = _numpy_ivfpq(g, codec, codes, ids, xq, 20, 5)
        _assert_same_topk(D, I, Dr, Ir)
    # float16 tables: the twin rounds its table entries to float16 too
    D, I = g.search(xq, 20, nprobe=5, lut="float16")
    Dr, Ir = _numpy_ivfpq(g, codec, codes, ids, xq, 20, 5, lut16=True)
    _assert_same_topk(D, I, Dr, Ir, tol=2e-3)


def test_ivfpq_tombstones_batches_and_padding(gallery, tmp_path) -> None:  # type: ignore[no-untyped-def]
    xb, xq = gallery
    params = IVFPQParams(32, 16, 8)
    with ShardedIndex.create(tmp_path / "idx", params, shard_size=2500) as index:
        index.train(xb)
        ids = index.add(xb)
        index.remove(ids[::3])  # sealed shards: tombstones; the open shard: dropped
        Dc, Ic = index.search(xq, 10, nprobe=16, strategy="fanout")
        g = from_cpu(index, device=EMU)
        assert g.ntotal == index.ntotal
        D, I = g.search(xq, 10, nprobe=16)
        _assert_same_topk(D, I, Dc, Ic)
        assert not np.isin(I, ids[::3]).any()
        # a tiny memory budget: one query per batch, same answers (the coarse GEMM of
        # one row may round differently from that of a batch: 1e-6)
        g.memory_budget = 1
        D1, I1 = g.search(xq, 10, nprobe=16)
        _assert_same_topk(D1, I1, D, I, tol=1e-5)
        # removal on the GPU index itself
        gone = I[:, 0][I[:, 0] >= 0]
        assert g.remove(gone) == np.unique(gone).size
        _, I2 = g.search(xq, 10, nprobe=16)
        assert not np.isin(I2, gone).any()
        # more results asked than exist in the probed lists: padded
        D3, I3 = g.search(xq[:2], 2000, nprobe=1)
        assert (I3[:, -1] == -1).all() and (D3[:, -1] == -np.inf).all()


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_rerank_matches_cpu(gallery, metric: str) -> None:  # type: ignore[no-untyped-def]
    xb, xq = gallery
    cpu = _cpu_index(xb, metric, 8)
    g = from_cpu(cpu, device=EMU)
    D, I = g.search(xq, 10, nprobe=8, rerank=5)
    Dc, Ic = cpu.search(xq, 10, nprobe=8, rerank=5)
    np.testing.assert_array_equal(I, Ic)
    np.testing.assert_allclose(D, Dc, atol=1e-6, rtol=0)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("nbits", [8, 4])
def test_encode_matches_faiss_codec(gallery, metric: str, nbits: int) -> None:  # type: ignore[no-untyped-def]
    xb, _ = gallery
    cpu = _cpu_index(xb, metric, nbits)
    ivf = _codec_of(cpu)
    codec = codec_arrays(ivf)
    lists, codes = encode(
        xb,
        codec["centroids"],
        codec["codebook"],
        metric=metric,
        by_residual=codec["by_residual"],
        nbits=nbits,
        device=EMU,
        batch_size=1000,
    )
    ref = faiss.vector_to_array(ivf.sa_encode(xb)) if False else ivf.sa_encode(xb)
    ncoarse = ivf.coarse_code_size()
    ref_lists = np.zeros(len(xb), np.int64)
    for b in range(ncoarse):
        ref_lists |= ref[:, b].astype(np.int64) << (8 * b)
    ref_codes = ref[:, ncoarse:]
    assert (lists == ref_lists).mean() > 0.999
    same = lists == ref_lists
    assert (codes[same] == ref_codes[same]).all(axis=1).mean() > 0.99
    if nbits == 8:
        # the codes fill a FAISS index exactly as its own add does
        filled = faiss.clone_index(ivf)
        filled.reset()
        fresh = faiss.clone_index(ivf)
        fresh.reset()
        keep = np.flatnonzero(same & (codes == ref_codes).all(axis=1))
        add_encoded(filled, lists[keep], codes[keep], keep)
        fresh.add_with_ids(xb[keep], keep.astype(np.int64))
        assert filled.ntotal == fresh.ntotal == keep.size
        Da, Ia = filled.search(xb[:20], 5)
        Db, Ib = fresh.search(xb[:20], 5)
        np.testing.assert_array_equal(Ia, Ib)
        np.testing.assert_array_equal(Da, Db)


def test_validation_errors(gallery) -> None:  # type: ignore[no-untyped-def]
    xb, xq = gallery
    g = from_cpu(_cpu_index(xb, "ip", 8), device=EMU, vectors=False)
    with pytest.raises(ValueError, match="nprobe"):
        g.search(xq, 5, nprobe=0)
    with pytest.raises(ValueError, match="rerank"):
        g.search(xq, 5, rerank=2)
    with pytest.raises(ValueError, match="exceeds"):
        g.search(xq, 4096)
    with pytest.raises(ValueError, match="q: expected"):
        g.search(xq[:, :8], 5)
    with pytest.raises(ValueError, match="device"):
        get_backend("tpu")
    with pytest.raises(TypeError, match="IVFPQIndex"):
        from_cpu(object(), device=EMU)


def test_gpu_package_doctest() -> None:
    import doctest

    import fastface.gpu

    result = doctest.testmod(fastface.gpu, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("nbits", [8, 4])
def test_block_programs_do_not_depend_on_thread_order(gallery, nbits: int) -> None:  # type: ignore[no-untyped-def]
    """On a GPU the threads of a phase run in any order: a missing barrier would make the
    result depend on it. The emulation runs the blocks' threads forward, reversed and
    shuffled; scans (with splits, a large k, L2 tables per list) and selections must agree
    bit for bit, and with the NumPy twin."""
    xb, xq = gallery
    cpu = _cpu_index(xb, "l2", nbits)
    ivf = _codec_of(cpu)
    codec = codec_arrays(ivf)
    codes, ids = list_arrays(ivf)
    g = GpuIVFPQ(codec["centroids"], codec["codebook"], codes, ids, metric="l2",
                 by_residual=codec["by_residual"], nbits=nbits, device=EMU)  # fmt: skip
    native = get_backend(EMU).native
    results = []
    try:
        for order in (0, 1, 2):
            native.set_thread_order(order)
            results.append(g.search(xq[:12], 300, nprobe=6, nsplit=2))
    finally:
        native.set_thread_order(0)
    for D, I in results[1:]:
        np.testing.assert_array_equal(I, results[0][1])
        np.testing.assert_array_equal(D, results[0][0])
    Dr, Ir = _numpy_ivfpq(g, codec, codes, ids, xq[:12], 300, 6)
    _assert_same_topk(results[0][0], results[0][1], Dr, Ir)
    with pytest.raises(ValueError, match="order"):
        native.set_thread_order(3)


def test_to_gpu_on_both_index_kinds_and_refusals(gallery, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``index.to_gpu()`` is ``from_cpu(index)``; codecs the kernels cannot run are refused."""
    xb, xq = gallery
    cpu = _cpu_index(xb, "ip", 8)
    D, I = cpu.to_gpu(device=EMU).search(xq, 10, nprobe=8, rerank=5)
    Dc, Ic = cpu.search(xq, 10, nprobe=8, rerank=5)
    np.testing.assert_array_equal(I, Ic)
    np.testing.assert_allclose(D, Dc, atol=1e-6, rtol=0)
    with ShardedIndex.create(tmp_path / "s", IVFPQParams(32, 16, 8), shard_size=2500) as index:
        index.train(xb)
        index.add(xb)
        g = index.to_gpu(device=EMU, vectors=False)
        assert g.ntotal == index.ntotal
        _assert_same_topk(*g.search(xq, 10, nprobe=16), *index.search(xq, 10, nprobe=16))
    with ShardedIndex.create(tmp_path / "f", "Flat", d=32) as flat:
        flat.add(xb[:100])
        with pytest.raises(ValueError, match="flat index"):
            flat.to_gpu(device=EMU)
    with ShardedIndex.create(tmp_path / "o", "OPQ8,IVF16,PQ8", d=32) as opq:
        opq.train(xb)
        opq.add(xb[:500])
        with pytest.raises(ValueError, match="OPQ"):
            opq.to_gpu(device=EMU)
