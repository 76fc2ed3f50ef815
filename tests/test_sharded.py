"""Sharded index: equivalence with one shard, persistence, crash-resume, corruption, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastface import IVFPQIndex, IVFPQParams, ShardedIndex
from fastface.datasets import write_fvecs
from fastface.errors import (
    CorruptIndexError,
    EmptyIndexError,
    IndexLockedError,
    NotTrainedError,
    ReadOnlyIndexError,
    UnsupportedFormatError,
)
from fastface.eval import ground_truth, recall_at_k

PARAMS = IVFPQParams(32, 32, 8)


def assert_same_results(a, b) -> None:
    """Equal scores rank by rank; equal ids wherever the score is not tied.

    A tie inside the list may come in either order, and a tie with the k-th score
    may be cut differently at the boundary (faiss check_ref_knn_with_draws).
    """
    Da, Ia = a
    Db, Ib = b
    np.testing.assert_array_equal(Da, Db)
    tied = np.zeros_like(Da, bool)
    tied[:, 1:] |= Da[:, 1:] == Da[:, :-1]
    tied[:, :-1] |= Da[:, :-1] == Da[:, 1:]
    tied |= Da == Da[:, -1:]
    np.testing.assert_array_equal(Ia[~tied], Ib[~tied])
    for q in range(Da.shape[0]):
        inner = tied[q] & (Da[q] != Da[q, -1])
        assert sorted(Ia[q][inner].tolist()) == sorted(Ib[q][inner].tolist())


@pytest.fixture()
def sharded(tmp_path, small_data):
    xb = small_data[0]
    index = ShardedIndex.create(tmp_path / "idx", PARAMS, shard_size=1000)
    index.train(xb)
    index.add(xb)
    yield index
    index.close()


def unsharded_twin(index: ShardedIndex, xb: np.ndarray) -> IVFPQIndex:
    twin = IVFPQIndex.from_faiss(index.params, faiss.clone_index(index._codec), ())
    twin.add(xb, ids=np.arange(xb.shape[0]))
    return twin


def test_sharded_equals_unsharded(sharded, small_data) -> None:
    xb, _, xq, _ = small_data
    assert sharded.nshards == 4 and sharded.shard_counts == [1000] * 4
    twin = unsharded_twin(sharded, xb)
    for nprobe in (1, 8, 32):
        assert_same_results(
            sharded.search(xq, 10, nprobe=nprobe), twin.search(xq, 10, nprobe=nprobe)
        )
        # the fan-out (thread pool + native merge) and the stacked scan agree
        assert_same_results(
            sharded.search(xq, 10, nprobe=nprobe, strategy="fanout"),
            sharded.search(xq, 10, nprobe=nprobe, strategy="stacked"),
        )


def test_fastscan_shards_equal_unsharded(tmp_path, small_data) -> None:
    xb, _, xq, _ = small_data
    with ShardedIndex.create(
        tmp_path / "fs", IVFPQParams(32, 16, 16, nbits=4), shard_size=1500
    ) as index:
        index.train(xb)
        index.add(xb)
        twin = unsharded_twin(index, xb)
        for nprobe in (1, 16):
            assert_same_results(
                index.search(xq, 10, nprobe=nprobe), twin.search(xq, 10, nprobe=nprobe)
            )
        with pytest.raises(ValueError, match="8-bit"):
            index.search(xq, 10, strategy="stacked")


def test_recall(sharded, small_data) -> None:
    xb, _, xq, _ = small_data
    _, gt = ground_truth(xb, xq, 10)
    _, I = sharded.search(xq, 10, nprobe=32)
    assert recall_at_k(I, gt, 10) >= 0.80


def test_reopen_identical(sharded, small_data, tmp_path) -> None:
    xq = small_data[2]
    before = sharded.search(xq, 10, nprobe=8)
    sharded.close()
    for mmap in (False, True):
        with ShardedIndex.open(tmp_path / "idx", mmap=mmap) as again:
            after = again.search(xq, 10, nprobe=8)
            np.testing.assert_array_equal(before[0], after[0])
            np.testing.assert_array_equal(before[1], after[1])
            with pytest.raises(ReadOnlyIndexError, match="mode='a'"):
                again.add(xq)


def test_remove_across_shards_and_compact(sharded, small_data, tmp_path) -> None:
    xb, _, xq, _ = small_data
    gone = np.array([3, 999, 1000, 2500, 3999, 123456])
    assert sharded.remove(gone) == 5
    assert sharded.ntotal == 3995 and sharded.pending_removals == 5
    for strategy in ("stacked", "fanout"):
        _D, I = sharded.search(xb[[3, 999, 1000, 2500, 3999]], 10, nprobe=32, strategy=strategy)
        assert not np.isin(I, gone).any()
        assert (I >= 0).all()  # still k results
    files_before = set(os.listdir(tmp_path / "idx"))
    stats = sharded.compact()
    assert stats == {"removed": 5, "shards_rewritten": 4}
    assert sharded.pending_removals == 0 and sharded.ntotal == 3995
    after = set(os.listdir(tmp_path / "idx"))
    assert not any(n.startswith("tombstones") for n in after)
    # every shard held a removed id, so every shard file is new; lock, manifest, codec stay
    assert {n for n in files_before & after if not n.startswith("codec")} == {
        ".lock",
        "manifest.json",
    }
    twin = unsharded_twin(sharded, xb)
    twin.remove(gone)
    assert_same_results(sharded.search(xq, 10, nprobe=8), twin.search(xq, 10, nprobe=8))
    # removed ids are reusable after compaction
    sharded.add(xb[:1], ids=[3])
    assert sharded.contains([3, 999]).tolist() == [True, False]


def test_tombstoned_id_cannot_be_reused_before_compaction(sharded, small_data) -> None:
    sharded.remove([5])
    with pytest.raises(ValueError, match="awaits compact"):
        sharded.add(small_data[0][:1], ids=[5])


def test_open_shard_survives_reopen(tmp_path, small_data) -> None:
    xb = small_data[0]
    with ShardedIndex.create(tmp_path / "i", PARAMS, shard_size=3000) as index:
        index.train(xb)
        index.add(xb[:2500])
        index.add(xb[2500:3500])
        index.remove([3200])  # in the open shard: dropped at once
    with ShardedIndex.open(tmp_path / "i", mode="a") as index:
        assert index.shard_counts == [3000, 499]
        assert index.pending_removals == 0
        assert index.add(xb[3500:3502]).tolist() == [3500, 3501]


def test_flipped_byte_names_the_file(sharded, tmp_path) -> None:
    sharded.close()
    man = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    victim = tmp_path / "idx" / man["shards"][2]["files"]["index"]["file"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x40
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptIndexError) as e:
        ShardedIndex.open(tmp_path / "idx")
    assert e.value.path == str(victim) and victim.name in str(e.value)


def test_missing_truncated_and_newer(sharded, tmp_path) -> None:
    sharded.close()
    d = tmp_path / "idx"
    man = json.loads((d / "manifest.json").read_text())
    ids_file = d / man["shards"][0]["files"]["ids"]["file"]
    saved = ids_file.read_bytes()
    ids_file.write_bytes(saved[:-8])
    with pytest.raises(CorruptIndexError, match="truncated"):
        ShardedIndex.open(d)
    ids_file.unlink()
    with pytest.raises(CorruptIndexError, match="missing"):
        ShardedIndex.open(d)
    ids_file.write_bytes(saved)
    man["format_version"] = 7
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(UnsupportedFormatError, match="version 7"):
        ShardedIndex.open(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptIndexError, match="not valid JSON"):
        ShardedIndex.open(d)
    with pytest.raises(FileNotFoundError):
        ShardedIndex.open(tmp_path / "elsewhere")


def test_writer_lock(sharded, tmp_path) -> None:
    with pytest.raises(IndexLockedError, match="another process"):
        ShardedIndex.open(tmp_path / "idx", mode="a")
    # readers are not blocked
    with ShardedIndex.open(tmp_path / "idx") as reader:
        assert reader.ntotal == 4000


def test_bad_input(tmp_path, small_data) -> None:
    xb, _, xq, _ = small_data
    with pytest.raises(TypeError, match="IVFPQParams"):
        ShardedIndex.create(tmp_path / "a", {"d": 32})  # type: ignore[arg-type]
    index = ShardedIndex.create(tmp_path / "b", PARAMS, shard_size=100)
    with pytest.raises(NotTrainedError):
        index.search(xq, 5)
    with pytest.raises(NotTrainedError):
        index.add(xb)
    index.train(xb)
    with pytest.raises(EmptyIndexError):
        index.search(xq, 5)
    index.add(xb[:10])
    with pytest.raises(ValueError, match="nprobe=64 exceeds nlist=32"):
        index.search(xq, 5, nprobe=64)
    with pytest.raises(ValueError, match="already in the index"):
        index.add(xb[:2], ids=[0, 77])
    with pytest.raises(TypeError, match="float32"):
        index.search(xq.astype(np.float16), 5)
    assert index.ntotal == 10
    index.close()
    with pytest.raises(FileExistsError, match="not empty"):
        ShardedIndex.create(tmp_path / "b", PARAMS)


@pytest.mark.parametrize("fmt", ["npy", "fvecs", "parquet", "array"])
def test_build_from_sources(tmp_path, small_data, fmt) -> None:
    xb, _, xq, _ = small_data
    if fmt == "npy":
        source: object = tmp_path / "x.npy"
        np.save(source, xb)
    elif fmt == "fvecs":
        source = tmp_path / "x.fvecs"
        write_fvecs(source, xb)
    elif fmt == "parquet":
        source = tmp_path / "x.parquet"
        col = pa.FixedSizeListArray.from_arrays(pa.array(xb.ravel()), 32)
        pq.write_table(pa.table({"emb": col}), source, row_group_size=700)
    else:
        source = xb
    index = ShardedIndex.build(
        source, tmp_path / "idx", PARAMS, shard_size=1500, chunk_size=600, progress=False
    )
    assert index.shard_counts == [1500, 1500, 1000]
    assert index.build_state["complete"] and index.build_state["rows_done"] == 4000
    np.testing.assert_array_equal(
        np.sort(np.concatenate([s.ids for s in index.shards()])), np.arange(4000)
    )
    _, gt = ground_truth(xb, xq, 10)
    assert recall_at_k(index.search(xq, 10, nprobe=32)[1], gt, 10) >= 0.80
    index.close()


KILL_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from fastface import IVFPQParams, ShardedIndex
    from fastface.index import sharded, storage

    mode, n = sys.argv[3], int(sys.argv[4])
    count = {"n": 0}
    if mode == "after-commit":
        orig = sharded.ShardedIndex._commit
        def hooked(self):
            orig(self)
            count["n"] += 1
            if count["n"] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        sharded.ShardedIndex._commit = hooked
    else:  # in the middle of a commit: new shard files written, manifest not yet
        orig_json = storage.atomic_write_json
        def hooked_json(path, obj):
            count["n"] += 1
            if count["n"] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return orig_json(path, obj)
        sharded.storage.atomic_write_json = hooked_json
    ShardedIndex.build(sys.argv[1], sys.argv[2], IVFPQParams(32, 32, 8), shard_size=1500,
                       chunk_size=400, progress=False)
    """
)


