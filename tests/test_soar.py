"""Spilled assignment (SOAR): two lists per vector, each id returned once, nothing left behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fastface import Codec, IVFPQIndex, IVFPQParams, ShardedIndex
from fastface.datasets import SyntheticFaces
from fastface.errors import CorruptIndexError
from fastface.eval import ground_truth, recall_at_k
from fastface.index import storage
from fastface.index.lists import ListRun
from fastface.index.soar import SPILL_CANDIDATES, spill_lists

D_DIM, NLIST, M = 32, 32, 8
# ids whose 8 bytes occur nowhere else, so that a byte scan of the files finds only them
ID_BASE = 0x5A17_0000_0000_0000


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    gen = SyntheticFaces(400, 10, D_DIM, seed=11, n_groups=20)
    xb, _ = gen.vectors()
    xq, _ = gen.queries(40, seed=3)
    return xb, xq


@pytest.fixture(scope="module")
def codecs(data) -> dict[str, Codec]:
    xb, _ = data
    return {
        m: Codec.train(
            IVFPQParams(D_DIM, NLIST, M, metric=m, store_vectors="float32"), xb
        ).with_soar(1.0)
        for m in ("ip", "l2")
    }


def _soar_index(codec: Codec, xb: np.ndarray, ids: np.ndarray | None = None) -> IVFPQIndex:
    index = IVFPQIndex(codec)
    index.add(xb[:2500], None if ids is None else ids[:2500])
    index.add(xb[2500:], None if ids is None else ids[2500:])  # two runs of lists
    return index


def _entries(index: IVFPQIndex) -> tuple[np.ndarray, np.ndarray]:
    """(list number, id) of every list entry."""
    lists, ids = [], []
    for run in index.list_runs:
        lists.append(np.repeat(np.arange(run.nlist), run.count))
        ids.append(run.list_ids())
    return np.concatenate(lists), np.concatenate(ids)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_every_vector_is_in_two_different_lists(data, codecs, metric: str) -> None:
    xb, _ = data
    index = _soar_index(codecs[metric], xb)
    lists, ids = _entries(index)
    assert ids.size == 2 * xb.shape[0] == 2 * index.ntotal
    order = np.lexsort((lists, ids))
    pairs = lists[order].reshape(-1, 2)
    assert np.array_equal(ids[order].reshape(-1, 2)[:, 0], np.arange(xb.shape[0]))
    assert (pairs[:, 0] != pairs[:, 1]).all()
    first, _ = codecs[metric].encode(xb)
    own = np.sort(np.stack([first, spill_lists(codecs[metric], xb, first, 1.0)], 1), 1)
    assert np.array_equal(np.sort(pairs, 1), own)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_search_equals_brute_force_when_every_list_is_probed(data, codecs, metric: str) -> None:
    xb, xq = data
    index = _soar_index(codecs[metric], xb)
    k = 10
    gD, gI = ground_truth(xb, xq, k, metric=metric)
    # every list probed and every vector a candidate: the exact answer, each id once
    D, I = index.search(xq, k, nprobe=NLIST, rerank=xb.shape[0] // k)
    np.testing.assert_array_equal(I, gI)
    np.testing.assert_allclose(D, gD, rtol=1e-5, atol=1e-5)
    # the PQ scan alone over every list returns every vector exactly once
    _, Iall = index.scan(xq[:3], xb.shape[0], index.assign(xq[:3], NLIST))
    for row in Iall:
        assert np.array_equal(np.sort(row), np.arange(xb.shape[0]))


def _dedup_twin(index: IVFPQIndex, q: np.ndarray, k: int, nprobe: int, exclude=()):
    """The spilled scan from a plain scan: second entries get ids shifted by ``shift``, a
    plain index scans every entry, then each id keeps its best entry (ties by lower id)."""
    codec = index.codec
    lists, ids = _entries(index)
    codes = np.concatenate([run.to_csr()[0] for run in index.list_runs])
    shift = 10**9
    second = np.zeros(ids.size, bool)
    seen: set[int] = set()
    for j, i in enumerate(ids.tolist()):
        second[j] = i in seen
        seen.add(i)
    twin_ids = np.where(second, ids + shift, ids)
    order = np.argsort(lists, kind="stable")
    count = np.bincount(lists, minlength=codec.params.nlist)
    plain = IVFPQIndex.from_parts(
        codec.with_soar(None).with_storage(None),
        twin_ids,
        runs=(ListRun.csr(codes[order], twin_ids[order], count),),
    )
    ex = np.concatenate([np.asarray(exclude, np.int64), np.asarray(exclude, np.int64) + shift])
    D, I = plain.scan(q, twin_ids.size, plain.assign(q, nprobe), exclude=ex)
    I = np.where(shift <= I, I - shift, I)
    larger = codec.params.larger_is_better
    outD = np.full((q.shape[0], k), codec.params.pad_score, np.float32)
    outI = np.full((q.shape[0], k), -1, np.int64)
    for r in range(q.shape[0]):
        valid = I[r] >= 0
        s, i = D[r][valid], I[r][valid]
        o = np.lexsort((i, -s if larger else s))
        _, first = np.unique(i[o], return_index=True)
        keep = o[np.sort(first)][:k]
        outD[r, : keep.size] = s[keep]
        outI[r, : keep.size] = i[keep]
    return outD, outI


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_scan_keeps_each_ids_best_entry_bit_for_bit(data, codecs, metric: str) -> None:
    xb, xq = data
    # duplicated vectors (ids 3 and 4000 hold one vector): equal scores, lower id first
    x = np.concatenate([xb, xb[3:4]])
    index = _soar_index(codecs[metric], x)
    exclude = [5, 17, 3999]
    for nprobe, k in ((1, 5), (3, 20), (8, 50), (NLIST, 200)):
        got = index.scan(xq[:10], k, index.assign(xq[:10], nprobe), exclude=exclude)
        want = _dedup_twin(index, xq[:10], k, nprobe, exclude)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
        assert not np.isin(got[1], exclude).any()
        for row in got[1]:
            row = row[row >= 0]
            assert np.unique(row).size == row.size


def test_soar_raises_recall_at_the_same_nprobe(data, codecs) -> None:
    xb, xq = data
    gen = SyntheticFaces(400, 10, D_DIM, seed=11, n_groups=20)
    xq, _ = gen.queries(300, seed=5)
    _, gI = ground_truth(xb, xq, 10)
    codec = codecs["ip"]
    spilled = _soar_index(codec, xb)
    plain = IVFPQIndex(codec.with_soar(None))
    plain.add(xb)
    for nprobe in (1, 2):
        with_soar = recall_at_k(spilled.search(xq, 10, nprobe=nprobe, rerank=8)[1], gI, 10)
        without = recall_at_k(plain.search(xq, 10, nprobe=nprobe, rerank=8)[1], gI, 10)
        assert with_soar > without + 0.02, (nprobe, with_soar, without)


def test_spill_choice_minimises_the_soar_loss_row_by_row(data, codecs) -> None:
    xb, _ = data
    codec = codecs["l2"]
    x = xb[:300]
    first, _ = codec.encode(x)
    got = spill_lists(codec, x, first, 1.0)
    # the same choice whatever the batch (each row's choice depends on that row alone)
    parts = [spill_lists(codec, x[s : s + 7], first[s : s + 7], 1.0) for s in range(0, 300, 7)]
    np.testing.assert_array_equal(np.concatenate(parts), got)
    # NumPy twin in float64 over the candidate lists
    C = codec.centroids.astype(np.float64)
    _, cand = codec.assign(x, min(NLIST, SPILL_CANDIDATES + 1))
    for i in range(x.shape[0]):
        r = x[i] - C[first[i]]
        rp = x[i] - C[cand[i]]
        loss = (rp**2).sum(1) + (rp @ r) ** 2 / (r @ r)
        loss[cand[i] == first[i]] = np.inf
        assert got[i] != first[i]
        best = loss.min()
        chosen = loss[cand[i] == got[i]][0]
        assert chosen <= best + 1e-5 * max(1.0, abs(best))
    # lambda = 0: the nearest list other than the first
    near = spill_lists(codec, x, first, 0.0)
    _, top2 = codec.assign(x, 2)
    want = np.where(top2[:, 0] == first, top2[:, 1], top2[:, 0])
    assert (near == want).mean() > 0.99  # float rounding may swap near-equal lists


def test_removed_vector_disappears_from_both_lists(data, codecs) -> None:
    xb, _xq = data
    index = _soar_index(codecs["ip"], xb)
    gone = np.array([0, 7, 3333])
    assert index.remove(gone) == 3
    _lists, ids = _entries(index)
    assert not np.isin(ids, gone).any()
    assert ids.size == 2 * (xb.shape[0] - 3) == 2 * index.ntotal
    _D, I = index.search(xb[gone], 5, nprobe=NLIST)
    assert not np.isin(I, gone).any()


def test_save_load_and_faiss_file(data, codecs, tmp_path: Path) -> None:
    xb, xq = data
    index = _soar_index(codecs["l2"], xb)
    index.save(tmp_path / "s.faiss")
    meta = json.loads((tmp_path / "s.faiss.json").read_text())
    assert meta["params"]["soar_lambda"] == 1.0
    back = IVFPQIndex.load(tmp_path / "s.faiss")
    assert back.params.soar_lambda == 1.0
    for mmap in (False, True):
        back = IVFPQIndex.load(tmp_path / "s.faiss", mmap=mmap)
        a = index.search(xq, 10, nprobe=4, rerank=4)
        b = back.search(xq, 10, nprobe=4, rerank=4)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])
    # FAISS reads the file; it holds every vector twice
    import faiss

    f = faiss.read_index(str(tmp_path / "s.faiss"))
    assert f.ntotal == 2 * xb.shape[0]
    # a wrapped FAISS index with every id in two lists is taken back as spilled
    again = IVFPQIndex.from_faiss(index.params, f, ids=index.ids, vectors=index.vectors)
    assert again.ntotal == xb.shape[0]
    np.testing.assert_array_equal(
        again.search(xq, 10, nprobe=4, rerank=4)[1], index.search(xq, 10, nprobe=4, rerank=4)[1]
    )
    with pytest.raises(ValueError, match="exactly 2 times"):
        IVFPQIndex.from_faiss(
            index.params.__class__(
                D_DIM, NLIST, M, metric="l2", soar_lambda=1.0, store_vectors=None
            ),
            _single(f),
        )


def _single(f):
    """A FAISS index with ``f``'s codec holding every id once (passed as a temporary)."""
    import faiss

    g = faiss.clone_index(f)
    g.reset()
    xs = np.random.default_rng(0).standard_normal((300, D_DIM)).astype(np.float32)
    g.add(xs)
    return g


