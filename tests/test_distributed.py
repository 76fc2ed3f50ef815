"""fastface.distributed on a local Ray (one small session for the module).

Every distributed path is checked against its local twin on the same files:
RayShardedIndex against ShardedIndex.search (bit for bit, with removals,
killed actors and shards that stay down), the Ray Data build against
ShardedIndex.build (the same shard files, byte for byte; resumed after a
failure without redoing staged shards), embed_images against the local
pipeline (the same vectors) and distributed dedup against fastface.dedup.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray  # the test extra installs it (fastface[distributed])

from fastface import FlatParams, IVFPQParams, ShardedIndex, dedup
from fastface.datasets import SyntheticFaces, plant_duplicates
from fastface.distributed import (
    IndexChangedError,
    RayShardedIndex,
    ShardUnavailableError,
    build,
    embed_images,
)
from fastface.distributed import dedup as ray_dedup
from fastface.errors import CorruptIndexError

# Ray Data warns about its own deprecated settings while it copies its context
pytestmark = pytest.mark.filterwarnings(r"ignore::DeprecationWarning:ray(\..*)?")

SHARD = 1100  # 5000 vectors: shards of 1100, 1100, 1100, 1100 and an open one of 600


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(
        address="local",  # a fresh local Ray, never one another job on this machine started
        num_cpus=2,
        object_store_memory=80 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data():
    xb, _ = SyntheticFaces(n_identities=500, per_identity=10, d=32, seed=0, n_groups=20).vectors()
    xq, _ = SyntheticFaces(n_identities=500, per_identity=10, d=32, seed=0).queries(40, seed=3)
    return xb, xq


@pytest.fixture(scope="module")
def vec_file(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("vectors") / "x.npy"
    np.save(path, data[0])
    return path


def _local_build(src, path, params, **kw):
    index = ShardedIndex.build(
        src, path, params, shard_size=SHARD, chunk_size=700, progress=False, **kw
    )
    index.close()
    return path


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, vec_file):
    """5 shards (the last open), with removals in sealed shards (tombstones) and the open one."""
    path = tmp_path_factory.mktemp("idx") / "ip"
    _local_build(vec_file, path, IVFPQParams(32, 32, 8))
    with ShardedIndex.open(path, mode="a") as w:
        w.remove([5, 1200, 3301, 4999])
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def _same(a, b) -> bool:
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


# --- search ---------------------------------------------------------------------------------


def test_parts_of_an_index_merge_to_the_whole(index_dir, data) -> None:
    from fastface._native import merge_topk

    xq = data[1]
    info = ShardedIndex.inspect(index_dir)
    assert [s["number"] for s in info["shards"]] == [0, 1, 2, 3, 4]
    assert info["ntotal"] == 4996 and info["pending_removals"] == 3
    whole = ShardedIndex.open(index_dir)
    head = ShardedIndex.open(index_dir, shards=())
    assert head.nshards == 0 and head.ntotal == 0 and head.codec == whole.codec
    parts = [ShardedIndex.open(index_dir, mmap=True, shards=g) for g in ([0, 3], [4, 1, 2])]
    assert [p.shard_numbers for p in parts] == [[0, 3], [1, 2, 4]]
    assert sum(p.ntotal for p in parts) == whole.ntotal  # each part keeps its own tombstones
    a = head.assign(xq, 8)
    got = [p.scan(xq, 20, a) for p in parts]
    D, I = merge_topk(
        np.stack([g[0] for g in got]), np.stack([g[1] for g in got]), 20, larger_is_better=True
    )
    assert _same((D, I), whole.search(xq, 20, nprobe=8))
    view = whole.excluding([int(I[0, 0]), int(I[1, 0]), 10**9])  # an id not held is ignored
    assert view.ntotal == whole.ntotal - len({int(I[0, 0]), int(I[1, 0])}) and view.read_only
    assert not np.isin(view.search(xq, 20, nprobe=8)[1], [I[0, 0], I[1, 0]]).any()
    assert whole.ntotal == 4996  # unchanged
    with pytest.raises(ValueError, match="no shard 7"):
        ShardedIndex.open(index_dir, shards=[7])
    with pytest.raises(ValueError, match="read-only"):
        ShardedIndex.open(index_dir, mode="a", shards=[0])
    with pytest.raises(TypeError, match="shard numbers"):
        ShardedIndex.open(index_dir, shards=["0"])  # type: ignore[list-item]


def test_search_equals_sharded_index_bit_for_bit(index_dir, data) -> None:
    xq = data[1]
    local = ShardedIndex.open(index_dir)
    mapped = ShardedIndex.open(index_dir, mmap=True)
    cases = [
        {"nprobe": 4},
        {"nprobe": 32},
        {"nprobe": 8, "rerank": 4},
        {"nprobe": 32, "rerank": 1},
    ]
    with RayShardedIndex(index_dir, actors=2, num_cpus_per_actor=0.5) as rx:
        assert rx.ntotal == local.ntotal == 4996 and rx.nshards == 5
        assert sorted(n for g in rx.groups for n in g) == [0, 1, 2, 3, 4]
        for k in (1, 10, 57):
            for kw in cases:
                want = local.search(xq, k, **kw)
                got = rx.search(xq, k, **kw)
                assert _same(got, want), (k, kw)
                assert _same(got, mapped.search(xq, k, **kw))
                assert got.missing == () and got.complete
        D, I = rx.search(xq[0], 5, nprobe=8)  # one query, as ShardedIndex takes it
        assert _same((D, I), local.search(xq[0], 5, nprobe=8))
        info = rx.info()
        assert [g["shards"] for g in info["groups"]] == rx.groups
        assert all(r["alive"] for g in info["groups"] for r in g["replicas"])
        # held in the files: tombstoned ids included, the open shard lost 4999 at once
        assert sum(g["vectors"] for g in info["groups"]) == 4999
        with pytest.raises(ValueError, match="nprobe"):
            rx.search(xq, 5, nprobe=33)
        with pytest.raises(ValueError, match="expected"):
            rx.search(xq[:, :16], 5)


def test_other_groupings_replicas_and_metrics(tmp_path, vec_file, index_dir, data) -> None:
    xq = data[1]
    local = ShardedIndex.open(index_dir)
    # 2 uneven groups (3 shards and 2) x 2 replicas: one replica per group, in turn
    with RayShardedIndex(index_dir, actors=2, replicas=2, num_cpus_per_actor=0.5) as rx:
        assert sorted(len(g) for g in rx.groups) == [2, 3]
        for _ in range(3):
            assert _same(
                rx.search(xq, 10, nprobe=8, rerank=2), local.search(xq, 10, nprobe=8, rerank=2)
            )
    # squared L2, and 4-bit fast-scan codes (FAISS scans, the one merge orders ties)
    for params in (IVFPQParams(32, 32, 8, metric="l2"), IVFPQParams(32, 32, 8, nbits=4)):
        path = _local_build(vec_file, tmp_path / f"{params.metric}{params.nbits}", params)
        ref = ShardedIndex.open(path)
        with RayShardedIndex(path, actors=2, num_cpus_per_actor=0.5) as rx:
            assert _same(rx.search(xq, 10, nprobe=8), ref.search(xq, 10, nprobe=8))
            assert _same(
                rx.search(xq, 7, nprobe=16, rerank=3), ref.search(xq, 7, nprobe=16, rerank=3)
            )


def test_remove_is_committed_and_broadcast(tmp_path, index_dir, data) -> None:
    xq = data[1]
    path = _copy(index_dir, tmp_path / "idx")
    with RayShardedIndex(path, actors=2, num_cpus_per_actor=0.5) as rx:
        _, I0 = rx.search(xq, 10, nprobe=32)
        gone = np.unique(np.concatenate([I0[:, :3].ravel(), [4800, 4801]]))  # sealed and open
        assert rx.remove(gone) == gone.size
        assert rx.remove(gone) == 0  # already removed
        local = ShardedIndex.open(path)  # what was committed
        assert rx.ntotal == local.ntotal == 4996 - gone.size
        assert rx.generation == local.generation
        got = rx.search(xq, 10, nprobe=32, rerank=2)
        assert _same(got, local.search(xq, 10, nprobe=32, rerank=2))
        assert not np.isin(got[1], gone).any()
        # a restarted actor reopens the committed generation: still the same results
        ray.kill(rx.actors()[0][0], no_restart=False)
        assert _same(rx.search(xq, 10, nprobe=32), local.search(xq, 10, nprobe=32))
    # the writer lock was released at close
    with ShardedIndex.open(path, mode="a") as w:
        assert w.ntotal == 4996 - gone.size


def test_killed_actor_during_a_stream_of_queries(index_dir, data) -> None:
    xq = data[1]
    local = ShardedIndex.open(index_dir)
    want = local.search(xq, 10, nprobe=16, rerank=2)
    for replicas in (1, 2):
        results: list = []
        errors: list = []
        with RayShardedIndex(
            index_dir, actors=2, replicas=replicas, num_cpus_per_actor=0.25, timeout=60
        ) as rx:

            def stream(rx=rx, results=results, errors=errors) -> None:
                try:
                    for _ in range(25):
                        results.append(rx.search(xq, 10, nprobe=16, rerank=2))
                except BaseException as e:  # pragma: no cover - reported below
                    errors.append(e)

            t = threading.Thread(target=stream)
            t.start()
            while len(results) < 3 and t.is_alive():
                time.sleep(0.01)
            for reps in rx.actors():  # one actor of every group dies mid-stream
                ray.kill(reps[0], no_restart=False)
            t.join(120)
            assert not t.is_alive() and not errors, errors
        assert len(results) == 25
        assert all(_same(r, want) and r.complete for r in results)


def test_a_restarting_actor_gets_the_rounds_timeout(index_dir, data) -> None:
    """Ray answers "unavailable" at once while it restarts a killed actor: the search must
    wait for it within `timeout`, not spend its retries in an instant and give up."""
    xq = data[1]
    want = ShardedIndex.open(index_dir).search(xq, 10, nprobe=16)
    with RayShardedIndex(
        index_dir, actors=2, replicas=1, num_cpus_per_actor=0.25, timeout=60, retries=1
    ) as rx:
        for _ in range(3):
            for reps in rx.actors():
                ray.kill(reps[0], no_restart=False)
            got = rx.search(xq, 10, nprobe=16)  # straight after the kill: both restarting
            assert _same(got, want) and got.complete


def test_shard_that_stays_down_raises_or_is_reported(index_dir, data) -> None:
    xq = data[1]
    with RayShardedIndex(index_dir, actors=2, num_cpus_per_actor=0.5, retries=1) as rx:
        down = rx.groups[0]
        ray.kill(rx.actors()[0][0], no_restart=True)  # gone for good
        with pytest.raises(ShardUnavailableError) as err:
            rx.search(xq, 10, nprobe=16)
        assert err.value.shards == down and str(down) in str(err.value)
        part = rx.search(xq, 10, nprobe=16, rerank=2, allow_partial=True)
        assert part.missing == tuple(down) and not part.complete
        others = [n for g in rx.groups[1:] for n in g]
        assert _same(
            part, ShardedIndex.open(index_dir, shards=others).search(xq, 10, nprobe=16, rerank=2)
        )
        D, I = part  # unpacks as (D, I)
        assert D.shape == I.shape == (xq.shape[0], 10)


def test_damaged_shard_fails_the_open_naming_it(tmp_path, index_dir) -> None:
    path = _copy(index_dir, tmp_path / "idx")
    man = json.loads((path / "manifest.json").read_text())
    victim = path / man["shards"][2]["files"]["index"]["file"]
    raw = bytearray(victim.read_bytes())
    raw[-5] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(ShardUnavailableError) as err:
        RayShardedIndex(path, actors=5, num_cpus_per_actor=0.25, max_restarts=0, timeout=60)
    assert err.value.shards == [2]
    assert "SHA-256" in str(err.value) and victim.name in str(err.value)


def test_another_writer_is_detected(tmp_path, index_dir, data) -> None:
    path = _copy(index_dir, tmp_path / "idx")
    with RayShardedIndex(path, actors=2, num_cpus_per_actor=0.5) as rx:
        with ShardedIndex.open(path, mode="a") as w:
            w.add(data[0][:10])  # a commit this RayShardedIndex did not make
        with pytest.raises(IndexChangedError):
            rx.remove([1])
        actor = rx.actors()[1][0]
        ray.kill(actor, no_restart=False)  # restarts at the new generation
        deadline = time.monotonic() + 120
        while True:  # ray.kill is asynchronous: wait until the restarted actor answers
            try:
                if ray.get(actor.ready.remote(), timeout=60)["generation"] != rx.generation:
                    break
            except ray.exceptions.RayActorError:
                pass
            assert time.monotonic() < deadline, "the killed actor was not restarted"
            time.sleep(0.1)
        with pytest.raises(IndexChangedError, match="another writer"):
            rx.search(data[1], 5, nprobe=8)


# --- build ----------------------------------------------------------------------------------


def _shard_files(path: Path) -> tuple:
    """Everything a manifest says about the content: codec and shard file checksums, counts."""
    man = json.loads((path / "manifest.json").read_text())
    shards = [
        (s["number"], s["sealed"], s["count"], {k: v["sha256"] for k, v in s["files"].items()})
        for s in man["shards"]
    ]
    return man["codec"]["sha256"], shards, man["ntotal"], man["next_id"], man["params"]


def test_build_writes_the_files_of_a_local_build(tmp_path, vec_file, data) -> None:
    params = IVFPQParams(32, 32, 8)
    local = _local_build(vec_file, tmp_path / "local", params)
    with build(
        vec_file, tmp_path / "ray", params, shard_size=SHARD, chunk_size=700, workers=2
    ) as idx:
        assert idx.build_state["complete"] and idx.ntotal == 5000
    assert _shard_files(tmp_path / "ray") == _shard_files(local)
    assert not (tmp_path / "ray" / ".staging").exists()
    assert oct((tmp_path / "ray").stat().st_mode & 0o777) == "0o700"
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "ray").iterdir()} == {"0o600"}
    # a directory of files of three kinds: the rows of the files one after the other
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fastface.io import write_fvecs

    x = data[0]
    parts = tmp_path / "parts"
    parts.mkdir()
    np.save(parts / "a.npy", x[:1700])
    write_fvecs(parts / "b.fvecs", x[1700:3000])
    flat = pa.array(x[3000:].reshape(-1), pa.float32())
    pq.write_table(
        pa.table({"emb": pa.FixedSizeListArray.from_arrays(flat, 32)}),
        parts / "c.parquet",
        row_group_size=450,
    )
    # the codec named by its spec string: the same index
    with build(parts, tmp_path / "ray2", params.spec, shard_size=SHARD, chunk_size=700, workers=2):
        pass
    assert _shard_files(tmp_path / "ray2") == _shard_files(local)
    with pytest.raises(TypeError, match="flat index"):
        build(vec_file, tmp_path / "flat", FlatParams(32))
    assert not (tmp_path / "flat").exists()
    with pytest.raises(FileExistsError, match="another source"):
        build(parts / "a.npy", tmp_path / "ray2", params, shard_size=SHARD, chunk_size=700)


def test_interrupted_build_resumes_without_redoing_staged_shards(tmp_path, data) -> None:
    params = IVFPQParams(32, 32, 8)
    x = data[0]
    train = np.sort(np.random.default_rng(0).choice(x.shape[0], size=1000, replace=False))
    bad_row = next(r for r in range(4800, 5000) if r not in set(train))  # in the last shard
    src = tmp_path / "x.npy"
    broken = x.copy()
    broken[bad_row] = np.nan
    np.save(src, broken)
    kw = {"shard_size": SHARD, "chunk_size": 700, "train_size": 1000}
    lo = max(4400, bad_row - bad_row % 700)  # the piece of its chunk in shard 4
    with pytest.raises(
        ValueError, match=rf"shard 4 \(rows 4400\.\.4999\), reading rows {lo}\.\..*NaN"
    ):
        build(src, tmp_path / "ray", params, workers=2, **kw)
    staged = {
        p.name: p.stat().st_ino for p in (tmp_path / "ray" / ".staging").glob("shard-*.faiss")
    }
    assert sorted(staged) == [f"shard-00000{i}.faiss" for i in range(4)]  # all but the bad one
    np.save(src, x)  # repaired in place: the same file, the same rows
    with build(src, tmp_path / "ray", params, workers=2, **kw) as idx:
        assert idx.ntotal == 5000
    man = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    inodes = {
        f"shard-{s['number']:06d}.faiss": (tmp_path / "ray" / s["files"]["index"]["file"])
        .stat()
        .st_ino
        for s in man["shards"]
    }
    for name, ino in staged.items():  # adopted as they were: renamed, not written again
        assert inodes[name] == ino
    local = _local_build(src, tmp_path / "local", params, train_size=1000)
    assert _shard_files(tmp_path / "ray") == _shard_files(local)


def test_adopt_verifies_staged_files(tmp_path, index_dir) -> None:
    src = ShardedIndex.open(index_dir)
    shards = list(src.shards())
    path = tmp_path / "idx"
    with ShardedIndex.create(path, src.codec, shard_size=SHARD) as w:
        recs = [ShardedIndex.stage_shard(path, i, s) for i, s in enumerate(shards[:2])]
        victim = path / ".staging" / recs[1]["files"]["ids"]["file"]
        raw = bytearray(victim.read_bytes())
        raw[-1] ^= 1
        victim.write_bytes(bytes(raw))
        with pytest.raises(CorruptIndexError, match="SHA-256"):
            w.adopt(recs)
        assert w.nshards == 0 and (path / ".staging" / recs[0]["files"]["index"]["file"]).exists()
        ShardedIndex.stage_shard(path, 1, shards[1])  # staged again
        assert [r["number"] for r in ShardedIndex.staged(path)] == [0, 1]
        assert w.adopt(ShardedIndex.staged(path)) == [0, 1]
        with pytest.raises(ValueError, match="in the index"):
            w.adopt([recs[0]])
    reopened = ShardedIndex.open(path)
    assert reopened.shard_counts == [SHARD, SHARD]
    os.symlink(tmp_path, path / ".staging")
    with pytest.raises(CorruptIndexError, match="not a directory"):
        ShardedIndex.stage_shard(path, 2, shards[2])


# --- embedding, dedup -----------------------------------------------------------------------


def test_embed_images_gives_the_local_pipelines_vectors(tmp_path) -> None:
    import cv2
    import pyarrow.parquet as pq
    from skimage import data as skdata

    from fastface import faces
    from fastface.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    astro = skdata.astronaut()
    for i, (y, x, s) in enumerate([(20, 120, 230), (0, 100, 260), (40, 140, 200), (10, 130, 240)]):
        img = cv2.resize(astro[y : y + s, x : x + s], (160 + 20 * i, 160 + 20 * i))
        cv2.imwrite(str(folder / f"a{i}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(folder / "coffee.png"), cv2.cvtColor(skdata.coffee(), cv2.COLOR_RGB2BGR))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00junk" * 10)
    paths = [*sorted(str(p) for p in folder.iterdir()), str(folder / "gone.jpg")]
    local = faces.analyze(paths, embedder=faces.dlib_onnx_embedder(), batch_size=3)
    out = tmp_path / "faces.parquet"
    rep = embed_images(paths, out, batch_size=3, actors=2)
    table = pq.read_table(out)
    got = np.asarray(table.column("embedding").to_pylist(), np.float32)
    assert rep.faces == len(local) == 4 and got.shape == (4, 128)
    assert np.array_equal(got, local.embeddings)  # same batches, same models: same bits
    assert table.column("image").to_pylist() == local.image.tolist()
    np.testing.assert_array_equal(
        np.asarray(table.column("box").to_pylist(), np.float32), local.boxes
    )
    want_errors = [(e.image, e.kind, e.reason) for e in local.errors]
    assert [(e["image"], e["kind"], e["reason"]) for e in rep.errors] == want_errors
    meta = pq.ParquetFile(out).metadata.metadata
    assert json.loads(meta[b"fastface.errors"]) == rep.errors
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    # the format of `fastface embed` (columns, types, model record)
    cli_out = tmp_path / "cli.parquet"
    assert (
        main(["embed", *paths[:-1], "-o", str(cli_out), "--no-progress", "--batch-size", "3"]) == 1
    )
    cli_table = pq.read_table(cli_out)
    assert table.schema.equals(cli_table.schema, check_metadata=False)
    assert json.loads(table.schema.metadata[b"fastface.model"]) == json.loads(
        cli_table.schema.metadata[b"fastface.model"]
    )
    with pytest.raises(FileExistsError):
        embed_images(paths, out)
    # and it feeds a build: the build's reader takes the embedding column
    from fastface.distributed.sources import FileSet, vector_files

    assert np.array_equal(FileSet(vector_files(out)).read(0, 4), got)


def test_dedup_equals_local_dedup(tmp_path, data) -> None:
    x, _origin = plant_duplicates(data[0], 0.05, seed=0)
    path = tmp_path / "idx"
    with ShardedIndex.build(x, path, IVFPQParams(32, 32, 8), shard_size=1500, progress=False) as w:
        w.remove([3, 7, 1600])
    want = dedup(ShardedIndex.open(path), 0.93, nprobe=4, chunk_size=300)
    got = ray_dedup(path, 0.93, nprobe=4, chunk_size=300, workers=2)
    for field in ("ids", "labels", "representatives", "sizes", "pairs", "scores"):
        assert np.array_equal(getattr(got, field), getattr(want, field)), field
    assert got.n_groups < x.shape[0] - 3 and (got.sizes > 1).sum() > 100


# --- command line, imports ------------------------------------------------------------------


def test_cli_build_and_bench_with_ray(tmp_path, vec_file, capsys) -> None:
    from fastface.cli import main

    code = main(
        [
            "build",
            str(vec_file),
            str(tmp_path / "idx"),
            "--nlist",
            "32",
            "--M",
            "8",
            "--shard-size",
            str(SHARD),
            "--chunk-size",
            "700",
            "--ray",
            "--workers",
            "2",
            "--no-progress",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["ntotal"] == 5000 and out["nshards"] == 5
    local = _local_build(vec_file, tmp_path / "local", IVFPQParams(32, 32, 8))
    assert _shard_files(tmp_path / "idx") == _shard_files(local)
    res = tmp_path / "ann.json"
    code = main(
        [
            "bench",
            "ann",
            "--n-identities",
            "300",
            "--per-identity",
            "10",
            "--d",
            "32",
            "--nlist",
            "16",
            "--M",
            "8",
            "--nq",
            "50",
            "--nprobe",
            "4",
            "--shards",
            "1",
            "3",
            "--repeat",
            "1",
            "--no-plot",
            "--work-dir",
            str(tmp_path / "bench"),
            "--out",
            str(res),
            "--ray",
        ]
    )
    assert code == 0
    rows = json.loads(res.read_text())["rows"]
    by = {r["method"]: r for r in rows}
    assert by["fastface 3 shards (Ray)"]["R@10"] == by["fastface 3 shards"]["R@10"]


def test_import_does_not_load_ray() -> None:
    code = (
        "import sys, fastface, fastface.distributed as fd; "
        "fd.RayShardedIndex, fd.build, fd.embed_images, fd.dedup; "
        "assert 'ray' not in sys.modules, 'ray imported before use'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_readme_ray_example_runs(tmp_path, monkeypatch) -> None:
    import re

    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()

    def blocks(heading: str) -> list[str]:
        start = text.index(heading) + len(heading)
        nxt = re.search(r"^#{2,3} ", text[start:], flags=re.M)
        return re.findall(r"```python\n(.*?)```", text[start : start + nxt.start()], flags=re.S)

    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for block in blocks("## Use\n")[:1] + blocks("### Many machines (Ray)\n"):
        exec(compile(block, str(readme), "exec"), namespace)
    local = ShardedIndex.open(tmp_path / "gallery.idx")
    top = np.unique(namespace["I"][:, 0])  # type: ignore[index]
    assert local.ntotal == 9900 - top.size  # the README removed 100, then the best hits
    assert namespace["groups"].ids.size == local.ntotal  # type: ignore[attr-defined]