@pytest.mark.parametrize(("mode", "n"), [("after-commit", 8), ("mid-commit", 10)])
def test_build_killed_resumes(tmp_path, small_data, mode, n) -> None:
    xb, _, xq, _ = small_data
    src = tmp_path / "x.npy"
    np.save(src, xb)
    out = tmp_path / "idx"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_CHILD, str(src), str(out), mode, str(n)],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    with ShardedIndex.open(out) as partial:
        state = partial.build_state
        assert state is not None and not state["complete"]
        done = state["rows_done"]
        assert 0 < done < 4000
        assert partial.ntotal == done  # exactly the committed rows, never a mixture
        sealed_files = {
            rec["file"]
            for s, e in zip(
                partial._shards,
                json.loads((out / "manifest.json").read_text())["shards"],
                strict=True,
            )
            if s.sealed
            for rec in e["files"].values()
        }
    assert sealed_files, "the kill should come after at least one sealed shard"
    index = ShardedIndex.build(src, out, PARAMS, shard_size=1500, chunk_size=400, progress=False)
    man = json.loads((out / "manifest.json").read_text())
    now = {rec["file"] for e in man["shards"] for rec in e["files"].values()}
    assert sealed_files <= now  # sealed shards were not redone
    assert index.build_state["complete"] and index.ntotal == 4000
    assert index.shard_counts == [1500, 1500, 1000]
    ids = np.sort(np.concatenate([s.ids for s in index.shards()]))
    np.testing.assert_array_equal(ids, np.arange(4000))
    twin = unsharded_twin(index, xb)
    assert_same_results(index.search(xq, 10, nprobe=8), twin.search(xq, 10, nprobe=8))
    leftovers = [p.name for p in Path(out).iterdir() if ".tmp-" in p.name]
    assert leftovers == []
    index.close()