def test_manifest_that_claims_spilling_over_single_lists_is_refused(data, tmp_path) -> None:
    xb, _ = data
    plain = IVFPQIndex(IVFPQParams(D_DIM, NLIST, M, store_vectors=None))
    plain.train(xb)
    plain.add(xb)
    path = tmp_path / "p.faiss"
    plain.save(path)
    meta = json.loads(path.with_name("p.faiss.json").read_text())
    assert "soar_lambda" not in meta["params"]  # records without spilling are unchanged
    meta.pop("checksum", None)
    meta["params"]["soar_lambda"] = 1.0
    storage.atomic_write_json(path.with_name("p.faiss.json"), storage.seal(meta))
    with pytest.raises(CorruptIndexError, match="ntotal"):
        IVFPQIndex.load(path)
    # lists holding ids once, given as a spilled shard's parts
    run = plain.list_runs[0]
    with pytest.raises(CorruptIndexError, match="two lists"):
        IVFPQIndex.from_parts(plain.codec.with_soar(1.0), plain.ids, runs=(run,))


class TestParams:
    def test_validation(self) -> None:
        assert IVFPQParams(32, 16, 8, soar_lambda=1).soar_lambda == 1.0
        assert IVFPQParams(32, 16, 8, soar_lambda=0.5).max_copies == 2
        assert IVFPQParams(32, 16, 8).max_copies == 1
        for bad, err in (
            (-1.0, ValueError),
            (float("nan"), ValueError),
            (True, TypeError),
            ("1", TypeError),
        ):
            with pytest.raises(err, match="soar_lambda"):
                IVFPQParams(32, 16, 8, soar_lambda=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="8-bit"):
            IVFPQParams(32, 16, 8, nbits=4, soar_lambda=1.0)
        with pytest.raises(ValueError, match="nlist >= 2"):
            IVFPQParams(32, 1, 8, soar_lambda=1.0)

    def test_dict_round_trip(self) -> None:
        p = IVFPQParams(32, 16, 8, soar_lambda=1.5)
        assert IVFPQParams.from_dict(p.to_dict()) == p
        assert "soar_lambda" not in IVFPQParams(32, 16, 8).to_dict()
        with pytest.raises(TypeError, match="soar_lambda"):
            IVFPQParams.from_dict({**p.to_dict(), "soar_lambda": [1]})

    def test_codec_equality_ignores_spilling(self, codecs) -> None:
        c = codecs["ip"]
        assert c == c.with_soar(None)
        assert c.with_soar(None).params.soar_lambda is None


