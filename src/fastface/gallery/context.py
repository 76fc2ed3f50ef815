"""What every part of a gallery shares: its files, keys, stores, lock, and the subject directory.

The subject directory turns database rows into subject ids and pseudonyms:
a subject's id is stored only encrypted with its secret (``subjects.keys``),
found by a keyed look-up tag, and named in the audit log by a pseudonym
derived from the secret. Decrypted names and pseudonyms are cached in memory
per subject number and dropped when the subject is erased (a read-only
process drops its cache whenever the writer has shredded secrets).
"""

from __future__ import annotations

import json
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import CorruptGalleryError, ReadOnlyIndexError
from .audit import AuditLog
from .keys import GalleryKeys, SubjectSecrets, open_sealed, pseudonym, seal
from .records import Database
from .vectors import VectorStore

__all__ = ["Context", "Subject"]


@dataclass(frozen=True)
class Subject:
    """A subject as the gallery knows it (the id decrypted, the pseudonym derived)."""

    sid: int
    slot: int
    subject_id: str
    pseudonym: str
    secret: bytes = field(repr=False)


def name_ad(sid: int) -> bytes:
    return b"name" + struct.pack("<q", sid)


def field_ad(gid: int, name: str) -> bytes:
    return name.encode() + struct.pack("<q", gid)


@dataclass
class Context:
    path: Path
    config: dict[str, Any]
    db: Database
    keys: GalleryKeys
    secrets: SubjectSecrets
    store: VectorStore
    writable: bool
    mutex: threading.RLock = field(default_factory=threading.RLock)
    report: dict[str, Any] = field(default_factory=dict)
    seen_state: dict[str, Any] = field(default_factory=dict)
    _subjects: dict[int, Subject] = field(default_factory=dict)
    _grant_sid: dict[int, int] = field(default_factory=dict)

    @property
    def audit(self) -> AuditLog:
        return AuditLog(self.db, self.keys.audit)

    @property
    def d(self) -> int:
        return int(self.config["d"])

    def require_writable(self, what: str) -> None:
        if not self.writable:
            raise ReadOnlyIndexError(
                f"{self.path}: opened read-only (mode='r'); {what} needs the writer "
                "(Gallery.open(path) in one process at a time)"
            )

    # --- the subject directory ----------------------------------------------------------------
    def subject_from_row(self, row: tuple[int, bytes, int, bytes]) -> Subject:
        sid, _lookup, slot, blob = row
        cached = self._subjects.get(sid)
        if cached is not None and cached.slot == slot:
            return cached
        got = self.secrets.read(slot)
        if got is None or got[0] != sid:
            raise CorruptGalleryError(
                f"{self.secrets.path}: slot {slot} does not hold the secret of subject number "
                f"{sid} that {self.db.path} records; the key store and the database disagree",
                str(self.secrets.path),
                f"slot[{slot}]",
            )
        secret = got[1]
        plain = open_sealed(secret, blob, name_ad(sid))
        if plain is None:
            raise CorruptGalleryError(
                f"{self.db.path}: the subject id of subject number {sid} fails its check "
                "(damaged or edited)",
                self.db.where,
                f"subjects[sid={sid}].name",
            )
        subj = Subject(sid, slot, plain.decode("utf-8"), pseudonym(secret), secret)
        self._subjects[sid] = subj
        return subj

    def find_subject(self, subject_id: str) -> Subject | None:
        row = self.db.subject_by_lookup(self.keys.lookup_tag(subject_id))
        if row is None:
            return None
        subj = self.subject_from_row(row)
        if subj.subject_id != subject_id:  # a look-up tag collision or an edited row
            raise CorruptGalleryError(
                f"{self.db.path}: the subject found for a look-up tag has another id",
                self.db.where,
                f"subjects[sid={subj.sid}]",
            )
        return subj

    def subjects_of_gids(self, gids: npt.NDArray[np.int64] | list[int]) -> dict[int, Subject]:
        """``{gid: Subject}`` of records' grants (rows verified; a missing grant is damage)."""
        want = [int(g) for g in np.unique(np.asarray(gids, np.int64))]
        missing = [g for g in want if g not in self._grant_sid]
        if missing:
            for gid, grant in self.db.grants_by_gid(missing).items():
                self._grant_sid[gid] = int(grant[1])
        sids = {self._grant_sid[g] for g in want if g in self._grant_sid}
        need = [s for s in sids if s not in self._subjects]
        if need:
            for row in self.db.subjects_by_sid(need).values():
                self.subject_from_row(row)
        out: dict[int, Subject] = {}
        for g in want:
            sid = self._grant_sid.get(g)
            if sid is None:
                raise CorruptGalleryError(
                    f"{self.db.path}: records name grant {g}, which does not exist (damaged or "
                    "edited)",
                    self.db.where,
                    f"grants[gid={g}]",
                )
            subj = self._subjects.get(sid)
            if subj is None:
                raise CorruptGalleryError(
                    f"{self.db.path}: grant {g} names subject number {sid}, which does not exist",
                    self.db.where,
                    f"grants[gid={g}]",
                )
            out[g] = subj
        return out

    def decrypt_field(self, subj: Subject, gid: int, name: str, blob: bytes | None) -> str | None:
        if blob is None:
            return None
        plain = open_sealed(subj.secret, blob, field_ad(gid, name))
        if plain is None:
            raise CorruptGalleryError(
                f"{self.db.path}: {name} of grant {gid} fails its check (damaged or edited)",
                self.db.where,
                f"grants[gid={gid}].{name}",
            )
        return plain.decode("utf-8")

    @staticmethod
    def encrypt_field(secret: bytes, gid: int, name: str, value: str | None) -> bytes | None:
        return None if value is None else seal(secret, value.encode("utf-8"), field_ad(gid, name))

    def forget(self, sids: list[int] | None = None, gids: list[int] | None = None) -> None:
        """Drop cached subjects (their secrets too) and grant links; everything when ``None``."""
        if sids is None and gids is None:
            self._subjects.clear()
            self._grant_sid.clear()
            return
        for s in sids or ():
            self._subjects.pop(s, None)
        for g in gids or ():
            self._grant_sid.pop(g, None)

    # --- the shared state readers follow ------------------------------------------------------
    def state(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.db.meta("state", "{}")))
        except ValueError as e:
            raise CorruptGalleryError(
                f"{self.db.path}: meta.state is damaged", self.db.where, "meta.state"
            ) from e

    def publish_state(self, conn: Any, **changes: Any) -> None:
        """Update ``meta.state`` (index directory and generation, shred counter) in a txn."""
        row = conn.execute("SELECT value FROM meta WHERE key='state'").fetchone()
        st = json.loads(row[0]) if row else {}
        st.update(changes)
        st.setdefault("index", self.store.dirname)
        st["generation"] = self.store.generation
        Database.set_meta(conn, "state", json.dumps(st, sort_keys=True))
        self.seen_state = st
