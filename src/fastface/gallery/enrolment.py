"""Enrolment: new subjects and grants, vectors into the index, records last (the commit point).

Order of an enrolment (journal.py explains the rule):

1. new subjects get a secret in ``subjects.keys`` (fsync);
2. one transaction writes the new subjects (id encrypted), one grant per
   subject (legal basis; consent reference and source encrypted) and the
   ``enroll`` op listing the record ids and grants;
3. the vectors are added to the index and committed;
4. one transaction inserts the records, deletes the op and appends the audit
   entry: from here on the enrolment exists.

Anything that raises before 4 commits is undone at once (and, should the
undo fail too, at the next open): the ids are removed from the index and
purged, the new grants and subjects deleted, their secrets shredded.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import sqlite3
from typing import Any

import numpy as np
import numpy.typing as npt

from . import journal, policy
from .context import Context, name_ad
from .keys import pseudonym, seal

__all__ = ["enroll", "new_ids", "undo"]

log = logging.getLogger("fastface")

MAX_ID = 2**62


def new_ids(ctx: Context, n: int) -> npt.NDArray[np.int64]:
    """Random record ids in ``1 .. 2**62``, unique, never held by the index (removed or not)."""
    rng = np.random.default_rng(secrets.randbits(128))
    while True:
        ids = rng.integers(1, MAX_ID, size=n, dtype=np.int64)
        if np.unique(ids).size == n and not ctx.store.stored(ids).any():
            return ids


def _new_number(conn: sqlite3.Connection, table: str, column: str, taken: set[int]) -> int:
    while True:
        v = secrets.randbelow(MAX_ID - 1) + 1
        if v in taken:
            continue
        if conn.execute(f"SELECT 1 FROM {table} WHERE {column}=?", (v,)).fetchone() is None:
            taken.add(v)
            return v


def enroll(
    ctx: Context,
    subjects: list[str],
    x: npt.NDArray[np.float32],
    *,
    legal_basis: str,
    consent_ref: str | None,
    source: str | None,
    retain_until: Any,
    requester: str | None,
) -> npt.NDArray[np.int64]:
    """Enrol row ``i`` of ``x`` (unit vectors, checked) for ``subjects[i]``; record ids."""
    ctx.require_writable("enrolment")
    retain = policy.check_grant(legal_basis, consent_ref, source, retain_until, requester)
    n = x.shape[0]
    names = sorted(set(subjects))
    with ctx.mutex:
        known = {name: ctx.find_subject(name) for name in names}
        fresh = [name for name in names if known[name] is None]
        taken: set[int] = set()
        conn0 = ctx.db.conn
        sids = {name: _new_number(conn0, "subjects", "sid", taken) for name in fresh}
        secret_of = {name: secrets.token_bytes(32) for name in fresh}
        slots = ctx.secrets.allocate([(sids[m], secret_of[m]) for m in fresh]) if fresh else []
        pairs = [[slot, sids[m]] for slot, m in zip(slots, fresh, strict=True)]
        for m in names:
            subj = known[m]
            if subj is not None:
                sids[m], secret_of[m] = subj.sid, subj.secret
        ids = new_ids(ctx, n)
        gid_of = {m: _new_number(conn0, "grants", "gid", taken) for m in names}
        row_gids = np.array([gid_of[s] for s in subjects], np.int64)
        now = policy.iso(policy.now())
        cfg = ctx.config
        try:
            with ctx.db.txn() as conn:
                for slot, m in zip(slots, fresh, strict=True):
                    blob = seal(secret_of[m], m.encode("utf-8"), name_ad(sids[m]))
                    ctx.db.insert_subject(conn, sids[m], ctx.keys.lookup_tag(m), slot, blob)
                for m in names:
                    gid, secret = gid_of[m], secret_of[m]
                    ctx.db.insert_grant(
                        conn,
                        (
                            gid,
                            sids[m],
                            legal_basis,
                            ctx.encrypt_field(secret, gid, "consent_ref", consent_ref),
                            ctx.encrypt_field(secret, gid, "source", source),
                            cfg["embedder_id"],
                            cfg["embedder_version"],
                            now,
                            retain,
                        ),
                    )
                op_id = journal.log_op(
                    conn,
                    "enroll",
                    "logged",
                    {"grants": list(gid_of.values()), "subjects": pairs, "n": n},
                    np.concatenate([ids, row_gids]),
                )
        except BaseException:
            ctx.secrets.shred([(s, sid) for s, sid in pairs])
            raise
        committed = False
        try:
            journal.step("enroll:logged")
            ctx.store.add(x, ids)
            journal.step("enroll:indexed")
            pseudonyms = []
            for m in names:
                subj = known[m]
                if subj is None:
                    pseudonyms.append(pseudonym(secret_of[m]))
                else:
                    pseudonyms.append(subj.pseudonym)
            with ctx.db.txn() as conn:
                ctx.db.insert_records(conn, ids, row_gids)
                journal.delete_op(conn, op_id)
                ctx.audit.append(
                    conn,
                    "enroll",
                    requester=requester,
                    purpose=None,
                    subjects=pseudonyms,
                    detail={"records": n, "subjects": len(names), "legal_basis": legal_basis},
                )
                ctx.publish_state(conn)
            committed = True
        finally:
            if not committed:
                try:
                    undo(ctx, op_id, {"grants": list(gid_of.values()), "subjects": pairs}, ids)
                except Exception as e:  # the next open undoes it (the op is still logged)
                    log.warning(
                        "%s: undoing a failed enrolment failed too (%s); the next "
                        "open will undo it",
                        ctx.path,
                        e,
                    )
        journal.step("enroll:done")
        return ids


def undo(ctx: Context, op_id: int, payload: dict[str, Any], ids: npt.NDArray[np.int64]) -> None:
    """Undo an enrolment that never committed: index, grants, new subjects, secrets, op."""
    present = ids[ctx.store.stored(ids)] if ids.size else ids
    if present.size:
        ctx.store.hide(present)
        ctx.store.purge()
    gids = [int(g) for g in payload.get("grants", [])]
    shred: list[tuple[int, int]] = []
    with ctx.db.txn() as conn:
        for g in gids:
            if conn.execute("SELECT 1 FROM records WHERE gid=? LIMIT 1", (g,)).fetchone() is None:
                conn.execute("DELETE FROM grants WHERE gid=?", (g,))
        for slot, sid in payload.get("subjects", []):
            if conn.execute("SELECT 1 FROM grants WHERE sid=? LIMIT 1", (sid,)).fetchone() is None:
                conn.execute("DELETE FROM subjects WHERE sid=?", (sid,))
                shred.append((int(slot), int(sid)))
        journal.delete_op(conn, op_id)
        ctx.publish_state(conn)
    ctx.forget([sid for _, sid in shred], gids)
    with contextlib.suppress(OSError):
        ctx.secrets.shred(shred)
