"""One IVF-PQ shard: the shard contract, the native scan against its NumPy twin, FAISS
compatibility, persistence and the input policy."""

from __future__ import annotations

import hashlib
import json

import faiss
import numpy as np
import pytest

from fastface import IVFPQIndex, IVFPQParams
from fastface._validation import MAX_K
from fastface.errors import (
    CorruptIndexError,
    EmptyIndexError,
    NotTrainedError,
    ReadOnlyIndexError,
    UnsupportedFormatError,
)
from fastface.eval import assert_results_agree, ground_truth, recall_at_k
from fastface.index import storage


@pytest.fixture(scope="module", params=[8, 4], ids=["pq8", "fastscan4"])
def trained(request, small_data):
    xb = small_data[0]
    index = IVFPQIndex(IVFPQParams(32, 32, 16, nbits=request.param))
    index.train(xb)
    index.add(xb)
    return index


def test_recall_against_brute_force(trained, small_data) -> None:
    xb, _, xq, _ = small_data
    _, gt = ground_truth(xb, xq, 10)
    _, I = trained.search(xq, 10, nprobe=32)
    # 16 sub-quantizers on 32-d vectors, full scan: stated thresholds (8-bit codes are
    # finer than 4-bit fast-scan codes)
    assert recall_at_k(I, gt, 10) >= (0.85 if trained.params.nbits == 8 else 0.75)
    _, I1 = trained.search(xq, 10, nprobe=1)
    assert recall_at_k(I1, gt, 10) < recall_at_k(I, gt, 10)


def test_same_as_faiss_with_same_codec(trained, small_data) -> None:
    """fastface's scan against FAISS's on the same codes: equal up to tie order and rounding."""
    xq = small_data[2]
    raw = trained.to_faiss()
    for nprobe in (1, 8, 32):
        D, I = trained.search(xq, 10, nprobe=nprobe)
        Df, If = raw.search(xq, 10, params=faiss.SearchParametersIVF(nprobe=nprobe))
        # FAISS sums the PQ table in another order: scores agree to float32 rounding
        np.testing.assert_allclose(D, Df, rtol=1e-5, atol=1e-5)
        assert_results_agree((D, I), (Df, If), atol=1e-5)


def _fma_chain(terms_a: np.ndarray, terms_b: np.ndarray) -> np.ndarray:
    """float32 ``acc = fma(a[t], b[t], acc)`` over the last axis, in order.

    Emulated in extended precision: a product of two float32 is exact there and the
    sum is exact or nearly, so rounding to float32 once gives fma's result.
    """
    acc = np.zeros(terms_a.shape[:-1], np.float32)
    for t in range(terms_a.shape[-1]):
        exact = terms_a[..., t].astype(np.longdouble) * terms_b[..., t] + acc.astype(np.longdouble)
        acc = exact.astype(np.float32)
    return acc


def _twin_scan(index: IVFPQIndex, q: np.ndarray, k: int, nprobe: int, exclude=()):
    """NumPy twin of the native 8-bit scan, computed the same way, to the bit.

    Look-up tables as float32 chains of fused multiply-adds over the sub-vector;
    each code's table entries summed in eight float32 lanes (entry m into lane
    m % 8) reduced ((0+4)+(2+6))+((1+5)+(3+7)); inner product adds the coarse score.
    Top-k by (better score, lower id).
    """
    codec = index.codec
    p = index.params
    Dq, Iq = codec.assign(q, nprobe)
    codes, ids = [], []
    for run in index.list_runs:
        c, i = run.to_csr()
        codes.append(c)
        ids.append(i)
    codes_all = np.concatenate(codes)
    ids_all = np.concatenate(ids)
    lists_all = np.concatenate(
        [np.repeat(np.arange(p.nlist), run.count) for run in index.list_runs]
    )
    C = codec.pq_centroids  # (M, 256, dsub) float32
    larger = p.metric == "ip"
    D = np.full((q.shape[0], k), p.pad_score, np.float32)
    I = np.full((q.shape[0], k), -1, np.int64)
    for i in range(q.shape[0]):
        cand_s, cand_i = [], []
        for probe in range(nprobe):
            lst = Iq[i, probe]
            sel = np.flatnonzero(lists_all == lst)
            if sel.size == 0:
                continue
            x = q[i] if larger else q[i] - codec.centroids[lst]
            xs = np.broadcast_to(x.reshape(p.M, 1, p.dsub), C.shape)
            if larger:
                lut = _fma_chain(xs, C)  # (M, 256)
            else:
                diff = (xs - C).astype(np.float32)
                lut = _fma_chain(diff, diff)
            vals = lut[np.arange(p.M)[None, :], codes_all[sel]]  # (n, M) float32
            lanes = np.zeros((sel.size, 8), np.float32)
            for m in range(p.M):
                lanes[:, m % 8] += vals[:, m]
            s = ((lanes[:, 0] + lanes[:, 4]) + (lanes[:, 2] + lanes[:, 6])) + (
                (lanes[:, 1] + lanes[:, 5]) + (lanes[:, 3] + lanes[:, 7])
            )
            if larger:
                s = np.float32(Dq[i, probe]) + s
            keep = ~np.isin(ids_all[sel], exclude)
            cand_s.append(s[keep])
            cand_i.append(ids_all[sel][keep])
        if not cand_s:
            continue
        s = np.concatenate(cand_s)
        ci = np.concatenate(cand_i)
        order = np.lexsort((ci, -s if larger else s))[:k]
        D[i, : order.size] = s[order]
        I[i, : order.size] = ci[order]
    return D, I


