"""Gallery: legal basis, audited search, export, erasure (logical and physical), crash safety."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pytest

from fastface import Gallery, IVFPQParams
from fastface.datasets import SyntheticFaces
from fastface.errors import AuditChainError, IndexLockedError, UnknownSubjectError

D = 32
NLIST = 16
PARAMS = IVFPQParams(D, NLIST, 16, nbits=8)
PURPOSE = "door_access"
PER = 8  # vectors per subject
N_SUBJECTS = 60


def _data() -> tuple[np.ndarray, np.ndarray]:
    xb, labels = SyntheticFaces(
        n_identities=N_SUBJECTS + 5, per_identity=PER, d=D, seed=7
    ).vectors()
    return xb, labels


def _subject(i: int) -> str:
    return f"subject-{i:03d}-zq"


def _build(path: Path, *, shard_size: int = 200) -> tuple[Gallery, np.ndarray]:
    """A gallery with N_SUBJECTS subjects over sealed shards and an open one."""
    train, _ = SyntheticFaces(n_identities=400, per_identity=5, d=D, seed=99).vectors()
    xb, _ = _data()
    g = Gallery.create(
        path,
        d=D,
        params=PARAMS,
        purpose=PURPOSE,
        embedder_id="synthetic",
        embedder_version="1",
        shard_size=shard_size,
    )
    g.train(train)
    for i in range(N_SUBJECTS):
        g.enroll(_subject(i), xb[i * PER : (i + 1) * PER], legal_basis="contract", source="test")
    return g, xb


@pytest.fixture(scope="module")
def base_gallery(tmp_path_factory):
    """Built once per module (closed); tests work on copies."""
    root = tmp_path_factory.mktemp("base")
    g, xb = _build(root / "base")
    g.close()
    np.save(root / "new.npy", xb[-PER:])
    return root, xb


def _copy(base_gallery, tmp_path: Path) -> Path:
    path = tmp_path / "g"
    shutil.copytree(base_gallery[0] / "base", path)
    return path


@pytest.fixture
def gallery(base_gallery, tmp_path: Path):
    g = Gallery.open(_copy(base_gallery, tmp_path))
    yield g, base_gallery[1]
    g.close()


# --- helpers that read the gallery from outside -----------------------------------------------
def _records(path: Path) -> list[tuple]:
    with sqlite3.connect(path / "meta.sqlite") as db:
        return db.execute("SELECT id, subject_id, state FROM records").fetchall()


def _stored_codes(g: Gallery, ids: np.ndarray) -> list[bytes]:
    """PQ codes of ``ids`` as stored in the shards' inverted lists."""
    want = set(ids.tolist())
    out = []
    for shard in g.index.shards():
        index = shard.to_faiss()  # a FAISS IndexIVFPQ holding the shard's codes
        invlists = index.invlists
        cs = invlists.code_size
        for lst in range(index.nlist):
            n = invlists.list_size(lst)
            if not n:
                continue
            lid = faiss.rev_swig_ptr(invlists.get_ids(lst), n).copy()
            codes = faiss.rev_swig_ptr(invlists.get_codes(lst), n * cs).copy()
            for j in np.flatnonzero(np.isin(lid, list(want))):
                out.append(codes[j * cs : (j + 1) * cs].tobytes())
    return out


def _patterns(g: Gallery, subject: str, x: np.ndarray, ids: np.ndarray) -> dict[str, list[bytes]]:
    return {
        "float32": [row.tobytes() for row in x.astype(np.float32)],
        "float16": [row.tobytes() for row in x.astype(np.float16)],
        "codes": _stored_codes(g, ids),
        "ids": [int(i).to_bytes(8, "little") for i in ids],
        "subject": [subject.encode()],
    }


def _found(root: Path, patterns: dict[str, list[bytes]]) -> dict[str, list[str]]:
    """Which kinds of pattern occur in which files under ``root`` (raw bytes)."""
    hits: dict[str, list[str]] = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            data = Path(dirpath, name).read_bytes()
            for kind, pats in patterns.items():
                if any(p in data for p in pats):
                    hits.setdefault(kind, []).append(name)
    return hits


