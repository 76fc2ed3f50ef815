"""Readers and writers: read-only opens in another process while a writer commits, and one
ShardedIndex shared by a writer thread and search threads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

from fastface import ShardedIndex

_WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from fastface import ShardedIndex

    path, n_commits = sys.argv[1], int(sys.argv[2])
    x = np.load(sys.argv[3])
    with ShardedIndex.open(path, mode="a") as index:
        print("ready", flush=True)
        nxt = 1000
        for i in range(n_commits):
            if i % 7 == 3:
                live = index.live_ids()
                index.remove(live[:: max(1, live.size // 5)][:5])  # tombstones and drops
            elif i % 13 == 12:
                index.compact()  # deletes the replaced files at once
            else:
                index.add(x[i % 50 * 20 : i % 50 * 20 + 20], np.arange(nxt, nxt + 20))
                nxt += 20
        print("done", index.generation, flush=True)
    """
)

_READER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from fastface import ShardedIndex

    path, n = sys.argv[1], int(sys.argv[2])
    q = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
    errors, generations = [], []
    for i in range(n):
        try:
            with ShardedIndex.open(path, mmap=i % 3 == 0) as index:
                D, I = index.search(q, 5, nprobe=8)
                assert index.ntotal == sum(index.shard_counts) - index.pending_removals
                assert not np.isin(I, index.tombstones).any()
                generations.append(index.generation)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
    print(json.dumps({"errors": errors, "generations": generations}))
    """
)


def test_read_only_opens_during_commits_see_one_generation(tmp_path, small_data, codec32) -> None:
    """300 opens in another process while a writer commits: zero false errors."""
    xb = small_data[0]
    path = tmp_path / "idx"
    with ShardedIndex.create(path, codec32, shard_size=250) as index:
        index.add(xb[:1000])
    np.save(tmp_path / "x.npy", xb[1000:2000])
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), "400", str(tmp_path / "x.npy")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    reader = subprocess.run(
        [sys.executable, "-c", _READER, str(path), "300"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    out, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err[-2000:]
    assert reader.returncode == 0, reader.stderr[-2000:]
    result = json.loads(reader.stdout)
    assert result["errors"] == []
    gens = result["generations"]
    assert len(gens) == 300
    assert len(set(gens)) > 10, "the opens should overlap many commits"
    with ShardedIndex.open(path) as index:
        assert index.generation == int(out.split()[-1])


_THREADS = textwrap.dedent(
    """
    import faulthandler, sys, threading, time
    import numpy as np
    from fastface import Codec, IVFPQParams, ShardedIndex

    faulthandler.enable()
    path = sys.argv[1]
    x = np.load(sys.argv[2])
    xq = x[:40] + np.float32(0.01)
    index = ShardedIndex.open(path, mode="a")
    lock = threading.Lock()
    added = set(index.live_ids().tolist())  # every id that may be returned
    removed = set()  # ids removed before a search started may not come back
    stop = threading.Event()
    failures = []

    def writer():
        nxt = 100_000
        for i in range(60):
            ids = np.arange(nxt, nxt + 30)
            with lock:
                added.update(ids.tolist())
            index.add(x[(i * 30) % 3000 : (i * 30) % 3000 + 30], ids, commit=i % 3 == 0)
            nxt += 30
            if i % 4 == 1:
                gone = index.live_ids()[::97][:6]
                index.remove(gone, commit=i % 8 == 1)
                with lock:
                    removed.update(gone.tolist())
            if i % 20 == 19:
                index.compact()
        stop.set()

    def searcher(seed):
        rng = np.random.default_rng(seed)
        n = 0
        while not stop.is_set() or n < 5:
            with lock:
                gone = set(removed)
            strategy = ("stacked", "fanout")[n % 2]
            rerank = None if n % 3 else 4
            D, I = index.search(xq[rng.integers(0, 40, 8)], 10, nprobe=8, rerank=rerank,
                                strategy=strategy)
            with lock:
                known = set(added)
            got = set(I[I >= 0].tolist())
            if got & gone:
                failures.append(f"removed ids came back: {sorted(got & gone)[:5]}")
            if got - known:
                failures.append(f"unknown ids: {sorted(got - known)[:5]}")
            if not (np.diff(D, axis=1) <= 0).all():
                failures.append("scores out of order")
            n += 1

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=searcher, args=(s,)) for s in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    index.flush()
    index.close()
    print("final", index.ntotal, len(removed))
    print("failures", len(failures), failures[:3])
    """
)


def test_writer_thread_and_search_threads(tmp_path, small_data, codec32) -> None:
    """No crash, and every result comes from a published state (run in a child: a crash
    is reported, not fatal)."""
    xb = small_data[0]
    path = tmp_path / "idx"
    with ShardedIndex.create(path, codec32, shard_size=700) as index:
        index.add(xb[:1500])
    np.save(tmp_path / "x.npy", xb)
    proc = subprocess.run(
        [sys.executable, "-c", _THREADS, str(path), str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("failures 0"), proc.stdout
    _, ntotal, n_removed = lines[-2].split()
    assert int(ntotal) == 1500 + 60 * 30 - int(n_removed)
    with ShardedIndex.open(path) as index:  # what the writer committed is all there
        assert index.ntotal == int(ntotal)
