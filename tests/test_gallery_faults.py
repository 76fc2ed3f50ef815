"""Gallery under faults: kills at every step, full disks, failed commits, damaged bytes of the
database and its log, concurrent readers, read-only processes, planted symlinks, the umask."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import fastface.gallery.enrolment as enrolment_mod
import fastface.gallery.erasure as erasure_mod
import fastface.gallery.files as files_mod
from fastface import Gallery, ShardedIndex
from fastface.datasets import SyntheticFaces
from fastface.errors import CorruptGalleryError, DiskFullError, ReadOnlyIndexError
from fastface.gallery.keys import SubjectSecrets
from fastface.gallery.records import Database
from fastface.index import storage

D = 32
PER = 4
N_SUBJECTS = 40
PURPOSE = "door_access"


def _subject(i: int) -> str:
    return f"subject-{i:03d}-zq"


def _data() -> np.ndarray:
    return SyntheticFaces(n_identities=N_SUBJECTS + 10, per_identity=PER, d=D, seed=3).vectors()[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A flat gallery over three sealed shards and an open one (built once, closed)."""
    root = tmp_path_factory.mktemp("faults")
    xb = _data()
    with Gallery.create(root / "base", d=D, purpose=PURPOSE, embedder_id="syn", shard_size=48) as g:
        for i in range(N_SUBJECTS):
            g.enroll(_subject(i), xb[i * PER : (i + 1) * PER], legal_basis="contract")
    np.save(root / "new.npy", xb[-PER:])
    return root, xb


def _copy(base, tmp_path: Path, name: str = "g") -> Path:
    path = tmp_path / name
    shutil.copytree(base[0] / "base", path)
    return path


def _records(path: Path) -> set[int]:
    with sqlite3.connect(path / "meta.sqlite") as db:
        return {r[0] for r in db.execute("SELECT id FROM records")}


def _used_slots(path: Path) -> int:
    data = (path / "subjects.keys").read_bytes()[64:]
    return sum(data[i : i + 64] != bytes(64) for i in range(0, len(data), 64))


def _assert_consistent(path: Path) -> Gallery:
    """Reopen: nothing pending, index == records, every row and secret checks, chain verifies."""
    g = Gallery.open(path)
    st = g.status()
    assert st["pending_purges"] == [] and st["replay"] is not None
    with sqlite3.connect(path / "meta.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM ops").fetchone()[0] == 0
        n_subjects = db.execute("SELECT COUNT(*) FROM subjects").fetchone()[0]
    assert set(g.index.live_ids().tolist()) == _records(path)
    assert g.index.pending_removals == 0
    v = g.verify()
    assert v["vectors_without_record"] == 0 and v["records_without_vector"] == 0
    assert _used_slots(path) == n_subjects  # no secret left without its subject
    assert sorted(p.name for p in path.iterdir() if p.name.startswith("index-")) == [
        st["index_dir"]
    ]
    return g


def _patterns(path: Path, xb: np.ndarray, v: int) -> dict[str, list[bytes]]:
    with Gallery.open(path) as g:
        ids = [r["id"] for r in g.export_subject(_subject(v)).records]
    x = xb[v * PER : (v + 1) * PER]
    return {
        "float16": [r.astype(np.float16).tobytes() for r in x],
        "ids": [int(i).to_bytes(8, "little") for i in ids],
        "subject": [_subject(v).encode()],
    }


def _found(root: Path, patterns: dict[str, list[bytes]]) -> dict[str, list[str]]:
    hits: dict[str, list[str]] = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            data = Path(dirpath, name).read_bytes()
            for kind, pats in patterns.items():
                if any(p in data for p in pats):
                    hits.setdefault(kind, []).append(name)
    return hits