@pytest.mark.parametrize(
    ("metric", "d", "M"),
    [("ip", 32, 16), ("l2", 32, 4), ("ip", 48, 12), ("l2", 48, 24)],
    ids=["ip-M16", "l2-M4", "ip-M12", "l2-M24"],  # M % 8: gathers only, tail only, both
)
def test_native_scan_equals_numpy_twin_bit_for_bit(small_data, metric, d, M) -> None:
    if d == 32:
        xb, _, xq, _ = small_data
    else:
        rng = np.random.default_rng(d + M)
        xb = rng.standard_normal((3000, d)).astype(np.float32)
        xq = rng.standard_normal((30, d)).astype(np.float32)
    index = IVFPQIndex(IVFPQParams(d, 16, M, metric=metric))
    index.train(xb)
    # duplicated vectors give equal codes and equal scores: the lower id must come first
    x = np.concatenate([xb[:1500], xb[:40]])
    ids = np.concatenate([np.arange(1500) * 2 + 7, np.arange(40) * 2 + 6])
    index.add(x[:900], ids[:900])
    index.add(x[900:], ids[900:])  # two runs of lists
    for nprobe, k in ((1, 5), (4, 20), (16, 50)):
        got = index.search(xq[:12], k, nprobe=nprobe)
        want = _twin_scan(index, xq[:12], k, nprobe)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    # the tie rule on a query that equals a duplicated vector: 12 and 13 hold one vector
    D, I = index.search(xb[3:4], 16, nprobe=16)
    pos = [I[0].tolist().index(i) for i in (12, 13)]
    assert pos[1] == pos[0] + 1 and D[0, pos[0]] == D[0, pos[1]]


def test_contract_steps_compose(trained, small_data) -> None:
    """assign + scan (+ rescore) is search, and exclusion skips ids inside the scan."""
    xq = small_data[2][:20]
    a = trained.assign(xq, 8)
    assert a[0].shape == a[1].shape == (20, 8)
    D, I = trained.scan(xq, 10, a)
    Ds, Is = trained.search(xq, 10, nprobe=8)
    np.testing.assert_array_equal(I, Is)
    np.testing.assert_array_equal(D, Ds)
    gone = np.unique(I[:, :3])
    De, Ie = trained.scan(xq, 10, a, exclude=gone)
    assert not np.isin(Ie, gone).any() and (Ie >= 0).all()
    twin = trained.copy()
    twin.remove(gone)
    if trained.params.nbits == 8:  # exact tie rule: equal to the index without them
        np.testing.assert_array_equal(twin.scan(xq, 10, a)[1], Ie)
    else:
        assert_results_agree(twin.scan(xq, 10, a), (De, Ie))
    _, cand = trained.scan(xq, 40, a)
    _Dr, Ir = trained.rescore(xq, cand, 10)
    np.testing.assert_array_equal(Ir, trained.search(xq, 10, nprobe=8, rerank=4)[1])


