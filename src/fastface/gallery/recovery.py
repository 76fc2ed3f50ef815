"""Opening a gallery for writing: replay the journal, then reconcile the stores.

Replay (journal.py has the rules): enrolments that never committed are
undone; erasures past their commit point are finished (deferred ones stay
hidden until ``compact()``).

Reconciliation then compares what each store holds, so that nothing is left
invisible and unerasable:

- vectors in the index without a record (a lost database transaction, a
  restored database): nobody can be named for them and no legal basis
  covers them, so they are removed from the index and purged;
- records without a vector (a restored index): kept (they are still data
  about their subject, exportable and erasable) and counted in the report;
- grants without records and subjects without grants: deleted (secrets
  shredded);
- secrets in ``subjects.keys`` that no subject row names: shredded; a
  subject row whose secret is missing is damage
  (:class:`~fastface.errors.CorruptGalleryError`).

Whatever was repaired is logged as a warning, appended to the audit log
(``reconcile``) and reported in ``Gallery.status()["reconciliation"]``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ..errors import CorruptGalleryError
from . import enrolment, erasure, journal
from .context import Context
from .records import chunks, marks

__all__ = ["reconcile", "replay"]

log = logging.getLogger("fastface")


def replay(ctx: Context) -> dict[str, int]:
    """Finish or undo what a killed (or failed) process left in the journal."""
    undone = finished = 0
    pending = journal.ops(ctx.db)
    for op_id, kind, _state, payload, ids in pending:
        if kind == "enroll":
            n = ids.size // 2
            enrolment.undo(ctx, op_id, payload, ids[:n])
            undone += 1
    erase_ops = [(op_id, p, ids) for op_id, kind, _s, p, ids in pending if kind == "erase"]
    now_ops = [t for t in erase_ops if t[1].get("purge", True)]
    later = [t for t in erase_ops if not t[1].get("purge", True)]
    if now_ops:
        erasure.finish(ctx, now_ops, time.perf_counter(), purge=True)
        finished += len(now_ops)
    if later:
        erasure.finish(ctx, later, time.perf_counter(), purge=False)
    return {"enrolments_undone": undone, "erasures_finished": finished}


def reconcile(ctx: Context, wal: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compare index, records, grants, subjects and secrets; repair what can be, report all.

    ``wal`` is :func:`~fastface.gallery.records.check_wal`'s report: frames of
    the log's last transaction that failed their checksum were not replayed
    (a write cut short by a crash, or damage to the last commit); that is
    reported too, since the transaction may have been committed.
    """
    db = ctx.db
    report: dict[str, Any] = {}
    if wal and wal.get("discarded_frames"):
        report["wal_frames_discarded"] = int(wal["discarded_frames"])
    live = np.sort(ctx.store.live_ids())
    hidden = np.concatenate(
        [ids for _, kind, _, _, ids in journal.ops(ctx.db) if kind == "erase"]
        or [np.empty(0, np.int64)]
    )
    records = db.all_record_ids()
    orphan_vectors = np.setdiff1d(live, records, assume_unique=True)
    orphan_vectors = np.setdiff1d(orphan_vectors, hidden)
    orphan_records = np.setdiff1d(records, live, assume_unique=True)
    if orphan_records.size:  # a damaged record id shows up here: damage raises, never "repairs"
        for part in chunks(orphan_records.tolist()):
            rows = db.conn.execute(
                f"SELECT id, gid, chk FROM records WHERE id IN ({marks(len(part))})", part
            ).fetchall()
            db.verify_records(rows)
    if orphan_vectors.size:
        ctx.store.hide(orphan_vectors)
        ctx.store.purge()
        report["orphan_vectors_purged"] = int(orphan_vectors.size)
    if orphan_records.size:
        report["records_without_vector"] = int(orphan_records.size)
    conn = db.conn
    empty_grants = [
        int(r[0])
        for r in conn.execute(
            "SELECT gid FROM grants WHERE NOT EXISTS (SELECT 1 FROM records r WHERE r.gid = "
            "grants.gid)"
        )
    ]
    empty_subjects = [
        (int(r[0]), int(r[1]))
        for r in conn.execute(
            "SELECT sid, slot FROM subjects s WHERE NOT EXISTS (SELECT 1 FROM grants g JOIN "
            "records r ON r.gid = g.gid WHERE g.sid = s.sid)"
        )
    ]
    used = ctx.secrets.scan()
    subject_slots = {
        int(slot): int(sid) for sid, slot in conn.execute("SELECT sid, slot FROM subjects")
    }
    for slot, sid in subject_slots.items():
        if used.get(slot) != sid:
            raise CorruptGalleryError(
                f"{ctx.secrets.path}: slot {slot} does not hold the secret of subject number "
                f"{sid} that {db.path} records; restore both from the same backup",
                str(ctx.secrets.path),
                f"slot[{slot}]",
            )
    orphan_slots = [(slot, sid) for slot, sid in used.items() if subject_slots.get(slot) != sid]
    if empty_grants or empty_subjects:
        with db.txn() as tx:
            for g in empty_grants:
                tx.execute("DELETE FROM grants WHERE gid=?", (g,))
            for sid, _slot in empty_subjects:
                tx.execute("DELETE FROM subjects WHERE sid=?", (sid,))
        orphan_slots += [(slot, sid) for sid, slot in empty_subjects]
        ctx.forget([sid for sid, _ in empty_subjects], empty_grants)
        if empty_grants:
            report["grants_without_records_deleted"] = len(empty_grants)
        if empty_subjects:
            report["subjects_without_records_deleted"] = len(empty_subjects)
    if orphan_slots:
        ctx.secrets.shred(orphan_slots)
        report["orphan_secrets_shredded"] = len(orphan_slots)
    seen = ctx.state()
    if int(seen.get("generation", 0)) < ctx.store.generation and (
        "orphan_vectors_purged" in report or seen.get("index") != ctx.store.dirname
    ):
        report["database_behind_index"] = True
    if report:
        log.warning("%s: reconciled the gallery's stores: %s", ctx.path, report)
        with db.txn() as tx:
            ctx.audit.append(
                tx, "reconcile", requester=None, purpose=None, subjects=(), detail=dict(report)
            )
            ctx.publish_state(tx)
    elif (
        int(seen.get("generation", -1)) != ctx.store.generation
        or seen.get("index") != ctx.store.dirname
    ):
        with db.txn() as tx:
            ctx.publish_state(tx, index=ctx.store.dirname)
    return report