def _searchable_ids(g: Gallery) -> set[int]:
    every = np.concatenate([s.ids for s in g.index.shards()] + [np.empty(0, np.int64)])
    return set(every[g.index.contains(every)].tolist())


def _assert_consistent(path: Path) -> None:
    """Reopen: no pending op, the active records are exactly the searchable vectors."""
    with Gallery.open(path) as g:
        with sqlite3.connect(path / "meta.sqlite") as db:
            assert db.execute("SELECT COUNT(*) FROM ops").fetchone()[0] == 0
            states = {r[0] for r in db.execute("SELECT DISTINCT state FROM records")}
        assert states <= {"active"}
        active = {r[0] for r in _records(path)}
        assert _searchable_ids(g) == active
        assert g.index.pending_removals == 0
        g.audit_log()  # the chain verifies


# --- enrolment and search ----------------------------------------------------------------------
def test_search_finds_the_enrolled_subject_like_brute_force(gallery):
    g, xb = gallery
    q = xb[[3, 8 * PER + 1, 20 * PER + 5]]
    m = g.search(q, 5, requester="gate-1", purpose=PURPOSE, nprobe=NLIST)
    truth = np.argmax(q @ xb[: N_SUBJECTS * PER].T, axis=1) // PER  # brute force, exact
    assert [row[0] for row in m.subject_ids] == [_subject(int(i)) for i in truth]
    assert m.scores.shape == (3, 5) and m.record_ids.dtype == np.int64
    # threshold drops weak matches; results stay sorted best first
    t = float(np.median(m.scores))
    mt = g.search(q, 5, requester="gate-1", purpose=PURPOSE, nprobe=NLIST, threshold=t)
    for r in range(3):
        n = len(mt.subject_ids[r])
        assert (mt.scores[r, :n] >= t).all() and (mt.record_ids[r, n:] == -1).all()


def test_records_carry_their_metadata(gallery):
    g, xb = gallery
    until = dt.date.today() + dt.timedelta(days=30)
    ids = g.enroll(
        "eve-q",
        xb[-PER:],
        legal_basis="consent",
        consent_ref="form-9",
        source="kiosk",
        retain_until=until,
    )
    exp = g.export_subject("eve-q")
    assert sorted(r["id"] for r in exp.records) == sorted(ids.tolist())
    r = exp.records[0]
    assert (r["legal_basis"], r["consent_ref"], r["source"]) == ("consent", "form-9", "kiosk")
    assert (r["embedder_id"], r["embedder_version"]) == ("synthetic", "1")
    assert r["retain_until"].startswith(until.isoformat()) and r["enrolled_at"]
    assert len(set(ids.tolist())) == PER


def _state(g: Gallery, path: Path):
    with sqlite3.connect(path / "meta.sqlite") as db:
        n_audit = db.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
    return g.ntotal, sorted(_records(path)), n_audit


def test_bad_input_is_refused_and_changes_nothing(gallery, tmp_path):
    g, xb = gallery
    path = g.path
    before = _state(g, path)
    x = xb[:2]
    bad_enrolments = [
        (dict(legal_basis=None), ValueError, "legal basis"),
        (dict(legal_basis=""), ValueError, "legal basis"),
        (dict(legal_basis="because"), ValueError, "art. 6"),
        (dict(legal_basis="consent"), ValueError, "consent_ref"),
        (dict(legal_basis="contract", retain_until="2001-01-01"), ValueError, "past"),
        (dict(legal_basis="contract", retain_until="soon"), ValueError, "ISO"),
    ]
    for kw, exc, msg in bad_enrolments:
        with pytest.raises(exc, match=msg):
            g.enroll("new-one", x, **kw)
    with pytest.raises(ValueError, match="at least one row"):
        g.enroll("new-one", x[:0], legal_basis="contract")
    with pytest.raises(ValueError, match="d=32"):
        g.enroll("new-one", np.zeros((2, 16), np.float32), legal_basis="contract")
    with pytest.raises(TypeError, match="float32"):
        g.enroll("new-one", x.astype(np.float64), legal_basis="contract")
    with pytest.raises(ValueError, match="subject_id"):
        g.enroll("  ", x, legal_basis="contract")
    with pytest.raises(PermissionError, match="purpose"):
        g.search(x, 3, requester="r", purpose="marketing")
    with pytest.raises(ValueError, match="requester"):
        g.search(x, 3, requester="", purpose=PURPOSE)
    with pytest.raises(ValueError, match="d=32"):
        g.search(np.zeros((1, 8), np.float32), 3, requester="r", purpose=PURPOSE)
    with pytest.raises(UnknownSubjectError, match="nobody"):
        g.export_subject("nobody")
    with pytest.raises(UnknownSubjectError, match="nobody"):
        g.erase_subject("nobody")
    with pytest.raises(IndexLockedError, match="another process"):
        Gallery.open(path)
    assert _state(g, path) == before
    with pytest.raises(FileExistsError):
        Gallery.create(path, d=D, params=PARAMS, purpose=PURPOSE, embedder_id="x")
    with pytest.raises(ValueError, match=r"params\.d"):
        Gallery.create(tmp_path / "other", d=64, params=PARAMS, purpose=PURPOSE, embedder_id="x")