# --- a directory of shards ---------------------------------------------------------------------


def _build(path: Path, codec: Codec, xb: np.ndarray, shard_size: int) -> ShardedIndex:
    index = ShardedIndex.create(path, codec, shard_size=shard_size)
    ids = ID_BASE + np.arange(xb.shape[0], dtype=np.int64)
    index.add(xb[:1700], ids[:1700])
    index.add(xb[1700:], ids[1700:])
    return index


def test_shardings_and_strategies_agree(data, codecs, tmp_path: Path) -> None:
    xb, xq = data
    codec = codecs["ip"].with_storage("float16")
    one = _build(tmp_path / "one", codec, xb, shard_size=xb.shape[0])
    many = _build(tmp_path / "many", codec, xb, shard_size=900)
    assert many.nshards == 5
    ref = one.search(xq, 10, nprobe=3)
    for index in (one, many):
        for strategy in ("stacked", "fanout"):
            got = index.search(xq, 10, nprobe=3, strategy=strategy)
            np.testing.assert_array_equal(got[1], ref[1])
            np.testing.assert_array_equal(got[0], ref[0])
        got = index.search(xq, 10, nprobe=3, rerank=4)
        np.testing.assert_array_equal(got[1], one.search(xq, 10, nprobe=3, rerank=4)[1])
    many.close()
    reopened = ShardedIndex.open(tmp_path / "many", mmap=True)
    np.testing.assert_array_equal(reopened.search(xq, 10, nprobe=3)[1], ref[1])
    one.close()


