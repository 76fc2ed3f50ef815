"""Exact re-ranking from stored vectors: kernels against NumPy, indexes against brute force."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fastface import Codec, IVFPQIndex, IVFPQParams, ShardedIndex, _native
from fastface.datasets import SyntheticFaces
from fastface.errors import CorruptIndexError, EmptyIndexError
from fastface.eval import ground_truth, recall_at_k
from fastface.kernels.exact import lane_score, rescore, rescore_ids, scores
from fastface.kernels.rerank import F16_SCALE, rerank_f16, rerank_f32, widen_f16

D_DIM = 32
_CODECS: dict[tuple, Codec] = {}


def _index(params: IVFPQParams, xb: np.ndarray) -> IVFPQIndex:
    """An empty trained index; codecs are trained once per (metric, nbits, M, nlist)."""
    key = (params.metric, params.nbits, params.M, params.nlist)
    if key not in _CODECS:
        _CODECS[key] = Codec.train(params, xb)
    return IVFPQIndex(_CODECS[key].with_storage(params.store_vectors))


def _is_mapped(arr) -> bool:
    """True when ``arr`` reads a memory-mapped file."""
    import mmap

    while arr is not None:
        if isinstance(arr, (np.memmap, mmap.mmap)):
            return True
        arr = arr.obj if isinstance(arr, memoryview) else getattr(arr, "base", None)
    return False


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    gen = SyntheticFaces(300, 10, D_DIM, seed=3, n_groups=10)
    xb, _ = gen.vectors()
    xq, _ = gen.queries(60, seed=7)
    return xb, xq


def _ref_rerank(q, base, cand, k, metric):
    """NumPy twin: exact scores of each query's candidates, best first, ties by lower id."""
    nq = q.shape[0]
    larger = metric == "ip"
    D = np.full((nq, k), -np.inf if larger else np.inf, np.float32)
    I = np.full((nq, k), -1, np.int64)
    for i in range(nq):
        c = cand[i][cand[i] >= 0]
        v = base[c].astype(np.float32)
        s = v @ q[i] if metric == "ip" else ((v - q[i]) ** 2).sum(1)
        order = np.lexsort((c, -s if larger else s))[:k]
        D[i, : order.size] = s[order]
        I[i, : order.size] = c[order]
    return D, I


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_kernel_matches_numpy(metric: str, dtype: type) -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((200, 16)).astype(dtype)
    base[7] = base[3]  # equal scores: id 3 must come before id 7
    q = rng.standard_normal((25, 16)).astype(np.float32)
    cand = np.stack([rng.permutation(200)[:30] for _ in range(25)]).astype(np.int64)
    cand[:, 0], cand[:, 1] = 7, 3
    cand[::3, 5:9] = -1  # padding is skipped
    cand[-1, :] = -1  # no candidate at all: the row stays padding
    k = 6
    D = np.full((25, k), -np.inf if metric == "ip" else np.inf, np.float32)
    I = np.full((25, k), -1, np.int64)
    rows = cand.copy()  # ids are the rows here
    if dtype == np.float16:
        rerank_f16(q, base.view(np.uint16), rows, cand, metric == "l2", D, I)
    else:
        rerank_f32(q, base, rows, cand, metric == "l2", D, I)
    D_ref, I_ref = _ref_rerank(q, base, cand, k, metric)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, rtol=1e-5, atol=1e-4)
    assert (I[-1] == -1).all()
    assert (I[:-1] >= 0).all()
    both = (I == 3).any(1) & (I == 7).any(1)
    assert both.any()
    for row in np.flatnonzero(both):
        assert np.flatnonzero(I[row] == 3)[0] < np.flatnonzero(I[row] == 7)[0]


def _lane_twin(q, base, cand, k, metric):
    """Top-k by the native kernel's exact sum order (lane_score), ties by lower id."""
    larger = metric == "ip"
    D = np.full((q.shape[0], k), -np.inf if larger else np.inf, np.float32)
    I = np.full((q.shape[0], k), -1, np.int64)
    for i in range(q.shape[0]):
        c = cand[i][(cand[i] >= 0) & (cand[i] < base.shape[0])]
        s = np.array([lane_score(q[i], base[j], metric) for j in c], np.float32)
        order = np.lexsort((c, -s if larger else s))[:k]
        D[i, : order.size] = s[order]
        I[i, : order.size] = c[order]
    return D, I


