"""Sharded index: equal to one shard bit for bit, strategies equal, persistence, crash-resume,
corruption, failed writes, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastface import IVFPQIndex, IVFPQParams, ShardedIndex
from fastface.errors import (
    CorruptIndexError,
    DiskFullError,
    EmptyIndexError,
    IndexLockedError,
    NotTrainedError,
    ReadOnlyIndexError,
    UnsupportedFormatError,
)
from fastface.eval import assert_results_agree, ground_truth, recall_at_k
from fastface.index import storage
from fastface.io import write_fvecs

PARAMS = IVFPQParams(32, 32, 8)


def assert_identical(a, b) -> None:
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


@pytest.fixture()
def sharded(tmp_path, small_data, codec32):
    xb = small_data[0]
    index = ShardedIndex.create(tmp_path / "idx", codec32, shard_size=1000)
    index.add(xb)
    yield index
    index.close()


def unsharded_twin(index: ShardedIndex, xb: np.ndarray) -> IVFPQIndex:
    twin = IVFPQIndex(index.codec)
    twin.add(xb, ids=np.arange(xb.shape[0]))
    return twin


def test_sharded_equals_unsharded_bit_for_bit(sharded, small_data) -> None:
    xb, _, xq, _ = small_data
    assert sharded.nshards == 4 and sharded.shard_counts == [1000] * 4
    twin = unsharded_twin(sharded, xb)
    for nprobe in (1, 8, 32):
        want = twin.search(xq, 10, nprobe=nprobe)
        for strategy in ("auto", "stacked", "fanout"):
            assert_identical(sharded.search(xq, 10, nprobe=nprobe, strategy=strategy), want)
        want_r = twin.search(xq, 10, nprobe=nprobe, rerank=4)
        for strategy in ("stacked", "fanout"):
            got = sharded.search(xq, 10, nprobe=nprobe, rerank=4, strategy=strategy)
            assert_identical(got, want_r)


def test_strategies_equal_with_ties_and_removals(tmp_path, small_data, codec32) -> None:
    """Duplicated vectors (equal scores) across shards, tombstones: one answer everywhere."""
    xb, _, xq, _ = small_data
    x = np.concatenate([xb[:1200], xb[:300]])  # every vector of the first 300 twice
    with ShardedIndex.create(tmp_path / "t", codec32, shard_size=450) as index:
        ids = np.random.default_rng(0).permutation(10_000)[: x.shape[0]]
        index.add(x, ids)
        index.remove(ids[::11])
        assert index.pending_removals > 0
        q = np.concatenate([xq[:20], xb[:20]])  # queries equal to duplicated vectors
        for nprobe in (1, 16):
            a = index.search(q, 25, nprobe=nprobe, strategy="stacked")
            b = index.search(q, 25, nprobe=nprobe, strategy="fanout")
            assert_identical(a, b)
            assert not np.isin(a[1], ids[::11]).any()
            ra = index.search(q, 25, nprobe=nprobe, rerank=3, strategy="stacked")
            rb = index.search(q, 25, nprobe=nprobe, rerank=3, strategy="fanout")
            assert_identical(ra, rb)
        # equal scores list the lower id first
        D, I = a
        tie = (D[:, 1:] == D[:, :-1]) & (I[:, 1:] >= 0)
        assert tie.any() and (I[:, 1:][tie] > I[:, :-1][tie]).all()


def test_fastscan_shards_agree_with_unsharded(tmp_path, small_data) -> None:
    xb, _, xq, _ = small_data
    with ShardedIndex.create(
        tmp_path / "fs", IVFPQParams(32, 16, 16, nbits=4), shard_size=1500
    ) as index:
        index.train(xb)
        index.add(xb)
        twin = unsharded_twin(index, xb)
        for nprobe in (1, 16):
            # FAISS's fast-scan keeps the first of equal scores it meets: ties may differ
            assert_results_agree(
                index.search(xq, 10, nprobe=nprobe), twin.search(xq, 10, nprobe=nprobe)
            )
        with pytest.raises(ValueError, match="8-bit"):
            index.search(xq, 10, strategy="stacked")


def test_contract_of_the_sharded_index(sharded, small_data) -> None:
    xb, _, xq, _ = small_data
    a = sharded.assign(xq, 8)
    assert_identical(sharded.scan(xq, 10, a), sharded.search(xq, 10, nprobe=8))
    # per shard through the shard contract, merged: the same
    from fastface._native import merge_topk

    parts = [s.scan(xq, 10, a) for s in sharded.shards()]
    merged = merge_topk(
        np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]), 10, larger_is_better=True
    )
    assert_identical(merged, sharded.search(xq, 10, nprobe=8))
    sharded.remove([5, 2500])
    np.testing.assert_array_equal(sharded.tombstones, [5, 2500])
    assert sharded.contains([5, 6]).tolist() == [False, True]
    assert sharded.stored([5, 6, 99999]).tolist() == [True, True, False]
    assert sharded.live_ids().size == 3998 and 5 not in sharded.live_ids()
    np.testing.assert_allclose(sharded.get_vectors([7, 3999]), xb[[7, 3999]], atol=1e-3)
    with pytest.raises(KeyError):
        sharded.get_vectors([5])
    _D, I = sharded.rescore(xq[:3], np.array([5, 6, 7]), 3)
    assert (I[:, 2] == -1).all() and set(I[:, :2].ravel()) == {6, 7}
    for shard in sharded.shards():
        assert shard.read_only
        with pytest.raises(ReadOnlyIndexError):
            shard.remove([0])
    g = sharded.generation
    sharded.flush()
    assert sharded.generation == g + 1


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
            assert_identical(again.search(xq, 10, nprobe=8), before)
            assert_identical(again.search(xq, 10, nprobe=8, strategy="fanout"), before)
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
    assert_identical(sharded.search(xq, 10, nprobe=8), twin.search(xq, 10, nprobe=8))
    # removed ids are reusable after compaction; automatic ids never reuse them
    sharded.add(xb[:1], ids=[3])
    assert sharded.contains([3, 999]).tolist() == [True, False]
    assert sharded.add(xb[:1]).tolist() == [4000]


def test_tombstoned_id_cannot_be_reused_before_compaction(sharded, small_data) -> None:
    sharded.remove([5])
    with pytest.raises(ValueError, match="awaits compact"):
        sharded.add(small_data[0][:1], ids=[5])


def test_open_shard_survives_reopen(tmp_path, small_data, codec32) -> None:
    xb = small_data[0]
    with ShardedIndex.create(tmp_path / "i", codec32, shard_size=3000) as index:
        index.add(xb[:2500])
        index.add(xb[2500:3500])
        index.remove([3200])  # in the open shard: dropped at once
    with ShardedIndex.open(tmp_path / "i", mode="a") as index:
        assert index.shard_counts == [3000, 499]
        assert index.pending_removals == 0
        assert index.add(xb[3500:3502]).tolist() == [3500, 3501]


def test_uncommitted_add_then_remove_then_flush_keeps_everything(
    tmp_path, small_data, codec32
) -> None:
    """add(commit=False) filling and sealing shards, remove, flush: nothing lost (it once
    wedged the index and lost 1,500 vectors)."""
    xb, _, xq, _ = small_data
    with ShardedIndex.create(tmp_path / "u", codec32, shard_size=1000) as index:
        index.add(xb[:500])
        index.add(xb[500:2000], commit=False)  # seals shard 0, fills shard 1: not on disk
        assert index.remove([10, 1500, 1999]) == 3  # in unwritten shards: dropped directly
        index.flush()
        want = index.search(xq, 10, nprobe=8)
    with ShardedIndex.open(tmp_path / "u") as again:
        assert again.ntotal == 1997 and again.shard_counts == [999, 998]
        assert not again.contains([10, 1500, 1999]).any() and again.contains([0, 1998]).all()
        assert_identical(again.search(xq, 10, nprobe=8), want)


def test_failed_writes_change_nothing(tmp_path, small_data, codec32, monkeypatch) -> None:
    xb, _, xq, _ = small_data
    index = ShardedIndex.create(tmp_path / "f", codec32, shard_size=1000)
    index.add(xb[:2500])
    index.remove([3, 1200])
    files = sorted(os.listdir(tmp_path / "f"))
    manifest = (tmp_path / "f" / "manifest.json").read_bytes()
    before = index.search(xq, 10, nprobe=8)
    state = (index.ntotal, index.shard_counts, index.pending_removals, index.generation)

    written = {"n": 0, "limit": 0}

    def full_disk(fd, data):
        written["n"] += 1
        if written["n"] > written["limit"]:  # let some writes through: fail mid-commit
            raise OSError(28, "No space left on device")
        return os.write(fd, data)

    monkeypatch.setattr(storage, "write_fd", full_disk)
    for op, limit in (
        (lambda: index.add(xb[2500:3600]), 4),
        (lambda: index.remove([5, 2400]), 2),
        (lambda: index.compact(), 3),
        (lambda: index.flush(), 0),
    ):
        written.update(n=0, limit=limit)
        with pytest.raises(DiskFullError) as e:
            op()
        assert isinstance(e.value, OSError) and e.value.errno == 28
        assert str(tmp_path / "f") in str(e.value) and "nothing was committed" in str(e.value)
        assert (index.ntotal, index.shard_counts, index.pending_removals, index.generation) == state
        assert_identical(index.search(xq, 10, nprobe=8), before)
        assert sorted(os.listdir(tmp_path / "f")) == files
        assert (tmp_path / "f" / "manifest.json").read_bytes() == manifest
    monkeypatch.undo()
    # values beyond float16 storage: refused before anything changes
    with pytest.raises(ValueError, match="float16"):
        index.add(np.full((2, 32), 7e4, np.float32))
    assert (index.ntotal, index.shard_counts) == state[:2]
    index.add(xb[2500:3600])  # and the index still works
    assert index.ntotal == 3598
    index.close()
    with ShardedIndex.open(tmp_path / "f") as again:
        assert again.ntotal == 3598


_FSIZE_CHILD = textwrap.dedent(
    """
    import resource, signal, sys
    import numpy as np
    from fastface import ShardedIndex
    from fastface.errors import DiskFullError

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    index = ShardedIndex.open(sys.argv[1], mode="a")
    before = index.ntotal
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
    x = np.load(sys.argv[2])
    try:
        index.add(x)
    except DiskFullError as e:
        assert index.ntotal == before, index.ntotal
        print("DISKFULL", e.filename)
    else:
        print("NO ERROR")
    """
)


def test_file_size_limit_in_a_child(tmp_path, small_data, codec32) -> None:
    xb = small_data[0]
    with ShardedIndex.create(tmp_path / "r", codec32, shard_size=5000) as index:
        index.add(xb[:100])
    np.save(tmp_path / "x.npy", xb[100:3000])
    proc = subprocess.run(
        [sys.executable, "-c", _FSIZE_CHILD, str(tmp_path / "r"), str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DISKFULL" in proc.stdout and str(tmp_path / "r") in proc.stdout
    with ShardedIndex.open(tmp_path / "r") as again:
        assert again.ntotal == 100
    assert not [p for p in os.listdir(tmp_path / "r") if ".tmp-" in p]


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
    (d / "manifest.json").write_text(json.dumps(storage.seal(man)))
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


def test_half_created_directory_can_be_created_again(tmp_path, small_data) -> None:
    d = tmp_path / "half"
    d.mkdir()
    (d / ".lock").write_bytes(b"")  # a create killed before its first manifest
    (d / ".manifest.json.tmp-0123456789abcdef").write_bytes(b"{")
    with pytest.raises(FileNotFoundError):
        ShardedIndex.open(d)
    with ShardedIndex.create(d, PARAMS, shard_size=100) as index:
        index.train(small_data[0])
    assert sorted(os.listdir(d)) == sorted([".lock", "manifest.json", _only(d, "codec")])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        ShardedIndex.create(tmp_path / "other", PARAMS)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def _only(d: Path, prefix: str) -> str:
    (name,) = [n for n in os.listdir(d) if n.startswith(prefix)]
    return name


def test_bad_input(tmp_path, small_data) -> None:
    xb, _, xq, _ = small_data
    with pytest.raises(TypeError, match="IVFPQParams"):
        ShardedIndex.create(tmp_path / "a", {"d": 32})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        ShardedIndex.create(tmp_path / "a", PARAMS, shard_size=0)
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
    with pytest.raises(TypeError, match="integer"):
        index.remove([1.7])
    with pytest.raises(ValueError, match="maximum"):
        index.search(xq, 2**31)
    with pytest.raises(ValueError, match="strategy"):
        index.search(xq, 5, strategy="sideways")  # type: ignore[arg-type]
    # the input policy: float16/float64 cast, one 1-D query is one query
    assert_identical(index.search(xq.astype(np.float64), 5), index.search(xq, 5))
    assert index.search(xq[0], 5)[1].shape == (1, 5)
    index.add(xb[10:11], ids=[2**63 - 1])  # the largest id is an id...
    with pytest.raises(OverflowError, match="2\\*\\*63"):
        index.add(xb[11:12])  # ...after which automatic ids are exhausted
    assert index.ntotal == 11
    index.close()
    with ShardedIndex.open(tmp_path / "b") as again:  # the manifest records it
        assert again.ntotal == 11
    with pytest.raises(FileExistsError, match="not empty"):
        ShardedIndex.create(tmp_path / "b", PARAMS)


@pytest.mark.parametrize("fmt", ["npy", "fvecs", "parquet", "array", "chunks"])
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
    elif fmt == "chunks":
        source = (xb[lo : lo + 333] for lo in range(0, xb.shape[0], 333))
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
        orig = sharded.ShardedIndex._commit_state
        def hooked(self, st):
            orig(self, st)
            count["n"] += 1
            if count["n"] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        sharded.ShardedIndex._commit_state = hooked
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
    man = json.loads((out / "manifest.json").read_text())
    sealed_files = {
        rec["file"] for e in man["shards"] if e["sealed"] for rec in e["files"].values()
    }
    with ShardedIndex.open(out) as partial:
        state = partial.build_state
        assert state is not None and not state["complete"]
        done = state["rows_done"]
        assert 0 < done < 4000
        assert partial.ntotal == done  # exactly the committed rows, never a mixture
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
    assert_identical(index.search(xq, 10, nprobe=8), twin.search(xq, 10, nprobe=8))
    leftovers = [p.name for p in Path(out).iterdir() if ".tmp-" in p.name]
    assert leftovers == []
    index.close()


def test_build_refuses_other_source(tmp_path, small_data) -> None:
    xb = small_data[0]
    ShardedIndex.build(xb, tmp_path / "idx", PARAMS, shard_size=2000, progress=False).close()
    with pytest.raises(FileExistsError, match="another source"):
        ShardedIndex.build(xb[:3000], tmp_path / "idx", PARAMS, progress=False)


def test_tombstones_skipped_in_the_scan_in_memory_and_mapped(sharded, small_data, tmp_path):
    xb, _, xq, _ = small_data
    gone = np.arange(0, 4000, 7)  # every shard loses rows
    sharded.remove(gone)
    assert sharded.shard_counts == [1000] * 4  # the files still hold them until compact()
    live = sharded.search(xq, 10, nprobe=32)
    assert not np.isin(live[1], gone).any()
    twin = unsharded_twin(sharded, xb)
    twin.remove(gone)
    assert_identical(live, twin.search(xq, 10, nprobe=32))
    sharded.close()
    for mmap in (False, True):
        with ShardedIndex.open(tmp_path / "idx", mmap=mmap) as again:
            assert again.ntotal == 4000 - gone.size
            assert_identical(again.search(xq, 10, nprobe=32), live)


def test_codec_shared_between_indexes(sharded, small_data, tmp_path) -> None:
    xb, _, xq, _ = small_data
    with ShardedIndex.create(tmp_path / "same", sharded.codec, shard_size=4000) as one:
        assert one.is_trained and one.codec == sharded.codec
        one.add(xb)
        assert_identical(one.search(xq, 10, nprobe=8), sharded.search(xq, 10, nprobe=8))