def _file_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(path.iterdir()) if p.is_file())


def test_removed_then_compacted_vector_leaves_no_copy(data, codecs, tmp_path: Path) -> None:
    xb, _xq = data
    codec = codecs["ip"].with_storage("float16")
    index = _build(tmp_path / "idx", codec, xb, shard_size=1500)
    victims = np.array([2, 1600, 3100])
    vid = ID_BASE + victims
    patterns = [int(i).to_bytes(8, "little", signed=True) for i in vid]
    patterns += [xb[v].astype(np.float16).tobytes() for v in victims]
    before = _file_bytes(tmp_path / "idx")
    for p in patterns:
        # each id twice in a shard file (two lists) and once in its ids file
        assert before.count(p) >= (3 if len(p) == 8 else 1)
    assert index.remove(vid) == 3
    # gone from searches at once, from both lists (tombstones in sealed shards)
    _, I = index.search(xb[victims], 10, nprobe=NLIST)
    assert not np.isin(I, vid).any()
    _, I = index.search(xb[victims], 10, nprobe=NLIST, rerank=4)
    assert not np.isin(I, vid).any()
    index.compact()
    after = _file_bytes(tmp_path / "idx")
    for p in patterns:
        assert after.count(p) == 0
    # every other vector is still there, in two lists
    keep = np.setdiff1d(np.arange(xb.shape[0]), victims)
    assert index.ntotal == keep.size
    for shard in index.shards():
        lists = [run.list_ids() for run in shard.list_runs]
        held = np.concatenate(lists)
        assert held.size == 2 * shard.ntotal
    _D, I = index.search(xb[keep[:20]], 1, nprobe=NLIST, rerank=4)
    assert np.array_equal(I[:, 0], ID_BASE + keep[:20])
    index.close()
    reopened = ShardedIndex.open(tmp_path / "idx")
    assert reopened.params.soar_lambda == 1.0
    assert reopened.ntotal == keep.size


