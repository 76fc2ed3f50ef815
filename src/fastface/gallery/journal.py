"""The journal of multi-step changes (table ``ops``) and the crash-test hook.

A change that touches more than the database (the index, the subject key
store) is written to ``ops`` in a transaction before anything else, with
everything needed to finish or undo it; :mod:`~fastface.gallery.recovery`
replays what a killed process left. Each kind has one rule:

``enroll``
    The commit point is the transaction that inserts the records and deletes
    the op. An op still present at open never committed (the caller got an
    exception or never got an answer): it is undone (its ids removed from the
    index and purged, its new grants and subjects deleted, their secrets
    shredded). An enrolment that raised never becomes active later.
``erase``
    The commit point is the transaction that logs the op and deletes the
    rows. From then on the erasure only goes forward: the ids are hidden,
    the secrets shredded, the index purged, the receipt stored.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import CorruptGalleryError
from .records import Database

__all__ = ["step", "step_hook"]

#: Test hook: called with the name of each step of a multi-step change. The
#: crash tests set it, in a child process, to a function that SIGKILLs the
#: process at one named step.
step_hook: Callable[[str], None] | None = None


def step(name: str) -> None:
    if step_hook is not None:
        step_hook(name)


def log_op(
    conn: sqlite3.Connection,
    kind: str,
    state: str,
    payload: dict[str, Any],
    ids: npt.NDArray[np.int64] | None = None,
) -> int:
    blob = None if ids is None else np.ascontiguousarray(ids, "<i8").tobytes()
    cur = conn.execute(
        "INSERT INTO ops (kind, state, payload, ids) VALUES (?, ?, ?, ?)",
        (kind, state, json.dumps(payload, sort_keys=True), blob),
    )
    return int(cur.lastrowid or 0)


def update_op(conn: sqlite3.Connection, op_id: int, state: str, extra: dict[str, Any]) -> None:
    row = conn.execute("SELECT payload FROM ops WHERE id=?", (op_id,)).fetchone()
    payload = {**json.loads(row[0]), **extra}
    conn.execute(
        "UPDATE ops SET state=?, payload=? WHERE id=?",
        (state, json.dumps(payload, sort_keys=True), op_id),
    )


def delete_op(conn: sqlite3.Connection, op_id: int) -> None:
    conn.execute("DELETE FROM ops WHERE id=?", (op_id,))


def ops(db: Database, kind: str | None = None) -> list[tuple[int, str, str, dict[str, Any], Any]]:
    """Pending ops ``(id, kind, state, payload, ids)`` in order; damage raises."""
    q = "SELECT id, kind, state, payload, ids FROM ops"
    args: tuple[Any, ...] = ()
    if kind is not None:
        q += " WHERE kind=?"
        args = (kind,)
    out = []
    for op_id, k, state, payload, blob in db.conn.execute(q + " ORDER BY id", args):
        try:
            p = json.loads(payload)
            if not isinstance(p, dict):
                raise ValueError("not an object")
            ids = (
                np.frombuffer(blob, "<i8").astype(np.int64)
                if blob is not None
                else np.empty(0, np.int64)
            )
        except (ValueError, TypeError) as e:
            raise CorruptGalleryError(
                f"{db.path}: journal entry {op_id} is damaged ({e})", db.where, f"ops[{op_id}]"
            ) from e
        if k not in ("enroll", "erase"):
            raise CorruptGalleryError(
                f"{db.path}: journal entry {op_id} has unknown kind {k!r}",
                db.where,
                f"ops[{op_id}]",
            )
        out.append((int(op_id), str(k), str(state), p, ids))
    return out