# 32, 64, 96, 128, 256 and 512 have kernels with the loop count fixed; the others take
# the general one (partial last block of 32 through a zero-padded buffer)
@pytest.mark.parametrize("d", [8, 32, 48, 50, 64, 96, 128, 200, 256, 512])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_native_kernel_equals_lane_twin_bit_for_bit(d: int, dtype: type) -> None:
    rng = np.random.default_rng(d)
    n, nq, m, k = 120, 6, 40, 7
    base = rng.standard_normal((n, d)).astype(np.float32)
    base *= rng.choice(np.array([1.0, 1e-6], np.float32), (n, d))  # float16 subnormals too
    base[7] = base[3]  # equal scores: id 3 must come before id 7
    base = base.astype(dtype)
    q = rng.standard_normal((nq, d)).astype(np.float32)
    cand = np.stack([rng.permutation(n)[:m] for _ in range(nq)]).astype(np.int64)
    cand[:, 0], cand[:, 1] = 7, 3
    cand[::2, 5:9] = -1  # padding is skipped
    cand[1, 10] = n + 5  # no such row: skipped
    for metric in ("ip", "l2"):
        D, I = _native.rerank(q, base, cand, k, l2=metric == "l2", lo=0, span=n)
        D_ref, I_ref = _lane_twin(q, base, cand, k, metric)
        np.testing.assert_array_equal(I, I_ref)
        np.testing.assert_array_equal(D.view(np.uint32), D_ref.view(np.uint32))
        both = (I == 3).any(1) & (I == 7).any(1)
        for row in np.flatnonzero(both):
            assert np.flatnonzero(I[row] == 3)[0] < np.flatnonzero(I[row] == 7)[0]


def test_native_kernel_row_maps_agree() -> None:
    """Rows given, rows from a table, rows = id - lo: the same answers."""
    rng = np.random.default_rng(1)
    n, d = 300, 40
    base = rng.standard_normal((n, d)).astype(np.float16)
    q = rng.standard_normal((9, d)).astype(np.float32)
    perm = rng.permutation(n)
    ids_of_row = 1000 + perm  # row r holds id 1000 + perm[r]
    table = np.full(n, -1, np.int64)
    table[perm] = np.arange(n)
    cand_rows = np.stack([rng.permutation(n)[:50] for _ in range(9)]).astype(np.int64)
    cand = ids_of_row[cand_rows]
    cand[0, :3] = [5, 999, 1300]  # outside the table: skipped
    cand_rows[0, :3] = -1
    ref = rescore(q, base, cand_rows, cand, 6)
    got = rescore_ids(q, base, cand, 6, lo=1000, span=n, table=table)
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_array_equal(got[0], ref[0])
    # identity: id x at row x - lo
    ident = rescore_ids(q, base, cand_rows + 50, 6, lo=50, span=n)
    want = rescore(q, base, cand_rows, cand_rows + 50, 6)
    np.testing.assert_array_equal(ident[1], want[1])


@pytest.mark.parametrize("ids_kind", ["consecutive", "shuffled", "sparse"])
def test_index_rescore_through_each_row_map(data, ids_kind: str) -> None:
    xb, xq = data
    n = xb.shape[0]
    ids = {
        "consecutive": np.arange(n) + 40,
        "shuffled": np.random.default_rng(0).permutation(n) + 40,
        "sparse": np.arange(n) * 1_000_003 + 7,
    }[ids_kind]
    index = _index(IVFPQParams(D_DIM, 16, 8, store_vectors="float32"), xb)
    index.add(xb, ids)
    cand = np.random.default_rng(1).choice(ids, (len(xq), 64))
    cand[:, 0] = -5  # unknown
    D, I = index.rescore(xq, cand, 5)
    ref = rescore(xq, index.vectors, index.rows_of(cand), cand, 5)
    np.testing.assert_array_equal(I, ref[1])
    np.testing.assert_array_equal(D, ref[0])


def test_widen_f16_is_exact_for_every_finite_float16() -> None:
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    ref = bits.view(np.float16).astype(np.float32)
    out = np.empty(bits.size, np.uint32)
    widen_f16(bits, out)
    got = out.view(np.float32) * F16_SCALE
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(got[finite], ref[finite])
    np.testing.assert_array_equal(np.signbit(got[finite]), np.signbit(ref[finite]))  # -0.0


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_gathered_and_block_scorers_agree(metric: str) -> None:
    """The two access patterns of the one exact scorer compute the same scores."""
    rng = np.random.default_rng(2)
    base = rng.standard_normal((300, 24)).astype(np.float32)
    q = rng.standard_normal((10, 24)).astype(np.float32)
    ids = np.broadcast_to(np.arange(300), (10, 300)).copy()
    D, I = rescore(q, base, ids, ids, 300, metric=metric)
    S = scores(q, base, metric)
    np.testing.assert_allclose(D, np.take_along_axis(S, I, 1), rtol=2e-6, atol=2e-5)
    exact = q.astype(np.float64) @ base.astype(np.float64).T
    if metric == "l2":
        exact = ((q[:, None, :].astype(np.float64) - base[None]) ** 2).sum(-1)
    np.testing.assert_allclose(S, exact, rtol=1e-5, atol=1e-4)