def test_second_process_gets_a_clear_lock_error(gallery):
    g, _ = gallery
    code = (
        "import sys\nfrom fastface import Gallery\nfrom fastface.errors import IndexLockedError\n"
        "try:\n    Gallery.open(sys.argv[1])\nexcept IndexLockedError as e:\n"
        "    print(e); sys.exit(7)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(g.path)], capture_output=True, text=True)
    assert out.returncode == 7, out.stderr
    assert "another process" in out.stdout


def test_files_are_owner_only(gallery):
    g, _ = gallery
    for dirpath, dirs, files in os.walk(g.path):
        for name in dirs + files:
            mode = os.stat(Path(dirpath, name)).st_mode & 0o777
            assert mode & 0o077 == 0, (name, oct(mode))


def test_rerank_gives_exact_scores(gallery):
    g, xb = gallery
    q = xb[:2]
    m = g.search(q, 3, requester="r", purpose=PURPOSE, nprobe=NLIST, rerank=50)
    assert m.subject_ids[0][0] == _subject(0)
    # exact re-ranking: the top score is the exact inner product with the stored vector
    # (float16 storage), here the query itself
    np.testing.assert_allclose(m.scores[:, 0], (q * q).sum(1), atol=2e-3)
    with pytest.raises(ValueError, match="rerank"):
        g.search(q, 3, requester="r", purpose=PURPOSE, rerank=0)


# --- erasure ---------------------------------------------------------------------------------
@pytest.mark.parametrize("purge", [True, False])
@pytest.mark.parametrize("victim", [2, N_SUBJECTS - 1])  # sealed shard, open shard
def test_erased_subject_is_never_returned(gallery, purge, victim):
    g, xb = gallery
    name = _subject(victim)
    x = xb[victim * PER : (victim + 1) * PER]
    ids = {r[0] for r in _records(g.path) if r[1] == name}
    receipt = g.erase_subject(name, purge=purge)
    assert receipt.records_erased == PER and receipt.subject_ids == (name,)
    k = N_SUBJECTS * PER
    m = g.search(x, k, requester="r", purpose=PURPOSE, nprobe=NLIST)
    assert not ids & set(m.record_ids.ravel().tolist())
    assert all(name not in row for row in m.subject_ids)
    # tombstones are applied inside the scan: k results still come back
    n_left = (N_SUBJECTS - 1) * PER
    m10 = g.search(x, 10, requester="r", purpose=PURPOSE, nprobe=NLIST)
    assert all(len(row) == 10 for row in m10.subject_ids)
    assert (m.record_ids >= 0).sum(axis=1).tolist() == [n_left] * PER
    if not purge:
        assert receipt.purged_at is None
        assert g.compact()["erasures_completed"] == 1
    assert g.index.pending_removals == 0
    assert not ids & _searchable_ids(g)
    with pytest.raises(UnknownSubjectError):
        g.erase_subject(name)


@pytest.mark.parametrize("vacuum", [True, False])
def test_purge_leaves_no_byte_of_the_subject(gallery, vacuum):
    g, xb = gallery
    victims = [4, N_SUBJECTS - 1]  # one in a sealed shard, one in the open shard
    pats: dict[str, list[bytes]] = {}
    for v in victims:
        name = _subject(v)
        ids = np.array([r[0] for r in _records(g.path) if r[1] == name], np.int64)
        for kind, p in _patterns(g, name, xb[v * PER : (v + 1) * PER], ids).items():
            pats.setdefault(kind, []).extend(p)
    assert len(pats["codes"]) == len(victims) * PER
    before = _found(g.path, pats)
    # the scan sees them before: vectors and ids in SQLite and the shards, codes in the shards
    assert {"float32", "codes", "ids", "subject"} <= set(before), before
    receipts = [g.erase_subject(_subject(v), vacuum=vacuum) for v in victims]
    assert all(r.vacuumed is vacuum for r in receipts)
    assert all(r.purged_at and r.shards_rewritten >= 1 for r in receipts)
    assert _found(g.path, pats) == {}
    assert not [r for r in _records(g.path) if r[1] in {_subject(v) for v in victims}]
    wal = g.path / "meta.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    with sqlite3.connect(g.path / "meta.sqlite") as db:
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
    if vacuum:
        assert free == 0  # the freed pages went back to the file system
    size = (g.path / "meta.sqlite").stat().st_size
    g.compact()  # a full VACUUM
    assert (g.path / "meta.sqlite").stat().st_size <= size
    assert _found(g.path, pats) == {}
    # the rest is intact
    assert g.ntotal == (N_SUBJECTS - len(victims)) * PER
    m = g.search(xb[:1], 1, requester="r", purpose=PURPOSE)
    assert m.subject_ids[0] == [_subject(0)]


def test_receipts_are_stored_without_the_subject_id(gallery):
    g, _ = gallery
    r = g.erase_subject(_subject(5))
    stored = g.erasure_receipts()
    assert len(stored) == 1 and stored[0]["digest"] == r.digest
    assert _subject(5) not in json.dumps(stored)
    assert r.invisible_ms >= 0 and r.purge_ms is not None and r.purge_ms >= 0


def test_erase_by_face_plans_then_erases(gallery):
    g, xb = gallery
    photo = xb[7 * PER + 2] + 0.01 * np.ones(D, np.float32)
    photo /= np.linalg.norm(photo)
    plan = g.erase_by_face(photo, 0.9)
    assert plan.subjects == {_subject(7): PER} and plan.record_ids.size == PER
    assert all(m["subject_id"] == _subject(7) and m["score"] >= 0.9 for m in plan.matches)
    assert g.ntotal == N_SUBJECTS * PER  # nothing erased yet
    only = g.erase_by_face(photo, 0.9, whole_subjects=False)
    assert only.record_ids.size == len(only.matches) >= 1
    receipt = plan.confirm(requester="dpo")
    assert receipt.records_erased == PER and receipt.reason == "erase_by_face"
    assert _subject(7) not in g.subjects()
    with pytest.raises(RuntimeError, match="changed"):
        only.confirm()
    empty = g.erase_by_face(photo, 0.99)
    with pytest.raises(UnknownSubjectError):
        empty.confirm()


def test_purge_expired_erases_only_past_retention(gallery):
    g, xb = gallery
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
    g.enroll("temp-visitor", xb[-PER:], legal_basis="legitimate_interests", retain_until=soon)
    assert g.purge_expired() is None
    r = g.purge_expired(now=soon + dt.timedelta(seconds=1))
    assert r is not None and r.subject_ids == ("temp-visitor",) and r.reason == "retention"
    assert "temp-visitor" not in g.subjects() and g.ntotal == N_SUBJECTS * PER


def test_deferred_erasure_stays_invisible_across_reopen(gallery):
    g, xb = gallery
    name = _subject(6)
    x = xb[6 * PER : 7 * PER]
    pats = _patterns(g, name, x, np.array([r[0] for r in _records(g.path) if r[1] == name]))
    g.erase_subject(name, purge=False)
    g.close()
    with Gallery.open(g.path) as g2:
        assert g2.index.pending_removals == PER
        m = g2.search(x, 50, requester="r", purpose=PURPOSE, nprobe=NLIST)
        assert all(name not in row for row in m.subject_ids)
        assert "float32" in _found(g2.path, pats)  # not purged yet: that is compact()'s job
        assert g2.compact() == {
            "erasures_completed": 1,
            "records_purged": PER,
            "pending_removals_folded": PER,
        }
        assert _found(g2.path, pats) == {}


def test_enroll_many_is_one_atomic_batch(gallery):
    g, xb = gallery
    names = ["bulk-a"] * 3 + ["bulk-b"] * 2
    ids = g.enroll_many(names, xb[-5:], legal_basis="public_task")
    assert ids.size == 5 and {"bulk-a", "bulk-b"} <= set(g.subjects())
    assert len(g.export_subject("bulk-b").records) == 2
    before = g.ntotal
    with pytest.raises(ValueError, match="one per row"):
        g.enroll_many(["x"] * 2, xb[:3], legal_basis="contract")
    with pytest.raises(ValueError, match="subject_ids"):
        g.enroll_many(["x", ""], xb[:2], legal_basis="contract")
    assert g.ntotal == before


def test_reenrolment_after_deferred_erasure_gets_new_ids(gallery):
    g, xb = gallery
    name = _subject(3)
    old = {r[0] for r in _records(g.path) if r[1] == name}
    g.erase_subject(name, purge=False)
    new = g.enroll(name, xb[3 * PER : 4 * PER], legal_basis="contract")
    assert not old & set(new.tolist())
    g.compact()
    assert {r[0] for r in _records(g.path) if r[1] == name} == set(new.tolist())
    m = g.search(xb[3 * PER : 3 * PER + 1], 1, requester="r", purpose=PURPOSE, nprobe=NLIST)
    assert m.subject_ids[0] == [name]


# --- export ----------------------------------------------------------------------------------
def test_export_is_complete(gallery, tmp_path):
    g, xb = gallery
    name = _subject(11)
    x = xb[11 * PER : 12 * PER]
    g.enroll(name, xb[-2:], legal_basis="contract")  # a second enrolment of the same subject
    hit = g.search(x[:1], 3, requester="gate-a", purpose=PURPOSE)
    g.search(xb[30 * PER : 30 * PER + 1], 3, requester="gate-b", purpose=PURPOSE)  # not them
    exp = g.export_subject(name)
    assert len(exp.records) == PER + 2
    ids = [r["id"] for r in exp.records]
    got = {i: exp.embeddings[j] for j, i in enumerate(ids)}
    with sqlite3.connect(g.path / "meta.sqlite") as db:
        held = db.execute("SELECT id, embedding FROM records WHERE subject_id=?", (name,))
        for i, blob in held:
            np.testing.assert_array_equal(got[i], np.frombuffer(blob, np.float32))
    assert {tuple(r) for r in np.round(exp.embeddings, 6)} == {
        tuple(r) for r in np.round(np.concatenate([x, xb[-2:]]), 6)
    }
    kinds = [e["kind"] for e in exp.audit]
    assert kinds.count("enroll") == 2 and kinds.count("search") == 1
    search = next(e for e in exp.audit if e["kind"] == "search")
    assert search["requester"] == "gate-a" and name in hit.subject_ids[0]
    assert exp.dedup["available"] and exp.dedup["groups"] == []  # no near copies here
    js, npy = exp.write(tmp_path / "export")
    back = json.loads(js.read_text())
    assert back["subject_id"] == name and len(back["records"]) == PER + 2
    np.testing.assert_array_equal(np.load(npy), exp.embeddings)
    # the export was audited, so the next export lists it
    assert [e["kind"] for e in g.export_subject(name).audit].count("export") == 1


# --- audit chain -----------------------------------------------------------------------------
def _tamper(path: Path, sql: str, *args) -> None:
    with sqlite3.connect(path / "meta.sqlite") as db:
        db.execute(sql, args)


@pytest.mark.parametrize(
    "attack",
    ["edit", "edit_and_rehash", "remove_middle", "remove_last", "append_forged"],
)
def test_audit_chain_detects_tampering(base_gallery, tmp_path, attack):
    xb = base_gallery[1]
    g = Gallery.open(_copy(base_gallery, tmp_path))
    for i in range(4):
        g.search(xb[i : i + 1], 2, requester=f"r{i}", purpose=PURPOSE)
    entries = g.audit_log()
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    assert len(g.audit_log(since=entries[-2]["time"])) == 2
    g.close()
    mid = len(entries) - 2
    path = g.path
    if attack == "edit":
        text = json.dumps({**entries[mid - 1], "requester": "someone-else"})
        _tamper(path, "UPDATE audit SET entry=? WHERE seq=?", text, mid)
    elif attack == "edit_and_rehash":
        import hashlib

        e = {k: v for k, v in entries[mid - 1].items() if k != "hash"}
        e["requester"] = "someone-else"
        text = json.dumps(e, sort_keys=True, separators=(",", ":"))
        h = hashlib.sha256((e["prev"] + text).encode()).hexdigest()
        _tamper(path, "UPDATE audit SET entry=?, hash=? WHERE seq=?", text, h, mid)
    elif attack == "remove_middle":
        _tamper(path, "DELETE FROM audit WHERE seq=?", mid)
    elif attack == "remove_last":
        _tamper(path, "DELETE FROM audit WHERE seq=?", len(entries))
    else:
        _tamper(path, "INSERT INTO audit VALUES (?, '{}', ?)", len(entries) + 1, "0" * 64)
    with Gallery.open(path) as g2, pytest.raises(AuditChainError):
        g2.audit_log()


def test_audit_entries_hold_no_subject_id_or_template(gallery):
    g, xb = gallery
    g.search(xb[:4], 3, requester="r", purpose=PURPOSE)
    e = g.audit_log()[-1]
    assert (e["kind"], e["requester"], e["purpose"]) == ("search", "r", PURPOSE)
    assert e["detail"]["nq"] == 4 and e["detail"]["results"] == 12
    assert len(e["subjects"]) == 1 and e["subjects_hash"]
    text = json.dumps(g.audit_log())
    assert "subject-" not in text
    with sqlite3.connect(g.path / "meta.sqlite") as db:
        blob = " ".join(r[0] for r in db.execute("SELECT entry FROM audit"))
    assert xb[0].tobytes().hex() not in blob and "subject-" not in blob


# --- crash safety ----------------------------------------------------------------------------
_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    import fastface.gallery as gm
    from fastface.index import storage

    path, action, step = sys.argv[1:4]
    armed = [False]

    def kill(name):
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)

    gm._step_hook = kill
    write_json = storage.atomic_write_json

    def patched(p, obj):
        if armed[0] and os.path.basename(p) == "manifest.json" and step == "manifest":
            os.kill(os.getpid(), signal.SIGKILL)
        rec = write_json(p, obj)
        if armed[0] and os.path.basename(p) == "manifest.json" and step == "manifest_after":
            os.kill(os.getpid(), signal.SIGKILL)
        return rec

    storage.atomic_write_json = patched
    g = gm.Gallery.open(path)
    armed[0] = True
    if action == "enroll":
        g.enroll("newcomer-zq", np.load(sys.argv[4]), legal_basis="contract")
    elif action == "erase":
        g.erase_subject(sys.argv[4])
    else:
        g.compact()
    g.close()
    sys.exit(3)  # the step was never reached
    """
)

_ENROLL_STEPS = ["enroll:logged", "manifest", "manifest_after", "enroll:indexed", "enroll:done"]
_ERASE_STEPS = [
    "erase:logged",
    "erase:hidden",
    "manifest",
    "manifest_after",
    "erase:index_purged",
    "erase:rows_deleted",
    "erase:vacuumed",
]
_COMPACT_STEPS = [
    "compact:start",
    "manifest",
    "manifest_after",
    "erase:index_purged",
    "erase:rows_deleted",
    "erase:vacuumed",
]


def _run_child(path: Path, action: str, step: str, arg: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), action, step, arg],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == -signal.SIGKILL, (step, out.returncode, out.stderr[-2000:])


@pytest.mark.slow
@pytest.mark.parametrize("step", _ENROLL_STEPS)
def test_kill_during_enrolment_leaves_old_or_new(base_gallery, tmp_path, step):
    root, xb = base_gallery
    path = _copy(base_gallery, tmp_path)
    _run_child(path, "enroll", step, str(root / "new.npy"))
    _assert_consistent(path)
    held = [r for r in _records(path) if r[1] == "newcomer-zq"]
    committed = step in ("manifest_after", "enroll:indexed", "enroll:done")
    assert len(held) == (PER if committed else 0)
    with Gallery.open(path) as g:
        m = g.search(xb[-PER:][:1], 1, requester="r", purpose=PURPOSE, nprobe=NLIST)
        assert (m.subject_ids[0] == ["newcomer-zq"]) is committed
        assert g.ntotal == (N_SUBJECTS + committed) * PER


def _victim_patterns(path: Path, xb: np.ndarray, v: int) -> dict[str, list[bytes]]:
    name = _subject(v)
    ids = np.array([r[0] for r in _records(path) if r[1] == name], np.int64)
    with Gallery.open(path) as g:
        return _patterns(g, name, xb[v * PER : (v + 1) * PER], ids)


@pytest.mark.slow
@pytest.mark.parametrize("step", _ERASE_STEPS)
@pytest.mark.parametrize("victim", [1, N_SUBJECTS - 1])
def test_kill_during_erasure_still_erases(base_gallery, tmp_path, step, victim):
    _root, xb = base_gallery
    path = _copy(base_gallery, tmp_path)
    pats = _victim_patterns(path, xb, victim)
    _run_child(path, "erase", step, _subject(victim))
    _assert_consistent(path)
    assert _found(path, pats) == {}
    with Gallery.open(path) as g:
        assert _subject(victim) not in g.subjects()
        assert g.ntotal == (N_SUBJECTS - 1) * PER
        (receipt,) = g.erasure_receipts()
        assert receipt["records_erased"] == PER


@pytest.mark.slow
@pytest.mark.parametrize("step", _COMPACT_STEPS)
def test_kill_during_compaction_completes_deferred_erasure(base_gallery, tmp_path, step):
    _root, xb = base_gallery
    path = _copy(base_gallery, tmp_path)
    pats = _victim_patterns(path, xb, 2)
    with Gallery.open(path) as g:
        g.erase_subject(_subject(2), purge=False)
        assert g.index.pending_removals == PER
    _run_child(path, "compact", step, "")
    _assert_consistent(path)
    assert _found(path, pats) == {}


def test_erasing_every_subject_leaves_an_empty_searchable_gallery(tmp_path):
    train, _ = SyntheticFaces(n_identities=400, per_identity=5, d=D, seed=99).vectors()
    with Gallery.create(
        tmp_path / "g", d=D, params=PARAMS, purpose=PURPOSE, embedder_id="syn"
    ) as g:
        g.train(train)
        g.enroll("only-one", train[:3], legal_basis="contract")  # all in the open shard
        assert g.erase_subject("only-one").records_erased == 3
        m = g.search(train[:2], 4, requester="r", purpose=PURPOSE)
        assert m.subject_ids == [[], []] and (m.record_ids == -1).all()
        assert np.isneginf(m.scores).all() and g.ntotal == 0


def test_enrolment_redraws_an_id_that_clashes_with_a_row(gallery, monkeypatch):
    g, xb = gallery
    existing = _records(g.path)[0][0]
    real = Gallery._new_ids
    calls = []

    def clashing(self, n):
        ids = real(self, n)
        calls.append(n)
        if len(calls) == 1:
            ids[0] = existing
        return ids

    monkeypatch.setattr(Gallery, "_new_ids", clashing)
    ids = g.enroll("clash-q", xb[:2], legal_basis="contract")
    assert len(calls) == 2 and existing not in ids.tolist()
    assert len(g.export_subject("clash-q").records) == 2
    assert g.ntotal == N_SUBJECTS * PER + 2


def test_export_lists_dedup_groups(gallery):
    g, xb = gallery
    v = xb[3 * PER]
    noise = np.random.default_rng(0).standard_normal(v.shape).astype(np.float32)
    noise -= (noise @ v) * v
    noise /= np.linalg.norm(noise)
    copy = (0.98 * v + np.sqrt(1 - 0.98**2) * noise).astype(np.float32)  # cosine 0.98
    g.enroll("someone-else", copy[None], legal_basis="contract")
    exp = g.export_subject(_subject(3))
    own = {r["id"] for r in exp.records}
    assert len(exp.dedup["groups"]) == 1
    group = exp.dedup["groups"][0]
    assert group["other_members"] == 1 and len(group["records"]) == 1
    assert set(group["records"]) <= own
    assert g.export_subject(_subject(3), dedup_threshold=0.99).dedup["groups"] == []