def test_spilling_over_an_opq_hnsw_codec(data) -> None:
    """With an OPQ rotation (and an HNSW coarse quantizer) residuals are taken in the rotated
    space, where the centroids live; every list probed still gives the exact answer."""
    xb, xq = data
    params = IVFPQParams(
        D_DIM, NLIST, M, metric="l2", store_vectors="float32", opq=M, coarse_hnsw=16
    )
    codec = Codec.train(params, xb, seed=1).with_soar(1.0)
    assert codec.rotation is not None
    x = xb[:200]
    first, _ = codec.encode(x)
    got = spill_lists(codec, x, first, 1.0)
    assert (got != first).all()
    # NumPy twin in float64, in the rotated space
    xr = (x @ codec.rotation.T).astype(np.float64)
    C = codec.centroids.astype(np.float64)
    _, cand = codec.assign(x, min(NLIST, SPILL_CANDIDATES + 1))
    for i in range(x.shape[0]):
        c = cand[i][cand[i] >= 0]
        r = xr[i] - C[first[i]]
        rp = xr[i] - C[c]
        loss = (rp**2).sum(1) + (rp @ r) ** 2 / (r @ r)
        loss[c == first[i]] = np.inf
        assert loss[c == got[i]][0] <= loss.min() + 1e-5 * max(1.0, abs(loss.min()))
    index = _soar_index(codec, xb)
    assert index.list_sizes().sum() == 2 * xb.shape[0]
    gD, gI = ground_truth(xb, xq, 10, metric="l2")
    D, I = index.search(xq, 10, nprobe=NLIST, rerank=xb.shape[0] // 10)
    np.testing.assert_array_equal(I, gI)
    np.testing.assert_allclose(D, gD, rtol=1e-5, atol=1e-5)


def test_streaming_build_of_a_spilled_index(data, tmp_path: Path) -> None:
    """``ShardedIndex.build`` (streamed, committed per shard, shards mapped back from their
    files) holds two entries per vector and gives the exact answer with every list probed."""
    xb, xq = data
    params = IVFPQParams(D_DIM, NLIST, M, store_vectors="float32", soar_lambda=1.0)
    index = ShardedIndex.build(xb, tmp_path / "b", params, shard_size=1500, progress=False)
    assert index.nshards == 3 and index.ntotal == xb.shape[0]
    assert sum(int(s.list_sizes().sum()) for s in index.shards()) == 2 * xb.shape[0]
    _, gI = ground_truth(xb, xq, 10)
    I = index.search(xq, 10, nprobe=NLIST, rerank=xb.shape[0] // 10)[1]
    np.testing.assert_array_equal(I, gI)
    index.close()
    again = ShardedIndex.open(tmp_path / "b")
    np.testing.assert_array_equal(again.search(xq, 10, nprobe=NLIST, rerank=500)[1], gI)
    again.close()