def _covered(cand: np.ndarray, gt: np.ndarray) -> np.ndarray:
    return np.array([np.isin(t, c).all() for c, t in zip(cand, gt, strict=True)])


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_rerank_equals_brute_force_when_candidates_cover(data, metric: str) -> None:
    xb, xq = data
    k, f, nprobe = 5, 4, 8
    index = _index(IVFPQParams(D_DIM, 16, 8, metric=metric, store_vectors="float32"), xb)
    index.add(xb)
    D, I = index.search(xq, k, nprobe=nprobe, rerank=f)
    _, cand = index.scan(xq, k * f, index.assign(xq, nprobe))
    gD, gI = ground_truth(xb, xq, k, metric=metric)
    cov = _covered(cand, gI)
    assert cov.mean() > 0.5  # the check below is not vacuous
    np.testing.assert_array_equal(I[cov], gI[cov])
    np.testing.assert_allclose(D[cov], gD[cov], rtol=1e-5, atol=1e-5)
    # every candidate scanned: exactly the brute-force answer for every query
    _D_all, I_all = index.search(xq, k, nprobe=16, rerank=xb.shape[0] // k)
    np.testing.assert_array_equal(I_all, gI)


def test_recall_rises_with_rerank(data) -> None:
    xb, xq = data
    index = IVFPQIndex(IVFPQParams(D_DIM, 16, 4))  # coarse codes: PQ order is poor
    index.train(xb)
    index.add(xb)
    _, gI = ground_truth(xb, xq, 10)
    recalls = [
        recall_at_k(index.search(xq, 10, nprobe=16, rerank=f)[1], gI, 10) for f in (1, 4, 16)
    ]
    _, I_pq = index.search(xq, 10, nprobe=16)
    assert recall_at_k(I_pq, gI, 10) == recalls[0]  # rerank=1 re-orders, finds nothing new
    assert recalls[0] < recalls[1] <= recalls[2]
    assert recalls[2] > 0.95


def test_float16_and_float32_storage_agree(data) -> None:
    xb, xq = data
    out = {}
    for kind in ("float16", "float32"):
        index = _index(IVFPQParams(D_DIM, 16, 8, store_vectors=kind), xb)
        index.add(xb)
        assert index.vectors is not None and index.vectors.dtype == np.dtype(kind)
        out[kind] = index.search(xq, 10, nprobe=16, rerank=8)
    (D16, I16), (D32, I32) = out["float16"], out["float32"]
    np.testing.assert_allclose(D16, D32, atol=2e-3)  # unit vectors: float16 error ~ 1e-3
    assert (I16 == I32).mean() > 0.95


def test_sharded_rerank_equals_brute_force(tmp_path, data) -> None:
    xb, xq = data
    k, f = 5, 200
    with ShardedIndex.create(
        tmp_path / "idx", IVFPQParams(D_DIM, 16, 8, nbits=4), shard_size=700
    ) as index:
        index.train(xb)
        index.add(xb)
        gone = np.arange(0, xb.shape[0], 5)
        index.remove(gone)
        D, I = index.search(xq, k, nprobe=16, rerank=f)
    keep = np.setdiff1d(np.arange(xb.shape[0]), gone)
    gD, gI = ground_truth(xb[keep], xq, k, ids=keep)
    np.testing.assert_array_equal(I, gI)
    np.testing.assert_allclose(D, gD, atol=2e-3)  # float16 storage
    with ShardedIndex.open(tmp_path / "idx") as index:
        assert all(_is_mapped(s.vectors) for s in index.shards())
        D2, I2 = index.search(xq, k, nprobe=16, rerank=f)
    with ShardedIndex.open(tmp_path / "idx", mmap=True) as index:  # codes memory-mapped too
        _D3, I3 = index.search(xq, k, nprobe=16, rerank=f)
    np.testing.assert_array_equal(I2, I)
    np.testing.assert_array_equal(D2, D)
    np.testing.assert_array_equal(I3, I)


def test_sharded_merge_breaks_ties_by_lower_id(tmp_path) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((600, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[550] = x[10]  # same vector in a later and an earlier shard, under ids 550 and 10
    params = IVFPQParams(8, 4, 4, store_vectors="float32")
    with ShardedIndex.create(tmp_path / "i", params, shard_size=300) as index:
        index.train(x)
        index.add(x[300:], np.arange(300, 600))  # shard 0 holds the larger id
        index.add(x[:300], np.arange(300))
        _, I = index.search(x[[10]], 2, nprobe=4, rerank=300)
    assert I[0].tolist() == [10, 550]


def test_save_load_keeps_vectors(tmp_path, data) -> None:
    xb, xq = data
    index = _index(IVFPQParams(D_DIM, 16, 8), xb)
    for lo in range(0, xb.shape[0], 700):  # several runs of lists: rows and lists differ
        index.add(xb[lo : lo + 700])
    assert len(index.list_runs) > 1
    want = index.search(xq, 5, nprobe=8, rerank=4)
    index.save(tmp_path / "a.ivf")
    meta = json.loads((tmp_path / "a.ivf.json").read_text())
    assert meta["vectors"]["file"] == "a.ivf.vectors.npy"
    for mmap in (False, True):
        loaded = IVFPQIndex.load(tmp_path / "a.ivf", mmap=mmap)
        assert _is_mapped(loaded.vectors)
        got = loaded.search(xq, 5, nprobe=8, rerank=4)
        np.testing.assert_array_equal(got[1], want[1])
    loaded = IVFPQIndex.load(tmp_path / "a.ivf")
    loaded.remove([0, 1, 2])  # a change copies the kept rows out of the map
    assert loaded.vectors is not None and loaded.vectors.shape[0] == xb.shape[0] - 3
    assert not np.isin(loaded.ids, [0, 1, 2]).any()
    np.testing.assert_array_equal(loaded.vectors, xb[loaded.ids].astype(np.float16))


def test_index_without_vectors(tmp_path, data) -> None:
    xb, xq = data
    index = _index(IVFPQParams(D_DIM, 16, 8, store_vectors=None), xb)
    index.add(xb)
    assert index.vectors is None
    index.search(xq, 5, nprobe=4)
    with pytest.raises(ValueError, match="store_vectors=None"):
        index.search(xq, 5, nprobe=4, rerank=2)
    index.save(tmp_path / "b.ivf")
    assert not (tmp_path / "b.ivf.vectors.npy").exists()
    assert IVFPQIndex.load(tmp_path / "b.ivf").vectors is None
    # a record written before vectors were stored reads as store_vectors=None
    old = IVFPQParams(D_DIM, 16, 8).to_dict()
    del old["store_vectors"]
    assert IVFPQParams.from_dict(old).store_vectors is None


def test_bad_input(data) -> None:
    xb, xq = data
    with pytest.raises(ValueError, match="store_vectors"):
        IVFPQParams(D_DIM, 16, 8, store_vectors="int8")  # type: ignore[arg-type]
    index = _index(IVFPQParams(D_DIM, 16, 8), xb)
    with pytest.raises(EmptyIndexError):
        index.search(xq, 5, rerank=2)
    index.add(xb)
    with pytest.raises(ValueError, match="rerank"):
        index.search(xq, 5, rerank=0)
    with pytest.raises(TypeError, match="rerank"):
        index.search(xq, 5, rerank=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="d=32"):
        index.search(np.zeros((2, 16), np.float32), 5, rerank=2)
    with pytest.raises(ValueError, match="store_vectors=None"):
        _index(IVFPQParams(D_DIM, 16, 8, store_vectors=None), xb).rescore(xq, [1], 2)
    with pytest.raises(ValueError, match="overflow float16"):
        index.add(np.full((1, D_DIM), 1e5, np.float32))
    assert index.ntotal == xb.shape[0]  # the rejected add changed nothing


def _flip_byte(path, offset: int = -3) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


def test_flipped_byte_in_vectors_file(tmp_path, data) -> None:
    xb, _ = data
    with ShardedIndex.create(
        tmp_path / "idx", IVFPQParams(D_DIM, 16, 8, nbits=4), shard_size=1000
    ) as index:
        index.train(xb)
        index.add(xb)
        files = [s["files"]["vectors"]["file"] for s in _manifest(tmp_path / "idx")["shards"]]
    assert len(files) == 3 and all(f.endswith(".f16.npy") for f in files)
    _flip_byte(tmp_path / "idx" / files[1])
    with pytest.raises(CorruptIndexError, match="SHA-256"):
        ShardedIndex.open(tmp_path / "idx")
    single = _index(IVFPQParams(D_DIM, 16, 8), xb)
    single.add(xb)
    single.save(tmp_path / "s.ivf")
    _flip_byte(tmp_path / "s.ivf.vectors.npy")
    with pytest.raises(CorruptIndexError):
        IVFPQIndex.load(tmp_path / "s.ivf")


def _manifest(path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_compact_drops_removed_rows_from_vectors_file(tmp_path, data) -> None:
    xb, _ = data
    params = IVFPQParams(D_DIM, 16, 8, nbits=4, store_vectors="float32")
    with ShardedIndex.create(tmp_path / "idx", params, shard_size=1000) as index:
        index.train(xb)
        index.add(xb)
        before = {
            s["number"]: s["files"]["vectors"]["file"]
            for s in _manifest(tmp_path / "idx")["shards"]
        }
        gone = np.array([5, 17, 1500, 2999])
        index.remove(gone)
        index.compact()
    man = _manifest(tmp_path / "idx")
    for entry in man["shards"]:
        ids = np.load(tmp_path / "idx" / entry["files"]["ids"]["file"])
        vec_file = tmp_path / "idx" / entry["files"]["vectors"]["file"]
        vecs = np.load(vec_file)
        assert vecs.shape == (entry["count"], D_DIM)
        np.testing.assert_array_equal(vecs, xb[ids])  # row order = ids order
        assert not np.isin(ids, gone).any()
        if entry["number"] in (0, 1):  # rewritten under a new name, old file deleted
            assert vec_file.name != before[entry["number"]]
            assert not (tmp_path / "idx" / before[entry["number"]]).exists()
    removed_rows = xb[gone]
    for f in (tmp_path / "idx").glob("*.f32.npy"):
        stored = np.load(f)
        assert not (stored[:, None, :] == removed_rows[None]).all(-1).any()


def test_kernels_without_jit() -> None:
    code = textwrap.dedent(
        """
        import numpy as np
        from fastface.kernels.rerank import rerank_f16, rerank_f32
        assert not hasattr(rerank_f32, "signatures")  # plain Python under NUMBA_DISABLE_JIT
        rng = np.random.default_rng(0)
        base = rng.standard_normal((50, 8)).astype(np.float32)
        q = rng.standard_normal((4, 8)).astype(np.float32)
        cand = np.stack([rng.permutation(50)[:10] for _ in range(4)]).astype(np.int64)
        for l2 in (False, True):
            for kind in ("f32", "f16"):
                D = np.full((4, 3), np.inf if l2 else -np.inf, np.float32)
                I = np.full((4, 3), -1, np.int64)
                if kind == "f16":
                    b16 = base.astype(np.float16)
                    rerank_f16(q, b16.view(np.uint16), cand, cand, l2, D, I)
                    ref_base = b16.astype(np.float32)
                else:
                    rerank_f32(q, base, cand, cand, l2, D, I)
                    ref_base = base
                for i in range(4):
                    v = ref_base[cand[i]]
                    s = ((v - q[i]) ** 2).sum(1) if l2 else v @ q[i]
                    order = np.argsort(s if l2 else -s, kind="stable")[:3]
                    assert (I[i] == cand[i][order]).all(), (I[i], cand[i][order])
                    assert np.allclose(D[i], s[order], atol=1e-4)
        print("ok")
        """
    )
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_rerank_with_sparse_ids(data) -> None:
    """Ids far apart take the binary-search path from id to row; dense ids a table."""
    xb, xq = data
    ids = np.arange(xb.shape[0], dtype=np.int64) * 1_000_003 + 7
    index = _index(IVFPQParams(D_DIM, 16, 8, store_vectors="float32"), xb)
    index.add(xb, ids)
    _, I = index.search(xq, 5, nprobe=16, rerank=xb.shape[0] // 5)
    _, gI = ground_truth(xb, xq, 5, ids=ids)
    np.testing.assert_array_equal(I, gI)
    np.testing.assert_array_equal(index.rows_of(np.array([ids[9], 5, -1])), [9, -1, -1])
    dense = _index(IVFPQParams(D_DIM, 16, 8, store_vectors="float32"), xb)
    dense.add(xb[:100], np.arange(100, 200))
    np.testing.assert_array_equal(dense.rows_of(np.array([150, 99, 200, -1])), [50, -1, -1, -1])