def test_rescore_is_exact(small_data) -> None:
    xb, _, xq, _ = small_data
    index = IVFPQIndex(IVFPQParams(32, 16, 8, store_vectors="float32"))
    index.train(xb)
    index.add(xb, ids=np.arange(xb.shape[0]) * 3)
    cand = np.arange(0, 600, 3)  # every query, the same 200 candidates
    D, I = index.rescore(xq[:5], np.append(cand, [-1, 10**9]), 7)  # -1, unknown: skipped
    S = xq[:5] @ xb[:200].T
    for i in range(5):
        order = np.lexsort((cand, -S[i]))[:7]
        np.testing.assert_array_equal(I[i], cand[order])
        np.testing.assert_allclose(D[i], S[i, order], rtol=1e-5)


def test_lookup_and_vectors(small_data) -> None:
    xb = small_data[0]
    index = IVFPQIndex(IVFPQParams(32, 16, 8, store_vectors="float32"))
    index.train(xb)
    index.add(xb[:50], ids=np.arange(50) * 10)
    assert index.contains([0, 10, 11]).tolist() == [True, True, False]
    assert index.rows_of([[20, 5]]).tolist() == [[2, -1]]
    np.testing.assert_array_equal(index.live_ids(), np.arange(50) * 10)
    np.testing.assert_array_equal(index.get_vectors([30, 0]), xb[[3, 0]])
    with pytest.raises(KeyError):
        index.get_vectors([31])
    assert not index.ids.flags.writeable and not index.vectors.flags.writeable


def test_copy_is_independent_and_view_read_only(small_data) -> None:
    xb, _, xq, _ = small_data
    index = IVFPQIndex(IVFPQParams(32, 16, 8))
    index.train(xb)
    index.add(xb[:1000])
    before = index.search(xq, 5, nprobe=16)
    other = index.copy()
    other.add(xb[1000:1200], ids=np.arange(1000, 1200))
    other.remove(np.arange(100))
    index.add(
        xb[1200:1300], ids=np.arange(1200, 1300)
    )  # both append to buffers they share: neither sees the other
    assert index.ntotal == 1100 and other.ntotal == 1100
    assert np.intersect1d(index.ids, np.arange(1000, 1200)).size == 0
    assert np.intersect1d(other.ids, np.arange(1200, 1300)).size == 0
    view = index.view()
    with pytest.raises(ReadOnlyIndexError):
        view.add(xb[:1])
    index.remove(np.arange(1200, 1300))
    np.testing.assert_array_equal(index.search(xq, 5, nprobe=16)[1], before[1])


def test_faiss_format_compatible(trained, small_data, tmp_path) -> None:
    xq = small_data[2]
    data = b"".join(trained.serialize())
    if trained.params.nbits == 8:
        # byte for byte what FAISS writes for the same index
        assert data == bytes(
            faiss.serialize_index(faiss.deserialize_index(np.frombuffer(data, np.uint8)))
        )
    path = tmp_path / "shard.faiss"
    trained.save(path)
    raw = faiss.read_index(str(path))  # a plain FAISS index file
    assert raw.ntotal == trained.ntotal
    Df, If = raw.search(xq, 10, params=faiss.SearchParametersIVF(nprobe=8))
    assert_results_agree(trained.search(xq, 10, nprobe=8), (Df, If), atol=1e-5)
    wrapped = IVFPQIndex.from_faiss(
        trained.params,
        raw,
        vectors=None if trained.vectors is None else IVFPQIndex.load(path).vectors,
    )
    np.testing.assert_array_equal(
        wrapped.search(xq, 10, nprobe=8)[1], IVFPQIndex.load(path).search(xq, 10, nprobe=8)[1]
    )


def test_save_load_identical(trained, small_data, tmp_path) -> None:
    xq = small_data[2]
    path = tmp_path / "shard.faiss"
    trained.save(path)
    for name in (
        path,
        path.with_name("shard.faiss.json"),
        path.with_name("shard.faiss.vectors.npy"),
    ):
        assert name.stat().st_mode & 0o777 == 0o600
    for mmap in (False, True):
        loaded = IVFPQIndex.load(path, mmap=mmap)
        assert loaded.ntotal == trained.ntotal and loaded.params == trained.params
        D1, I1 = trained.search(xq, 10, nprobe=8)
        D2, I2 = loaded.search(xq, 10, nprobe=8)
        if trained.params.nbits == 8:
            np.testing.assert_array_equal(I1, I2)
            np.testing.assert_array_equal(D1, D2)
        else:
            assert_results_agree((D1, I1), (D2, I2))
        np.testing.assert_array_equal(np.sort(loaded.ids), np.sort(trained.ids))
        assert loaded.read_only is mmap
    with pytest.raises(ReadOnlyIndexError):
        loaded.remove([0])