def test_build_refuses_other_source(tmp_path, small_data) -> None:
    xb = small_data[0]
    ShardedIndex.build(xb, tmp_path / "idx", PARAMS, shard_size=2000, progress=False).close()
    with pytest.raises(FileExistsError, match="another source"):
        ShardedIndex.build(xb[:3000], tmp_path / "idx", PARAMS, progress=False)


def test_tombstones_hidden_in_memory_and_filtered_when_mmapped(sharded, small_data, tmp_path):
    xb, _, xq, _ = small_data
    gone = np.arange(0, 4000, 7)  # every shard loses rows
    sharded.remove(gone)
    assert sharded._exclude is None  # in memory: dropped from the lists, no filter in the scan
    assert sum(s.ntotal for s in sharded.shards()) == 4000 - gone.size
    assert sharded.shard_counts == [1000] * 4  # the files still hold them until compact()
    live = sharded.search(xq, 10, nprobe=32)
    assert not np.isin(live[1], gone).any()
    twin = unsharded_twin(sharded, xb)
    twin.remove(gone)
    assert_same_results(live, twin.search(xq, 10, nprobe=32))
    sharded.close()
    for mmap in (False, True):
        with ShardedIndex.open(tmp_path / "idx", mmap=mmap) as again:
            assert (again._exclude is not None) is mmap
            assert again.ntotal == 4000 - gone.size
            assert_same_results(live, again.search(xq, 10, nprobe=32))
