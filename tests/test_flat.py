"""The flat (exact) codec: shards of ids and vectors, searched exactly through the shard
contract; re-encoding a flat index to IVF-PQ with the same ids."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastface import FlatParams, IVFPQIndex, ShardedIndex
from fastface.errors import CorruptIndexError
from fastface.eval import assert_results_agree, ground_truth, recall_at_k
from fastface.kernels.exact import scores, topk


def brute(xb, ids, xq, k, metric="ip", exclude=()):
    """The obviously-right twin: every score, full sort by (score, lower id)."""
    S = scores(xq, xb, metric)
    keep = ~np.isin(ids, np.asarray(exclude, np.int64))
    return topk(S[:, keep], ids[keep], k, larger_is_better=metric == "ip")


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("store", ["float32", "float16"])
def test_flat_shard_is_exact(small_data, metric, store) -> None:
    xb, _, xq, _ = small_data
    index = IVFPQIndex(FlatParams(32, metric=metric, store_vectors=store))
    assert index.is_trained and index.params.spec == ("Flat" if store == "float32" else "Flat,F16")
    ids = np.arange(xb.shape[0], dtype=np.int64)[::-1].copy() * 3  # any ids, any order
    index.add(xb, ids)
    stored = xb.astype(store).astype(np.float32)
    got = index.search(xq, 10)
    want = brute(stored, ids, xq, 10, metric)
    assert_results_agree(got, want, atol=1e-5)
    # the contract's steps compose the same way as for IVF-PQ
    a = index.assign(xq, 1)
    assert a[1].shape == (xq.shape[0], 1) and (a[1] == 0).all()
    assert_results_agree(index.scan(xq, 10, a), want, atol=1e-5)
    assert_results_agree(index.rescore(xq, got[1], 10), want, atol=1e-5)
    # exclusions are skipped, never returned, and k results still come back
    ex = got[1][:, :3].ravel()
    D, I = index.scan(xq, 10, a, exclude=ex)
    assert not np.isin(I, ex).any() and (I >= 0).all()
    assert_results_agree((D, I), brute(stored, ids, xq, 10, metric, ex), atol=1e-5)


def test_flat_ties_are_broken_by_lower_id() -> None:
    x = np.zeros((50, 8), np.float32)
    x[:, 0] = 1.0  # every vector scores the same
    index = IVFPQIndex(FlatParams(8))
    ids = np.random.default_rng(0).permutation(1000)[:50].astype(np.int64)
    index.add(x, ids)
    D, I = index.search(x[:2], 7)
    np.testing.assert_array_equal(I, np.tile(np.sort(ids)[:7], (2, 1)))
    # k larger than what is held: padded
    D, I = index.search(x[:1], 60)
    assert (I[0, 50:] == -1).all() and np.isneginf(D[0, 50:]).all()


def test_flat_sharded_agrees_with_one_shard_and_survives_reopen(tmp_path, small_data) -> None:
    xb, _, xq, _ = small_data
    with ShardedIndex.create(tmp_path / "f", "Flat,F16", d=32, shard_size=900) as index:
        index.add(xb)
        assert index.nshards == 5 and index.is_trained
        files = sorted(p.name for p in (tmp_path / "f").iterdir())
        assert not any(f.startswith("shard-") and f.endswith(".faiss") for f in files)
        one = IVFPQIndex(FlatParams(32, store_vectors="float16"))
        one.add(xb)
        want = one.search(xq, 10)
        assert_results_agree(index.search(xq, 10), want, atol=1e-5)
        removed = want[1][:, 0]
        index.remove(removed)
        _, I = index.search(xq, 10)
        assert not np.isin(I, removed).any()
        index.compact()
        after = index.search(xq, 10)
    man = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert man["spec"] == "Flat,F16" and man["params"]["kind"] == "flat"
    for mmap in (False, True):
        with ShardedIndex.open(tmp_path / "f", mmap=mmap) as again:
            assert_results_agree(again.search(xq, 10), after, atol=0)


def test_flat_single_shard_save_load(tmp_path, small_data) -> None:
    xb, _, xq, _ = small_data
    index = IVFPQIndex(FlatParams(32))
    index.add(xb[:500], np.arange(500, 1000))
    index.save(tmp_path / "f.faiss")
    back = IVFPQIndex.load(tmp_path / "f.faiss")
    assert_results_agree(back.search(xq, 5), index.search(xq, 5), atol=0)
    assert back.to_faiss().ntotal == 500
    raw = bytearray((tmp_path / "f.faiss.ids.npy").read_bytes())
    raw[-1] ^= 1
    (tmp_path / "f.faiss.ids.npy").write_bytes(bytes(raw))
    with pytest.raises(CorruptIndexError, match="ids"):
        IVFPQIndex.load(tmp_path / "f.faiss")


def test_reencode_flat_to_ivfpq_keeps_ids(tmp_path, small_data) -> None:
    xb, _, xq, _ = small_data
    ids = np.arange(xb.shape[0], dtype=np.int64) + 10_000
    with ShardedIndex.create(tmp_path / "f", "Flat", d=32, shard_size=1500) as flat:
        flat.add(xb, ids)
        gone = ids[::7]
        flat.remove(gone)
        big = flat.reencode(tmp_path / "ivf", "IVF32,PQ8,F16", shard_size=1000)
        exact = flat.search(xq, 10)
    with big:
        assert big.params.spec == "IVF32,PQ8,F16" and big.ntotal == xb.shape[0] - gone.size
        assert not big.contains(gone).any() and big.contains(np.setdiff1d(ids, gone)).all()
        want = xb[1:3].astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(big.get_vectors(ids[1:3]), want)
        _, I = big.search(xq, 10, nprobe=32, rerank=8)
        assert recall_at_k(I, exact[1], 10) >= 0.9
        # new ids continue after every id the flat index ever used
        assert big.add(xb[:1])[0] == ids.max() + 1
    with ShardedIndex.open(tmp_path / "f") as flat, pytest.raises(ValueError, match="must match"):
        flat.reencode(tmp_path / "x", FlatParams(16))


def test_flat_truth_on_ground_truth_helper(small_data) -> None:
    """The flat index and fastface.eval.ground_truth are two routes to the same answer."""
    xb, _, xq, _ = small_data
    index = IVFPQIndex("Flat", d=32)
    index.add(xb)
    assert_results_agree(index.search(xq, 10), ground_truth(xb, xq, 10), atol=1e-5)


def test_flat_train_is_a_checked_no_op(tmp_path, small_data) -> None:
    """As FAISS's IndexFlat.train: code written for any index may call train on a flat one."""
    xb, _, xq, _ = small_data
    with ShardedIndex.create(tmp_path / "f", "Flat", d=32) as index:
        index.train(xb)
        index.add(xb)
        with pytest.raises(ValueError, match="d=32"):
            index.train(xb[:, :16])
        assert index.ntotal == len(xb)
    one = IVFPQIndex(FlatParams(32))
    one.train(xb)
    with pytest.raises(TypeError):
        one.train(xb.astype(np.int32))
    one.add(xb)
    assert one.search(xq, 1)[1][:, 0].min() >= 0