# --- SIGKILL at every step --------------------------------------------------------------------
_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    import fastface.gallery.journal as journal
    from fastface import Gallery
    from fastface.datasets import SyntheticFaces
    from fastface.index import storage

    path, action, step, arg = sys.argv[1:5]
    armed = [False]

    def kill(name):
        if armed[0] and name == step:
            os.kill(os.getpid(), signal.SIGKILL)

    journal.step_hook = kill
    write_json = storage.atomic_write_json

    def patched(p, obj, **kw):
        hit = armed[0] and os.path.basename(p) == "manifest.json"
        if hit and step == "manifest":
            os.kill(os.getpid(), signal.SIGKILL)
        rec = write_json(p, obj, **kw)
        if hit and step == "manifest_after":
            os.kill(os.getpid(), signal.SIGKILL)
        return rec

    storage.atomic_write_json = patched
    g = Gallery.open(path)
    armed[0] = True
    if action == "enroll":
        g.enroll("newcomer-zq", np.load(arg), legal_basis="contract")
    elif action == "erase":
        g.erase_subject(arg)
    elif action == "compact":
        g.compact()
    else:
        g.train(SyntheticFaces(60, 5, 32, seed=1).vectors()[0])
    g.close()
    sys.exit(3)  # the step was never reached
    """
)


def _run_child(path: Path, action: str, step: str, arg: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), action, step, arg],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == -signal.SIGKILL, (step, out.returncode, out.stderr[-2000:])


_ENROLL_STEPS = ["enroll:logged", "manifest", "manifest_after", "enroll:indexed", "enroll:done"]


@pytest.mark.slow
@pytest.mark.parametrize("step", _ENROLL_STEPS)
def test_kill_during_enrolment_leaves_old_or_new(base, tmp_path, step):
    root, xb = base
    path = _copy(base, tmp_path)
    _run_child(path, "enroll", step, str(root / "new.npy"))
    committed = step == "enroll:done"  # the records' transaction is the commit point
    with _assert_consistent(path) as g:
        assert ("newcomer-zq" in g.subjects()) is committed
        m = g.search(xb[-PER:][:1], 1, requester="r", purpose=PURPOSE)
        assert (m.subject_ids[0] == ["newcomer-zq"]) is committed
        assert g.ntotal == (N_SUBJECTS + committed) * PER
        if not committed and step != "enroll:logged":
            assert g.status()["replay"]["enrolments_undone"] == 1


_ERASE_STEPS = [
    "erase:logged",
    "erase:hidden",
    "erase:shredded",
    "manifest",
    "manifest_after",
    "erase:index_purged",
    "erase:vacuumed",
]


@pytest.mark.slow
@pytest.mark.parametrize("step", _ERASE_STEPS)
def test_kill_during_erasure_still_erases(base, tmp_path, step):
    _root, xb = base
    victim = 1  # in a sealed shard
    path = _copy(base, tmp_path)
    pats = _patterns(path, xb, victim)
    _run_child(path, "erase", step, _subject(victim))
    with _assert_consistent(path) as g:
        assert _subject(victim) not in g.subjects()
        assert g.ntotal == (N_SUBJECTS - 1) * PER
        (receipt,) = g.erasure_receipts()
        assert receipt["records_erased"] == PER and receipt["stored_purged_at"]
        assert [e["kind"] for e in g.audit_log()].count("erase") == 1
    assert _found(path, pats) == {}


_COMPACT_STEPS = ["compact:start", "manifest", "manifest_after", "erase:index_purged"]


@pytest.mark.slow
@pytest.mark.parametrize("step", _COMPACT_STEPS)
def test_kill_during_compaction_completes_deferred_erasure(base, tmp_path, step):
    _root, xb = base
    path = _copy(base, tmp_path)
    pats = _patterns(path, xb, 2)
    with Gallery.open(path) as g:
        g.erase_subject(_subject(2), purge=False)
        assert g.index.pending_removals == PER
    _run_child(path, "compact", step, "")
    _assert_consistent(path).close()  # compact() had started: the next open finishes it
    assert _found(path, pats) == {}


@pytest.mark.slow
@pytest.mark.parametrize("step", ["manifest", "reindex:built", "reindex:switched"])
def test_kill_while_moving_to_ivfpq_keeps_every_record(base, tmp_path, step):
    _root, xb = base
    path = _copy(base, tmp_path)
    _run_child(path, "train", step, "")
    with _assert_consistent(path) as g:
        assert g.kind == ("ivfpq" if step == "reindex:switched" else "flat")
        m = g.search(xb[: N_SUBJECTS * PER], 1, requester="r", purpose=PURPOSE)
        assert [r[0] for r in m.subject_ids] == [_subject(i // PER) for i in range(m.scores.size)]


# --- failures change nothing -------------------------------------------------------------------
def _snapshot(path: Path) -> tuple:
    with Gallery.open(path, mode="r") as g:
        return g.ntotal, sorted(_records(path)), g.subjects(), _used_slots(path)


def test_enrolment_on_a_full_disk_changes_nothing_now_or_after_reopen(base, tmp_path, monkeypatch):
    _root, xb = base
    path = _copy(base, tmp_path)
    before = _snapshot(path)

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    g = Gallery.open(path)
    with monkeypatch.context() as m:
        m.setattr(storage, "write_fd", full)
        with pytest.raises(DiskFullError):
            g.enroll("newcomer-zq", xb[-PER:], legal_basis="contract")
    assert "newcomer-zq" not in g.subjects() and g.ntotal == before[0]
    g.close()
    assert _snapshot(path) == before
    with _assert_consistent(path) as g2:
        assert g2.status()["replay"]["enrolments_undone"] == 0


def test_enrolment_whose_commit_fails_is_undone_at_once(base, tmp_path, monkeypatch):
    _root, xb = base
    path = _copy(base, tmp_path)
    before = _snapshot(path)

    def fail(*a, **kw):
        raise sqlite3.OperationalError("database or disk is full")

    g = Gallery.open(path)
    with monkeypatch.context() as m:
        m.setattr(Database, "insert_records", fail)
        with pytest.raises(sqlite3.OperationalError, match="full"):
            g.enroll("newcomer-zq", xb[-PER:], legal_basis="contract")
    # the vectors reached the index, and left it again
    assert g.ntotal == before[0] and "newcomer-zq" not in g.subjects()
    g.close()
    assert _snapshot(path) == before
    _assert_consistent(path).close()


def test_enrolment_whose_commit_and_undo_fail_is_undone_at_the_next_open(
    base, tmp_path, monkeypatch
):
    _root, xb = base
    path = _copy(base, tmp_path)
    before = _snapshot(path)

    def fail(*a, **kw):
        raise sqlite3.OperationalError("database or disk is full")

    g = Gallery.open(path)
    with monkeypatch.context() as m:
        m.setattr(Database, "insert_records", fail)
        m.setattr(enrolment_mod, "undo", fail)
        with pytest.raises(sqlite3.OperationalError):
            g.enroll("newcomer-zq", xb[-PER:], legal_basis="contract")
    # not a record: searches never return it, even though its vectors are in the index
    m = g.search(xb[-PER:], 1, requester="r", purpose=PURPOSE)
    assert all("newcomer-zq" not in row for row in m.subject_ids)
    g.close()
    with _assert_consistent(path) as g2:  # the issue: this used to make it active
        assert g2.status()["replay"]["enrolments_undone"] == 1
        assert "newcomer-zq" not in g2.subjects()
    assert _snapshot(path) == before


@pytest.mark.parametrize(
    "bad",
    [np.full((PER, D), 7e4, np.float32), np.full((PER, D), np.nan, np.float32)],
    ids=["overflow", "nan"],
)
def test_out_of_range_enrolment_leaves_nothing(base, tmp_path, bad):
    path = _copy(base, tmp_path)
    before = _snapshot(path)
    with Gallery.open(path) as g:
        with pytest.raises(ValueError):
            g.enroll("newcomer-zq", bad, legal_basis="contract")
        with pytest.raises(Exception, match="no record"):
            g.export_subject("newcomer-zq")
    assert _snapshot(path) == before
    _assert_consistent(path).close()


def test_erasure_whose_purge_fails_is_complete_logically_and_purged_later(
    base, tmp_path, monkeypatch
):
    _root, xb = base
    path = _copy(base, tmp_path)
    pats = _patterns(path, xb, 3)

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    g = Gallery.open(path)
    with monkeypatch.context() as m:
        m.setattr(storage, "write_fd", full)
        r = g.erase_subject(_subject(3))
    assert r.purge_status == "pending" and "could not be rewritten" in r.purge_note
    assert r.records_erased == PER and r.subjects_shredded == 1
    res = g.search(xb[3 * PER : 4 * PER], 5, requester="r", purpose=PURPOSE)
    assert all(_subject(3) not in row for row in res.subject_ids)
    assert len(g.status()["pending_purges"]) == 1
    assert g.finish_purges() == []
    assert g.verify_receipt(r)["purged_at"] is not None
    g.close()
    assert _found(path, pats) == {}
    _assert_consistent(path).close()


@pytest.mark.parametrize("fail", ["shred", "receipt"])
def test_erasure_past_its_commit_point_never_raises(base, tmp_path, monkeypatch, fail):
    _root, xb = base
    path = _copy(base, tmp_path)
    pats = _patterns(path, xb, 6)
    g = Gallery.open(path)
    slots = _used_slots(path)

    def broken(*a, **kw):
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as m:
        if fail == "shred":
            m.setattr(SubjectSecrets, "shred", broken)
        else:
            m.setattr(erasure_mod, "_record", broken)
        r = g.erase_subject(_subject(6))
    assert r.records_erased == PER and r.purge_status == "pending"
    assert ("shredded" if fail == "shred" else "not stored") in r.purge_note
    assert _subject(6) not in g.subjects()
    assert _used_slots(path) == slots - (fail == "receipt")  # shredded unless that failed
    assert g.finish_purges() == []
    assert _used_slots(path) == slots - 1
    g.close()
    assert _found(path, pats) == {}
    with _assert_consistent(path) as g2:
        assert len(g2.erasure_receipts()) == 1


# --- concurrent readers -----------------------------------------------------------------------
_HOLD = textwrap.dedent(
    """
    import sqlite3, sys
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    db.execute("BEGIN")
    db.execute("SELECT COUNT(*) FROM records").fetchone()
    print("holding", flush=True)
    sys.stdin.readline()
    db.execute("COMMIT")
    db.close()
    """
)


def test_erasure_with_a_reader_holding_the_database(base, tmp_path):
    _root, xb = base
    path = _copy(base, tmp_path)
    pats = _patterns(path, xb, 4)
    g = Gallery.open(path)
    reader = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path / "meta.sqlite")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "holding"
        t0 = time.perf_counter()
        r = g.erase_subject(_subject(4))  # the issue: blocked 30 s, then raised, no receipt
        assert time.perf_counter() - t0 < 10
        assert r.records_erased == PER and r.purge_status == "pending"
        assert "reader" in r.purge_note and r.subjects_shredded == 1
        assert g.status()["pending_purges"][0]["receipt"] == r.digest
        res = g.search(xb[4 * PER : 5 * PER], 3, requester="r", purpose=PURPOSE)
        assert all(_subject(4) not in row for row in res.subject_ids)
        assert _found(path, {"subject": pats["subject"]}) == {}  # never stored in plain text
    finally:
        reader.communicate("\n", timeout=30)
    assert g.finish_purges() == []
    assert g.verify_receipt(r)["purged_at"] is not None
    wal = path / "meta.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    g.close()
    assert _found(path, pats) == {}


_READER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from fastface import Gallery
    g = Gallery.open(sys.argv[1], mode="r")
    xb = np.load(sys.argv[2])
    for line in sys.stdin:
        cmd, arg = line.split()
        if cmd == "search":
            m = g.search(xb[int(arg)][None], 1, requester="reader", purpose="door_access")
            print(json.dumps(m.subject_ids[0]), flush=True)
        elif cmd == "enroll":
            try:
                g.enroll("x-zq", xb[:1], legal_basis="contract")
            except Exception as e:
                print(json.dumps(type(e).__name__), flush=True)
    """
)


