"""The audit log: an append-only chain keyed with a secret that is not in the database.

Entry ``n`` is canonical JSON (sequence number, time, kind, requester,
purpose, the pseudonyms of the subjects concerned, details, the previous
entry's MAC) stored with ``mac_n = HMAC-SHA256(K, mac_{n-1} || entry_n)``,
``mac_0`` being 64 zeros. ``K`` is derived from the gallery key (keys.py),
which never enters the database, so whoever edits the database cannot
recompute the MACs: an edited, inserted or removed entry fails verification,
and so does a chain rebuilt with recomputed hashes.

What a key alone cannot show is truncation: cutting the last entries and
moving the head back leaves a valid shorter chain. So the head (sequence
number and MAC) is *anchored* outside: every erasure receipt carries it,
:meth:`AuditLog.head` hands it out for publishing, and
:meth:`AuditLog.verify` checks any anchors it is given (each must still be
in the chain, with its MAC).

Subjects are named only by pseudonyms derived from their secrets (keys.py);
once a subject is erased and its secret shredded, its entries still verify
but can no longer be linked to it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
from collections.abc import Iterable
from typing import Any

from ..errors import AuditChainError
from .policy import iso, now
from .records import Database

__all__ = ["GENESIS", "AuditLog"]

GENESIS = "0" * 64


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


class AuditLog:
    """The keyed chain in table ``audit`` of ``db`` (head in ``meta.audit_head``)."""

    def __init__(self, db: Database, key: bytes) -> None:
        self.db = db
        self._key = key

    def _mac(self, prev: str, text: str) -> str:
        return hmac.new(self._key, (prev + "\n" + text).encode(), hashlib.sha256).hexdigest()

    def init(self, conn: sqlite3.Connection) -> None:
        Database.set_meta(conn, "audit_head", _canonical({"seq": 0, "mac": GENESIS}))

    def head(self, conn: sqlite3.Connection | None = None) -> dict[str, Any]:
        """``{"seq", "mac"}`` of the last entry (anchor it elsewhere to detect truncation)."""
        c = conn or self.db.conn
        row = c.execute("SELECT value FROM meta WHERE key='audit_head'").fetchone()
        where = self.db.where
        if row is None:
            raise AuditChainError(f"{where}: the audit head is missing", where, 0)
        try:
            head = json.loads(row[0])
            seq, mac = int(head["seq"]), str(head["mac"])
        except (ValueError, KeyError, TypeError) as e:
            raise AuditChainError(f"{where}: the audit head is damaged", where, 0) from e
        return {"seq": seq, "mac": mac}

    def append(
        self,
        conn: sqlite3.Connection,
        kind: str,
        *,
        requester: str | None,
        purpose: str | None,
        subjects: Iterable[str],
        detail: dict[str, Any],
    ) -> dict[str, Any]:
        """Append one entry inside the caller's write transaction; returns the new head."""
        head = self.head(conn)
        seq = head["seq"] + 1
        entry = {
            "seq": seq,
            "time": iso(now()),
            "kind": kind,
            "requester": requester,
            "purpose": purpose,
            "subjects": sorted(set(subjects)),
            "detail": detail,
            "prev": head["mac"],
        }
        text = _canonical(entry)
        mac = self._mac(head["mac"], text)
        conn.execute("INSERT INTO audit (seq, entry, mac) VALUES (?, ?, ?)", (seq, text, mac))
        new = {"seq": seq, "mac": mac}
        Database.set_meta(conn, "audit_head", _canonical(new))
        return new

    def verify(
        self,
        *,
        since: str | None = None,
        anchors: Iterable[dict[str, Any]] = (),
        subject: str | None = None,
    ) -> list[dict[str, Any]]:
        """Verify the whole chain and every anchor; return the entries (at or after ``since``,
        naming ``subject`` when given), each with its ``mac``.

        Raises :class:`~fastface.errors.AuditChainError` at the first entry
        that does not verify, or for an anchor the chain no longer holds.
        """
        where = self.db.where
        want: dict[int, str] = {}
        for a in anchors:
            try:
                want[int(a["seq"])] = str(a["mac"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"anchors: expected dicts with 'seq' and 'mac', got {a!r}") from e
        out: list[dict[str, Any]] = []
        prev, expect = GENESIS, 1
        with self.db.snapshot() as conn:
            head = self.head(conn)
            for seq, text, mac in conn.execute("SELECT seq, entry, mac FROM audit ORDER BY seq"):
                if seq != expect:
                    raise AuditChainError(
                        f"{where}: audit entry {expect} is missing (next is {seq}); the log was "
                        "tampered with",
                        where,
                        expect,
                    )
                if not isinstance(text, str) or not hmac.compare_digest(
                    str(mac), self._mac(prev, text)
                ):
                    raise AuditChainError(
                        f"{where}: audit entry {seq} fails its keyed MAC; it was edited or forged",
                        where,
                        seq,
                    )
                try:
                    entry = json.loads(text)
                except ValueError as e:  # pragma: no cover - the MAC covers the text
                    raise AuditChainError(
                        f"{where}: audit entry {seq} is not JSON", where, seq
                    ) from e
                if entry.get("prev") != prev or entry.get("seq") != seq:
                    raise AuditChainError(
                        f"{where}: audit entry {seq} does not chain to entry {seq - 1}", where, seq
                    )
                if seq in want and not hmac.compare_digest(want.pop(seq), str(mac)):
                    raise AuditChainError(
                        f"{where}: audit entry {seq} differs from the anchored one; the log was "
                        "rewritten",
                        where,
                        seq,
                    )
                prev = str(mac)
                expect += 1
                if (since is None or entry["time"] >= since) and (
                    subject is None or subject in entry["subjects"]
                ):
                    out.append(dict(entry, mac=prev))
        if head["seq"] != expect - 1 or head["mac"] != prev:
            raise AuditChainError(
                f"{where}: the audit log ends at entry {expect - 1} but its head records entry "
                f"{head['seq']}; entries were removed from (or added to) the end",
                where,
                expect,
            )
        if want:
            seq = min(want)
            raise AuditChainError(
                f"{where}: anchored audit entry {seq} is gone (the log ends at entry "
                f"{expect - 1}); entries were removed from the end",
                where,
                seq,
            )
        return out