def test_flat_shards_are_staged_and_adopted(tmp_path) -> None:
    """A distributed build stages shards and one writer adopts them: a flat shard has no
    FAISS file (its vectors are its data), so it stages ids and vectors only."""
    x = np.random.default_rng(3).standard_normal((250, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # each row's nearest is itself
    src = ShardedIndex.build(x, tmp_path / "a", "Flat", shard_size=100)
    path = tmp_path / "b"
    with ShardedIndex.create(path, src.codec, shard_size=100) as w:
        recs = [ShardedIndex.stage_shard(path, i, s) for i, s in enumerate(src.shards())]
        assert all(sorted(r["files"]) == ["ids", "vectors"] for r in recs)
        victim = path / ".staging" / recs[2]["files"]["vectors"]["file"]
        good = victim.read_bytes()
        victim.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        with pytest.raises(CorruptIndexError, match="SHA-256"):
            w.adopt(recs)
        assert w.nshards == 0  # nothing adopted
        victim.write_bytes(good)
        assert w.adopt(recs) == [0, 1, 2]
    with ShardedIndex.open(path) as b:
        assert b.shard_counts == [100, 100, 50]
        D, I = b.search(x, 5)
        D0, I0 = src.search(x, 5)
        assert (I == I0).all() and (D == D0).all()
        assert (I[:, 0] == np.arange(250)).all()