def test_a_read_only_process_searches_while_one_writes(base, tmp_path):
    _root, xb = base
    path = _copy(base, tmp_path)
    np.save(tmp_path / "xb.npy", xb)
    g = Gallery.open(path)
    child = subprocess.Popen(
        [sys.executable, "-c", _READER, str(path), str(tmp_path / "xb.npy")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None

    def ask(line: str):
        child.stdin.write(line + "\n")
        child.stdin.flush()
        return json.loads(child.stdout.readline())

    try:
        assert ask(f"search {5 * PER}") == [_subject(5)]
        g.erase_subject(_subject(5))
        assert ask(f"search {5 * PER}") != [_subject(5)]  # erased: gone for readers at once
        g.enroll("late-zq", xb[-PER:], legal_basis="contract")
        assert ask(f"search {len(xb) - 1}") == ["late-zq"]  # the reader follows the writer
        assert ask("enroll 0") == "ReadOnlyIndexError"
    finally:
        child.stdin.close()
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == 0
    requesters = [e["requester"] for e in g.audit_log() if e["kind"] == "search"]
    assert requesters.count("reader") == 3  # the reader's searches are audited
    with Gallery.open(path, mode="r") as ro, pytest.raises(ReadOnlyIndexError):
        ro.erase_subject(_subject(6))
    g.close()


# --- damaged bytes: the database and its write-ahead log --------------------------------------
_FUZZ = textwrap.dedent(
    """
    import json, shutil, sys
    from pathlib import Path
    import numpy as np
    from fastface import Gallery
    from fastface.errors import CorruptGalleryError

    src, work, target, positions, xb_path, baseline = sys.argv[1:7]
    xb = np.load(xb_path)
    base = json.loads(Path(baseline).read_text())
    for pos in json.loads(positions):
        g_dir = Path(work) / "g"
        shutil.rmtree(g_dir, ignore_errors=True)
        shutil.copytree(src, g_dir)
        f = g_dir / target
        data = bytearray(f.read_bytes())
        data[pos] ^= 0x5A
        f.write_bytes(bytes(data))
        out = {"pos": pos}
        try:
            with Gallery.open(g_dir) as g:
                m = g.search(xb, 1, requester="r", purpose="door_access")
                got = [row[0] if row else None for row in m.subject_ids]
                out["wrong"] = sum(a != b for a, b in zip(got, base["subjects"]) if a is not None)
                out["missing"] = sum(a is None for a in got)
                out["exported"] = [
                    len(g.export_subject(s).records) for s in ("subject-000-zq", "subject-039-zq")
                ]
                v = g.verify()
                st = g.status()
                out["state"] = [v["records"], st["audit_head"]["seq"]]
                out["discarded"] = st["wal"]["discarded_frames"]
                out["repaired"] = st["reconciliation"]
                out["consistent"] = v["vectors_without_record"] == 0
            out["outcome"] = "opened"
        except CorruptGalleryError as e:
            out["outcome"] = "detected"
            out["path"] = str(e.path)
        except Exception as e:
            out["outcome"] = "other"
            out["error"] = type(e).__name__ + ": " + str(e)[:200]
        print(json.dumps(out), flush=True)
    """
)


def _fuzz(src: Path, target: str, positions: list[int], xb: np.ndarray, baseline: dict, tmp: Path):
    np.save(tmp / "xb.npy", xb)
    (tmp / "baseline.json").write_text(json.dumps(baseline))
    (tmp / "work").mkdir(exist_ok=True)
    out = subprocess.run(
        [sys.executable, "-c", _FUZZ, str(src), str(tmp / "work"), target,
         json.dumps(positions), str(tmp / "xb.npy"), str(tmp / "baseline.json")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]  # an abort would be counted here
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == len(positions)
    return rows


def _baseline(path: Path, xb: np.ndarray) -> dict:
    with Gallery.open(path) as g:
        m = g.search(xb, 1, requester="r", purpose=PURPOSE)
        v = g.verify()
        return {
            "subjects": [row[0] for row in m.subject_ids],
            "state": [v["records"], g.audit_head()["seq"] + 3],  # + the child's search, exports
        }


@pytest.mark.slow
def test_single_byte_edits_of_the_database_are_detected_or_harmless(base, tmp_path):
    _root, xb = base
    path = _copy(base, tmp_path)
    q = xb[: N_SUBJECTS * PER]
    baseline = _baseline(path, q)
    shutil.copytree(path, tmp_path / "pristine")
    size = (path / "meta.sqlite").stat().st_size
    rng = np.random.default_rng(0)
    # the header, then bytes spread over every page (cell contents, pointers, free space)
    positions = sorted({*range(0, 100, 7), *rng.choice(size, 120, replace=False).tolist()})
    rows = _fuzz(tmp_path / "pristine", "meta.sqlite", positions, q, baseline, tmp_path)
    for r in rows:
        assert r["outcome"] in ("opened", "detected"), r
        if r["outcome"] == "detected":
            assert r["path"].endswith("meta.sqlite"), r
        else:  # never a face under another subject, never a silent change
            assert r["wrong"] == 0 and r["missing"] == 0 and r["consistent"], r
            assert r["state"] == baseline["state"] and r["exported"] == [PER, PER], r
    assert sum(r["outcome"] == "detected" for r in rows) >= 10


_CRASH_WITH_WAL = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from fastface import Gallery
    g = Gallery.open(sys.argv[1])
    xb = np.load(sys.argv[2])
    for i in range(3):
        g.enroll(f"late-{i}-zq", xb[i * 4 : (i + 1) * 4], legal_basis="contract")
        g.search(xb[:2], 1, requester="w", purpose="door_access")
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.slow
def test_single_byte_edits_of_the_wal_after_a_crash_are_detected_or_reported(base, tmp_path):
    _root, xb = base
    path = _copy(base, tmp_path)
    late = xb[N_SUBJECTS * PER : (N_SUBJECTS + 3) * PER]
    np.save(tmp_path / "late.npy", late)
    out = subprocess.run(
        [sys.executable, "-c", _CRASH_WITH_WAL, str(path), str(tmp_path / "late.npy")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    wal = path / "meta.sqlite-wal"
    size = wal.stat().st_size
    assert size > 4096  # committed frames wait in the log
    shutil.copytree(path, tmp_path / "crashed")
    q = xb[: (N_SUBJECTS + 3) * PER]
    baseline = _baseline(path, q)  # the undamaged log replays every commit
    assert baseline["subjects"][-1] == "late-2-zq"
    page = 24 + int.from_bytes((tmp_path / "crashed" / "meta.sqlite-wal").read_bytes()[8:12], "big")
    nframes = (size - 32) // page
    rng = np.random.default_rng(1)
    positions = [*range(0, 32, 3)]  # the log header
    for f in range(nframes):  # each frame: its header and a byte of its page
        positions += [32 + f * page + int(rng.integers(0, 24)), 32 + f * page + 24 + 100]
    rows = _fuzz(tmp_path / "crashed", "meta.sqlite-wal", positions, q, baseline, tmp_path)
    detected = 0
    for r in rows:
        assert r["outcome"] in ("opened", "detected"), r
        if r["outcome"] == "detected":
            detected += 1
            assert r["path"].endswith("meta.sqlite-wal"), r
            continue
        assert r["wrong"] == 0 and r["consistent"], r  # index and records agree after open
        if r["state"] != baseline["state"] or r["missing"]:
            # a lost commit is never silent: the damaged tail is reported, orphans repaired
            assert r["discarded"] > 0 and r["repaired"]["wal_frames_discarded"] > 0, r
    assert detected >= nframes // 2


# --- orphans on either side ---------------------------------------------------------------------
def test_vectors_without_records_are_purged_and_reported(base, tmp_path):
    _root, xb = base
    path = _copy(base, tmp_path)
    with ShardedIndex.open(path / "index-1", mode="a") as ix:  # a lost database commit
        ix.add(xb[-2:], np.array([12345, 67890]))
    with Gallery.open(path) as g:
        rep = g.status()["reconciliation"]
        assert rep["orphan_vectors_purged"] == 2
        assert not g.index.stored(np.array([12345, 67890])).any()
        assert g.audit_log()[-1]["kind"] == "reconcile"
    _assert_consistent(path).close()


def test_records_without_vectors_are_reported_and_erasable(base, tmp_path):
    _root, _xb = base
    path = _copy(base, tmp_path)
    with Gallery.open(path, mode="r") as g:
        ids = [r["id"] for r in g.export_subject(_subject(8)).records]
    with ShardedIndex.open(path / "index-1", mode="a") as ix:  # a restored, older index
        ix.remove(ids[:2])
        ix.compact()
    with Gallery.open(path) as g:
        assert g.status()["reconciliation"]["records_without_vector"] == 2
        exp = g.export_subject(_subject(8))
        assert sum(r.get("vector") == "missing" for r in exp.records) == 2
        assert np.isnan(exp.embeddings).any(axis=1).sum() == 2
        assert g.erase_subject(_subject(8)).records_erased == PER
    _assert_consistent(path).close()


def test_a_damaged_key_store_or_config_is_named(base, tmp_path):
    path = _copy(base, tmp_path)
    data = bytearray((path / "subjects.keys").read_bytes())
    data[64 + 20] ^= 1  # a secret's byte
    (path / "subjects.keys").write_bytes(bytes(data))
    with pytest.raises(CorruptGalleryError, match=r"subjects\.keys") as e:
        Gallery.open(path)
    assert e.value.path.endswith("subjects.keys")
    path2 = _copy(base, tmp_path, "g2")
    cfg = (path2 / "gallery.json").read_text().replace('"door_access"', '"door_accesS"')
    (path2 / "gallery.json").write_text(cfg)
    with pytest.raises(CorruptGalleryError, match=r"gallery\.json"):
        Gallery.open(path2)


# --- files: owner-only, no umask, no symlink followed ------------------------------------------
def test_files_are_owner_only_whatever_the_umask(tmp_path):
    xb = _data()
    old = os.umask(0)
    try:
        with Gallery.create(tmp_path / "g", d=D, purpose="p", embedder_id="e") as g:
            g.enroll("a-zq", xb[:PER], legal_basis="contract")
            g.search(xb[:1], 1, requester="r", purpose="p")
            g.export_subject("a-zq").write(tmp_path / "out")
            seen = {p.name for p in (tmp_path / "g").iterdir()}
            assert {"meta.sqlite-wal", "meta.sqlite-shm"} <= seen
            for dirpath, dirs, names in os.walk(tmp_path):
                for name in dirs + names:
                    mode = os.stat(Path(dirpath, name)).st_mode & 0o777
                    assert mode in (0o600, 0o700), (name, oct(mode))
    finally:
        os.umask(old)


def test_the_gallery_never_touches_the_umask_under_threads(base, tmp_path, monkeypatch):
    _root, xb = base
    path = _copy(base, tmp_path)
    calls: list[int] = []
    real = os.umask
    monkeypatch.setattr(os, "umask", lambda m: calls.append(m) or real(m))
    errors: list[BaseException] = []
    g = Gallery.open(path)

    def work(t: int) -> None:
        try:
            for i in range(3):
                name = f"thread-{t}-{i}-zq"
                g.enroll(name, xb[-PER:], legal_basis="contract")
                g.search(xb[:4], 2, requester=f"t{t}", purpose=PURPOSE)
                g.export_subject(name).write(tmp_path / f"out-{t}-{i}")
                g.erase_subject(name)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    g.close()
    assert errors == [] and calls == []  # the issue: Gallery set umask 077 around its writes
    _assert_consistent(path).close()


def test_export_never_follows_a_planted_symlink(base, tmp_path, monkeypatch):
    path = _copy(base, tmp_path)
    victim = tmp_path / "elsewhere.npy"
    victim.write_bytes(b"keep me")
    out = tmp_path / "out"
    out.mkdir(mode=0o755)
    os.chmod(out, 0o755)
    (out / "embeddings.npy").symlink_to(victim)  # at the final name
    (out / "subject.json").symlink_to(tmp_path / "nowhere.json")
    # and at the temporary name, made predictable for this test
    names = iter(["aa", "bb", "cc", "dd"])
    monkeypatch.setattr(files_mod.secrets, "token_hex", lambda n=8: next(names))
    (out / ".embeddings.npy.tmp-aa").symlink_to(victim)
    with Gallery.open(path, mode="r") as g:
        exp = g.export_subject(_subject(0))
        js, npy = exp.write(out)
    assert victim.read_bytes() == b"keep me" and not (tmp_path / "nowhere.json").exists()
    for f in (js, npy):
        assert not f.is_symlink() and os.stat(f).st_mode & 0o777 == 0o600
    np.testing.assert_array_equal(np.load(npy), exp.embeddings)
    # a symlink in place of the export directory itself is refused
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(NotADirectoryError, match="symbolic link"):
        exp.write(tmp_path / "link")
    assert list((tmp_path / "real").iterdir()) == []