def test_flipped_byte_detected(trained, tmp_path) -> None:
    path = tmp_path / "shard.faiss"
    trained.save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptIndexError, match="SHA-256") as e:
        IVFPQIndex.load(path)
    assert e.value.path == str(path)


def test_truncated_and_missing_files(trained, tmp_path) -> None:
    path = tmp_path / "shard.faiss"
    trained.save(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptIndexError, match="truncated"):
        IVFPQIndex.load(path)
    with pytest.raises(FileNotFoundError):
        IVFPQIndex.load(tmp_path / "nope.faiss")


def test_newer_format_version(trained, tmp_path) -> None:
    path = tmp_path / "shard.faiss"
    trained.save(path)
    meta_path = tmp_path / "shard.faiss.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(storage.seal(meta)))
    with pytest.raises(UnsupportedFormatError, match="upgrade fastface"):
        IVFPQIndex.load(path)
    meta["format_version"] = 2  # an edit without a new checksum
    meta["ntotal"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CorruptIndexError, match="checksum"):
        IVFPQIndex.load(path)


def test_remove_and_padding(small_data) -> None:
    xb = small_data[0]
    index = IVFPQIndex(IVFPQParams(32, 16, 8, metric="l2"))
    index.train(xb)
    index.add(xb[:5], ids=[10, 11, 12, 13, 14])
    assert index.remove([11, 12, 999]) == 2
    assert index.ntotal == 3 and sorted(index.ids.tolist()) == [10, 13, 14]
    D, I = index.search(xb[:2], 6, nprobe=16)
    assert (I[:, 3:] == -1).all() and np.isposinf(D[:, 3:]).all()
    assert set(I[:, :3].ravel().tolist()) == {10, 13, 14}
    # default ids continue after the largest one
    assert index.add(xb[5:7]).tolist() == [15, 16]


def test_ip_padding_is_minus_inf(small_data) -> None:
    xb = small_data[0]
    index = IVFPQIndex(IVFPQParams(32, 16, 8))
    index.train(xb)
    index.add(xb[:3])
    D, I = index.search(xb[:1], 5, nprobe=16)
    assert (I[0, 3:] == -1).all() and np.isneginf(D[0, 3:]).all()


