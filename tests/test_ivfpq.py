"""One IVF-PQ shard: recall against brute force, persistence, bad input."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from fastface import IVFPQIndex, IVFPQParams
from fastface.errors import (
    CorruptIndexError,
    EmptyIndexError,
    NotTrainedError,
    ReadOnlyIndexError,
    UnsupportedFormatError,
)
from fastface.eval import ground_truth, recall_at_k


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
    xq = small_data[2]
    D, I = trained.search(xq, 10, nprobe=8)
    raw = trained._index
    raw.nprobe = 8
    Df, If = raw.search(xq, 10)
    np.testing.assert_array_equal(I, If)
    np.testing.assert_allclose(D, Df, rtol=1e-6)


def test_save_load_identical(trained, small_data, tmp_path) -> None:
    xq = small_data[2]
    path = tmp_path / "shard.faiss"
    trained.save(path)
    for mmap in (False, True):
        loaded = IVFPQIndex.load(path, mmap=mmap)
        assert loaded.ntotal == trained.ntotal and loaded.params == trained.params
        D1, I1 = trained.search(xq, 10, nprobe=8)
        D2, I2 = loaded.search(xq, 10, nprobe=8)
        np.testing.assert_array_equal(I1, I2)
        np.testing.assert_array_equal(D1, D2)
        np.testing.assert_array_equal(np.sort(loaded.ids), np.sort(trained.ids))
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
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UnsupportedFormatError, match="upgrade fastface"):
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


class TestBadInput:
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

    def test_dtype_shape_dimension(self, index) -> None:
        q = np.zeros((2, 32), np.float64)
        with pytest.raises(TypeError, match=r"astype\(np.float32\)"):
            index.search(q, 3)
        with pytest.raises(ValueError, match=r"d=32"):
            index.search(np.zeros((2, 16), np.float32), 3)
        with pytest.raises(ValueError, match="2-D"):
            index.search(np.zeros(32, np.float32), 3)
        with pytest.raises(TypeError, match="numpy"):
            index.add([[0.0] * 32])

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
        with pytest.raises(ValueError, match="nprobe=17 exceeds nlist=16"):
            index.search(q, 3, nprobe=17)

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

    def test_not_a_faiss_file(self, tmp_path, index) -> None:
        path = tmp_path / "x.faiss"
        index.save(path)
        flat = faiss.IndexFlatIP(32)
        data = bytes(faiss.serialize_index(flat))
        path.write_bytes(data)
        meta = json.loads((tmp_path / "x.faiss.json").read_text())
        import hashlib

        meta["data"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        (tmp_path / "x.faiss.json").write_text(json.dumps(meta))
        with pytest.raises(CorruptIndexError, match="expected an IVF-PQ index"):
            IVFPQIndex.load(path)
