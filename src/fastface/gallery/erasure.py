"""Erasure (GDPR art. 17): invisible at once, unlinkable at once, purged from every file.

Order of an erasure:

1. **Commit point.** One transaction deletes the records (and the grants and
   subjects left without records), logs the ``erase`` op with the ids and the
   secrets to shred, and appends the ``erase`` audit entry. Every search, in
   every process, resolves results through the database: from here on none
   returns the records.
2. The ids are removed from this process's index (tombstones applied inside
   the scan, so ``k`` results still come back).
3. **Crypto-shredding.** The subjects' secrets are zeroed in place in
   ``subjects.keys``: their ids (stored only encrypted) can no longer be
   decrypted and their audit pseudonyms no longer linked, whatever stale
   pages SQLite keeps.
4. **Purge.** Every shard holding the vectors is rewritten without them and
   the old files deleted (no byte of the vectors or codes stays in any
   file); SQLite's freed pages (zeroed by ``secure_delete``) are returned
   and its write-ahead log truncated.
5. The receipt is stored, with the audit head, and the op deleted.

If step 4 cannot finish (the index cannot be rewritten, or a reader in
another process holds the write-ahead log), the erasure is still complete
logically: the receipt is issued with ``purge_status="pending"`` and a
note, the status shows it, and :func:`finish` completes it later
(``finish_purges()``, ``compact()``, ``close()``, the next open). A crash
at any step is finished the same way by the next open.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from . import journal, policy
from .context import Context, Subject
from .results import ErasureReceipt

__all__ = ["erase", "finish", "make_receipt"]

log = logging.getLogger("fastface")

DEFERRED = "deferred: compact() or finish_purges() rewrites the index files"
READER = (
    "the database's write-ahead log is held open by a reader; its old pages go when the reader "
    "lets go (finish_purges(), compact(), close() or the next open)"
)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def receipt_digest(ctx: Context, body: dict[str, Any]) -> str:
    return hmac.new(ctx.keys.audit, b"receipt\n" + _canonical(body), hashlib.sha256).hexdigest()


def make_receipt(
    ctx: Context,
    p: dict[str, Any],
    subject_ids: list[str],
    *,
    shards: int,
    purged_at: str | None,
    purge_ms: float | None,
    note: str | None,
    head: dict[str, Any],
) -> ErasureReceipt:
    body: dict[str, Any] = {
        "subject_ids": sorted(subject_ids),
        "reason": p["reason"],
        "records_erased": int(p["records"]),
        "subjects_shredded": len(p["shred"]),
        "shards_rewritten": int(shards),
        "requested_at": p["requested_at"],
        "invisible_at": p.get("invisible_at", p["requested_at"]),
        "invisible_ms": float(p.get("invisible_ms", 0.0)),
        "purge_status": "purged" if purged_at else "pending",
        "purged_at": purged_at,
        "purge_ms": purge_ms,
        "purge_note": note,
        "index_generation": int(ctx.store.generation),
        "audit_head": dict(head),
    }
    digest = receipt_digest(ctx, body)
    return ErasureReceipt(
        subject_ids=tuple(body["subject_ids"]),
        reason=body["reason"],
        records_erased=body["records_erased"],
        subjects_shredded=body["subjects_shredded"],
        shards_rewritten=body["shards_rewritten"],
        requested_at=body["requested_at"],
        invisible_at=body["invisible_at"],
        invisible_ms=body["invisible_ms"],
        purge_status=body["purge_status"],
        purged_at=purged_at,
        purge_ms=purge_ms,
        purge_note=note,
        index_generation=body["index_generation"],
        audit_head=body["audit_head"],
        digest=digest,
    )


def erase(
    ctx: Context,
    ids: npt.NDArray[np.int64],
    subject_ids: list[str],
    reason: str,
    requester: str | None,
    *,
    purge: bool = True,
) -> ErasureReceipt:
    """Erase the records ``ids`` (all must exist); ``subject_ids`` name them in the receipt."""
    ctx.require_writable("erasure")
    t0 = time.perf_counter()
    requested_at = policy.iso(policy.now())
    ids = np.unique(np.asarray(ids, np.int64))
    with ctx.mutex:
        id2gid = ctx.db.resolve(ids)
        if len(id2gid) != ids.size:
            raise RuntimeError(
                "the gallery changed: some of the records to erase no longer exist; look them "
                "up again"
            )
        gids = sorted(set(id2gid.values()))
        by_gid: dict[int, Subject] = ctx.subjects_of_gids(gids)
        subjects = {s.sid: s for s in by_gid.values()}
        with ctx.db.txn() as conn:
            ctx.db.delete_records(conn, ids.tolist())
            gone_g = [
                g
                for g in gids
                if conn.execute("SELECT 1 FROM records WHERE gid=? LIMIT 1", (g,)).fetchone()
                is None
            ]
            for g in gone_g:
                conn.execute("DELETE FROM grants WHERE gid=?", (g,))
            shred = [
                [s.slot, s.sid]
                for s in subjects.values()
                if conn.execute("SELECT 1 FROM grants WHERE sid=? LIMIT 1", (s.sid,)).fetchone()
                is None
            ]
            for _, sid in shred:
                conn.execute("DELETE FROM subjects WHERE sid=?", (sid,))
            pseudonyms = sorted(s.pseudonym for s in subjects.values())
            payload: dict[str, Any] = {
                "reason": reason,
                "requester": requester,
                "requested_at": requested_at,
                "pseudonyms": pseudonyms,
                "shred": shred,
                "records": int(ids.size),
                "purge": bool(purge),
            }
            op_id = journal.log_op(conn, "erase", "hidden", payload, ids)
            ctx.audit.append(
                conn,
                "erase",
                requester=requester,
                purpose=None,
                subjects=pseudonyms,
                detail={"reason": reason, "records": int(ids.size), "shredded": len(shred)},
            )
            shreds = int(ctx.state().get("shreds", 0)) + 1
            ctx.publish_state(conn, shreds=shreds)
        # The commit point: every search resolves its results through the database, so from
        # here on none (in any process) returns these records. Past it nothing raises:
        # finish() turns failures into notes.
        t_hidden = time.perf_counter()
        payload["invisible_at"] = policy.iso(policy.now())
        payload["invisible_ms"] = (t_hidden - t0) * 1e3
        journal.step("erase:logged")
        ctx.forget(list(subjects), gids)
        with contextlib.suppress(Exception):
            ctx.store.hide(ids)  # tombstones inside the scan: k results still come back
        journal.step("erase:hidden")
        with contextlib.suppress(Exception):
            ctx.secrets.shred([(int(a), int(b)) for a, b in shred])  # finish() retries
        journal.step("erase:shredded")
        out = finish(
            ctx, [(op_id, payload, ids)], t_hidden, purge=purge, names={op_id: subject_ids}
        )
        return out[op_id]


def finish(
    ctx: Context,
    todo: list[tuple[int, dict[str, Any], npt.NDArray[np.int64]]],
    t_start: float,
    *,
    purge: bool = True,
    names: dict[int, list[str]] | None = None,
) -> dict[int, ErasureReceipt]:
    """Take erase ops forward: hide, shred, purge (unless deferred), store the receipts.

    Ops whose receipt was issued earlier (pending) are completed: an audit
    ``purge`` entry names the receipt and the stored receipt gets its
    ``purged_at``. Returns the receipts issued now.
    """
    # Past the commit point nothing may raise: whatever fails becomes a note, the receipt says
    # "pending" and the next finish() (finish_purges, compact, close, the next open) retries.
    notes: list[str] = []
    every = np.concatenate([ids for _, _, ids in todo]) if todo else np.empty(0, np.int64)
    try:
        live = every[ctx.store.contains(every)] if every.size else every
        if live.size:
            ctx.store.hide(live)  # after a crash: hidden again before anything else
    except Exception as e:  # the database already hides them from every search
        notes.append(f"not yet removed from the index in memory ({e})")
    try:
        for _, p, _ in todo:
            ctx.secrets.shred([(int(a), int(b)) for a, b in p["shred"]])
    except Exception as e:
        notes.append(f"the subjects' secrets could not be shredded yet ({e})")
    shards = 0
    if not purge:
        try:
            ctx.store.index.flush()  # the tombstones on disk; compact() purges
        except Exception as e:
            log.warning("%s: committing an erasure's tombstones failed (%s)", ctx.path, e)
        notes.append(DEFERRED)
    else:
        try:
            shards = ctx.store.purge()
            journal.step("erase:index_purged")
        except Exception as e:  # e.g. a full disk: the erasure stands, the purge waits
            log.warning("%s: the index purge of an erasure failed (%s); it is retried", ctx.path, e)
            notes.append(f"the index files could not be rewritten yet ({e}); retried later")
        if not notes:
            try:
                ctx.db.vacuum(full=False)
                journal.step("erase:vacuumed")
                if not ctx.db.checkpoint():
                    notes.append(READER)
            except Exception as e:
                notes.append(f"the database's freed pages could not be returned yet ({e})")
    note = "; ".join(notes) or None
    purge_ms = (time.perf_counter() - t_start) * 1e3
    purged_at = policy.iso(policy.now()) if note is None else None
    try:
        return _record(ctx, todo, shards, purged_at, purge_ms, note, purge, names)
    except Exception as e:  # the database cannot take the receipt now: hand it out anyway
        log.warning("%s: storing erasure receipts failed (%s); retried later", ctx.path, e)
        note = f"{note + '; ' if note else ''}the receipt is not stored yet ({e})"
        head = ctx.audit.head()
        return {
            op_id: make_receipt(
                ctx, p, (names or {}).get(op_id, []), shards=shards, purged_at=None,
                purge_ms=None, note=note, head=head,
            )
            for op_id, p, _ in todo
            if p.get("receipt") is None
        }  # fmt: skip


def _record(
    ctx: Context,
    todo: list[tuple[int, dict[str, Any], npt.NDArray[np.int64]]],
    shards: int,
    purged_at: str | None,
    purge_ms: float | None,
    note: str | None,
    purge: bool,
    names: dict[int, list[str]] | None,
) -> dict[int, ErasureReceipt]:
    """One transaction: complete or store each op's receipt; delete the ops purged."""
    issued: dict[int, ErasureReceipt] = {}
    with ctx.db.txn() as conn:
        for op_id, p, _ in todo:
            digest = p.get("receipt")
            if purged_at is not None:
                journal.delete_op(conn, op_id)
                if digest is not None:  # issued pending earlier: complete it
                    conn.execute(
                        "UPDATE receipts SET purged_at=? WHERE digest=?", (purged_at, digest)
                    )
                    ctx.audit.append(
                        conn,
                        "purge",
                        requester=None,
                        purpose=None,
                        subjects=p["pseudonyms"],
                        detail={"receipt": digest, "shards_rewritten": shards},
                    )
                    continue
            elif digest is not None:
                journal.update_op(conn, op_id, "hidden", {"note": note})
                continue
            head = ctx.audit.head(conn)
            rec = make_receipt(
                ctx,
                p,
                (names or {}).get(op_id, []),
                shards=shards,
                purged_at=purged_at,
                purge_ms=purge_ms if purged_at else None,
                note=note,
                head=head,
            )
            stored = rec.to_dict()
            stored.pop("subject_ids")
            stored["subjects"] = p["pseudonyms"]
            conn.execute(
                "INSERT INTO receipts (digest, receipt, purged_at) VALUES (?, ?, ?)",
                (rec.digest, json.dumps(stored, sort_keys=True), purged_at),
            )
            if purged_at is None:
                journal.update_op(
                    conn,
                    op_id,
                    "hidden",
                    {
                        "receipt": rec.digest,
                        "note": note,
                        "purge": purge,
                        "invisible_at": rec.invisible_at,
                        "invisible_ms": rec.invisible_ms,
                    },
                )
            issued[op_id] = rec
        ctx.publish_state(conn)
    if purged_at is not None:
        ctx.db.checkpoint()  # best effort: the receipt's own frames
    return issued