class TestInputPolicy:
    @pytest.fixture()
    def index(self, small_data):
        index = IVFPQIndex(IVFPQParams(32, 16, 8))
        index.train(small_data[0])
        index.add(small_data[0][:100])
        return index

    def test_params(self) -> None:
        with pytest.raises(ValueError, match="must divide"):
            IVFPQParams(32, 16, 7)
        with pytest.raises(ValueError, match="nbits"):
            IVFPQParams(32, 16, 8, nbits=6)
        with pytest.raises(ValueError, match="metric"):
            IVFPQParams(32, 16, 8, metric="cos")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="positive"):
            IVFPQParams(0, 16, 8)
        with pytest.raises(TypeError):
            IVFPQParams(32, 16, 8, 8)  # type: ignore[misc]

    def test_float_dtypes_are_cast(self, index, small_data) -> None:
        q = small_data[2][:4]
        want = index.search(q, 5)
        np.testing.assert_array_equal(index.search(q.astype(np.float64), 5)[1], want[1])
        half = q.astype(np.float16)
        np.testing.assert_array_equal(
            index.search(half, 5)[1], index.search(half.astype(np.float32), 5)[1]
        )
        big = np.full((1, 32), 1e39)  # finite in float64, inf in float32
        with pytest.raises(ValueError, match="overflow float32"):
            index.search(big, 3)
        with pytest.raises(ValueError, match="overflow float32"):
            index.add(big)
        with pytest.raises(TypeError, match="float32"):
            index.search(q.astype(np.int32), 3)
        with pytest.raises(TypeError, match="numpy"):
            index.add([[0.0] * 32])
        assert index.ntotal == 100

    def test_one_dimensional_query_is_one_query(self, index, small_data) -> None:
        q = small_data[2][0]
        D, I = index.search(q, 5)
        assert D.shape == I.shape == (1, 5)
        np.testing.assert_array_equal(I, index.search(q[None, :], 5)[1])
        with pytest.raises(ValueError, match=r"\(n, 32\)"):
            index.search(np.zeros(16, np.float32), 3)
        with pytest.raises(ValueError, match="2-D"):
            index.add(np.zeros(32, np.float32))  # vectors to add must be 2-D

    def test_nonfinite(self, index) -> None:
        x = np.ones((3, 32), np.float32)
        x[1, 5] = np.nan
        with pytest.raises(ValueError, match="row 1"):
            index.add(x)
        x[1, 5] = np.inf
        with pytest.raises(ValueError, match="NaN or inf"):
            index.search(x, 2)
        assert index.ntotal == 100

    def test_k_and_nprobe(self, index, small_data) -> None:
        q = small_data[2][:2]
        with pytest.raises(ValueError, match="positive"):
            index.search(q, 0)
        with pytest.raises(ValueError, match="maximum"):
            index.search(q, MAX_K + 1)  # raises at once, allocates nothing
        with pytest.raises(ValueError, match="maximum"):
            index.search(q, 2**31)
        with pytest.raises(ValueError, match="nprobe=17 exceeds nlist=16"):
            index.search(q, 3, nprobe=17)
        with pytest.raises(ValueError, match="candidates"):
            index.search(q, 4096, rerank=4096)

    def test_ids_must_be_integers(self, index, small_data) -> None:
        with pytest.raises(TypeError, match="integer"):
            index.remove([1.7])
        with pytest.raises(TypeError, match="integer"):
            index.remove(np.array([1.0]))
        with pytest.raises(TypeError, match="bool"):
            index.remove(True)
        with pytest.raises(TypeError, match="integer"):
            index.contains(["1"])
        with pytest.raises(ValueError, match="int64"):
            index.remove([2**64])
        assert index.ntotal == 100 and index.contains([1]).all()
        with pytest.raises(TypeError, match="integer"):
            index.add(small_data[0][:1], ids=[3.0])

    def test_id_overflow(self, index, small_data) -> None:
        top = np.iinfo(np.int64).max
        index.add(small_data[0][:1], ids=[top])  # the largest id is an id
        with pytest.raises(OverflowError, match="2\\*\\*63"):
            index.add(small_data[0][:2])  # automatic ids would pass int64
        assert index.ntotal == 101

    def test_duplicate_ids(self, index, small_data) -> None:
        x = small_data[0][:3]
        with pytest.raises(ValueError, match="already in the index"):
            index.add(x, ids=[1, 500, 501])
        with pytest.raises(ValueError, match="duplicate ids in one call"):
            index.add(x, ids=[500, 500, 501])
        with pytest.raises(ValueError, match=">= 0"):
            index.add(x, ids=[-5, 500, 501])
        with pytest.raises(ValueError, match="expected 3 ids"):
            index.add(x, ids=[500, 501])
        assert index.ntotal == 100

    def test_untrained_and_empty(self, small_data) -> None:
        index = IVFPQIndex(IVFPQParams(32, 16, 8))
        with pytest.raises(NotTrainedError, match="train"):
            index.search(small_data[2], 3)
        with pytest.raises(NotTrainedError):
            index.add(small_data[0])
        with pytest.raises(ValueError, match="at least 256 vectors"):
            index.train(small_data[0][:100])
        index.train(small_data[0])
        with pytest.raises(EmptyIndexError, match="empty"):
            index.search(small_data[2], 3)
        # an empty shard scans to padding (a sharded index asks every shard)
        D, I = index.scan(small_data[2][:2], 3, index.assign(small_data[2][:2], 4))
        assert (I == -1).all() and np.isneginf(D).all()

    def test_not_an_ivfpq_file(self, tmp_path, index) -> None:
        path = tmp_path / "x.faiss"
        index.save(path)
        flat = faiss.IndexFlatIP(32)
        data = bytes(faiss.serialize_index(flat))
        path.write_bytes(data)
        meta_path = tmp_path / "x.faiss.json"
        meta = json.loads(meta_path.read_text())
        meta["data"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        meta_path.write_text(json.dumps(storage.seal(meta)))
        with pytest.raises(CorruptIndexError, match="not an IVF-PQ index") as e:
            IVFPQIndex.load(path)
        assert e.value.field == "kind"
