"""The gallery database: schema, connection, integrity checks and row access.

``meta.sqlite`` holds records, not vectors (those live once, in the index)::

    subjects  sid, look-up tag, slot in subjects.keys, encrypted subject id, check
    grants    gid, sid, legal basis, encrypted consent_ref/source, embedder,
              enrolment time, retention date, check        (one per enrolment and subject)
    records   id (the vector's id in the index), gid, check
    ops       the journal of multi-step changes (see journal.py)
    audit     the keyed audit chain (see audit.py)
    receipts  erasure receipts (subjects named by pseudonym)
    meta      format, audit head, index state

No subject id, consent reference or source is stored in plain text: they are
encrypted with the subject's secret (keys.py), so stale copies that SQLite
may leave in free space are unreadable once the secret is shredded. Every
row carries a keyed check value (HMAC under a key that is not in the
database), verified whenever the row is used: a changed byte makes the row
fail with :class:`~fastface.errors.CorruptGalleryError` instead of moving a
face to another subject.

Integrity at open: the write-ahead log is parsed first (a committed frame
that fails its checksum is damage, not a torn write), then SQLite's
``PRAGMA integrity_check`` runs (``quick_check`` plus index contents).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import sqlite3
import struct
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import CorruptGalleryError
from . import files
from .keys import GalleryKeys

__all__ = ["Database", "check_wal"]

META = "meta.sqlite"
SCHEMA_VERSION = 2
_SQL_CHUNK = 30_000  # below SQLite's limit on bound variables
BUSY_MS = 10_000

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE subjects (
    sid INTEGER PRIMARY KEY,
    lookup BLOB NOT NULL UNIQUE,
    slot INTEGER NOT NULL UNIQUE,
    name BLOB NOT NULL,
    chk BLOB NOT NULL
);
CREATE TABLE grants (
    gid INTEGER PRIMARY KEY,
    sid INTEGER NOT NULL,
    legal_basis TEXT NOT NULL,
    consent BLOB,
    source BLOB,
    embedder_id TEXT NOT NULL,
    embedder_version TEXT,
    enrolled_at TEXT NOT NULL,
    retain_until TEXT,
    chk BLOB NOT NULL
);
CREATE INDEX grants_sid ON grants(sid);
CREATE INDEX grants_retain ON grants(retain_until) WHERE retain_until IS NOT NULL;
CREATE TABLE records (id INTEGER PRIMARY KEY, gid INTEGER NOT NULL, chk BLOB NOT NULL);
CREATE INDEX records_gid ON records(gid);
CREATE TABLE ops (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    payload TEXT NOT NULL,
    ids BLOB
);
CREATE TABLE audit (seq INTEGER PRIMARY KEY, entry TEXT NOT NULL, mac TEXT NOT NULL);
CREATE TABLE receipts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    digest TEXT NOT NULL UNIQUE,
    receipt TEXT NOT NULL,
    purged_at TEXT
);
"""

GRANT_COLS = (
    "gid, sid, legal_basis, consent, source, embedder_id, embedder_version, enrolled_at, "
    "retain_until, chk"
)


def chunks(seq: Sequence[Any], n: int = _SQL_CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def marks(n: int) -> str:
    return ",".join("?" * n)


class Database:
    """One connection to ``meta.sqlite`` (shared by the gallery's threads under its lock)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, keys: GalleryKeys) -> None:
        self.path = path
        self.where = str(path)
        self._conn: sqlite3.Connection | None = conn
        self.keys = keys
        self._lock = threading.RLock()

    # --- opening ------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, keys: GalleryKeys) -> Database:
        """A new database file (created owner-only and exclusively) with the schema."""
        os.close(files.create_exclusive(path))
        db = cls(path, _connect(path, new=True), keys)
        conn = db.conn
        with db.txn():
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        return db

    @classmethod
    def open(cls, path: Path, keys: GalleryKeys) -> tuple[Database, dict[str, Any]]:
        """Open after checking the WAL and the file; returns the WAL report too."""
        if not files.is_regular(path):
            what = "is missing" if not os.path.lexists(path) else "is not a regular file"
            raise CorruptGalleryError(
                f"{path}: the gallery database {what}; restore it from a backup", str(path), "file"
            )
        report = check_wal(Path(str(path) + "-wal"))
        try:
            conn = _connect(path, new=False)
        except sqlite3.DatabaseError as e:
            raise CorruptGalleryError(
                f"{path}: cannot be opened as a database ({e})", str(path), "file"
            ) from e
        db = cls(path, conn, keys)
        try:
            db.integrity()
            db.check_schema()
            version = db.meta("schema_version")
            if version != str(SCHEMA_VERSION):
                raise CorruptGalleryError(
                    f"{path}: schema version {version!r}, expected {SCHEMA_VERSION}",
                    str(path),
                    "meta.schema_version",
                )
        except BaseException:
            db.close()
            raise
        return db, report

    def integrity(self) -> None:
        """SQLite's integrity check: raises :class:`CorruptGalleryError` unless the file is sound.

        ``PRAGMA integrity_check`` rather than ``quick_check``: it also verifies
        that every index agrees with its table (a damaged entry of the index
        on ``records.gid`` would otherwise hide a record from an erasure).
        About 0.4 s per million records.
        """
        try:
            rows = self.conn.execute("PRAGMA integrity_check").fetchall()
        except sqlite3.DatabaseError as e:
            raise CorruptGalleryError(
                f"{self.path}: fails SQLite's integrity check ({e})", self.where, "quick_check"
            ) from e
        if rows != [("ok",)]:
            first = "; ".join(str(r[0]) for r in rows[:3])
            raise CorruptGalleryError(
                f"{self.path}: fails SQLite's integrity check: {first}", self.where, "quick_check"
            )

    def check_schema(self) -> None:
        """The tables and indexes must be exactly the ones this version creates."""
        want = _schema_rows()
        try:
            got = self.conn.execute(_MASTER).fetchall()
        except sqlite3.DatabaseError as e:
            raise CorruptGalleryError(
                f"{self.path}: its schema cannot be read ({e})", self.where, "schema"
            ) from e
        if got != want:
            bad = next((g for g, w in zip(got, want, strict=False) if g != w), None)
            raise CorruptGalleryError(
                f"{self.path}: its schema differs from the gallery's (damaged or edited"
                f"{'' if bad is None else ': ' + str(bad[1])})",
                self.where,
                "schema",
            )

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"{self.path}: the gallery is closed")
        return self._conn

    @contextlib.contextmanager
    def txn(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``): all of it or none of it."""
        with self._lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every query inside sees the same committed state."""
        with self._lock:
            conn = self.conn
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("COMMIT")

    def meta(self, key: str, default: str | None = None) -> str:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        if row is None:
            if default is not None:
                return default
            raise CorruptGalleryError(f"{self.path}: meta key {key!r} missing", self.where, key)
        return str(row[0])

    @staticmethod
    def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=?",
            (key, value, value),
        )

    def checkpoint(self, wait_ms: int = 200) -> bool:
        """Copy the WAL into the database and truncate it; ``False`` if a reader blocked it."""
        with self._lock:
            conn = self.conn
            conn.execute(f"PRAGMA busy_timeout={int(wait_ms)}")
            try:
                row = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.OperationalError:
                return False
            finally:
                conn.execute(f"PRAGMA busy_timeout={BUSY_MS}")
            return row is not None and row[0] == 0

    def vacuum(self, *, full: bool) -> None:
        """Return free (zeroed) pages to the file system; ``full`` rewrites the whole file."""
        with self._lock:
            if full:
                self.conn.execute("VACUUM")
            else:
                self.conn.execute("PRAGMA incremental_vacuum").fetchall()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None

    # --- checks ---------------------------------------------------------------------------------
    def _fail(self, field: str, what: str) -> CorruptGalleryError:
        return CorruptGalleryError(
            f"{self.path}: {field} fails its keyed check ({what}); the database was damaged or "
            "edited: restore it from a backup",
            self.where,
            field,
        )

    def record_check(self, rid: int, gid: int) -> bytes:
        """Keyed BLAKE2b of ``(id, gid)``, 8 bytes: checked for every search result, so it
        is the cheaper keyed hash (a quarter of HMAC-SHA256's time in CPython)."""
        return hashlib.blake2b(
            struct.pack("<qq", rid, gid), digest_size=8, key=self.keys.rows, person=b"record"
        ).digest()

    def subject_check(self, sid: int, lookup: bytes, slot: int, name: bytes) -> bytes:
        return self.keys.row_check(b"subject", sid, lookup, slot, name)

    def grant_check(self, row: Sequence[Any]) -> bytes:
        return self.keys.row_check(b"grant", *row[:9])

    def verify_subject(self, row: Sequence[Any]) -> tuple[int, bytes, int, bytes]:
        sid, lookup, slot, name, chk = row
        if not isinstance(sid, int) or not isinstance(slot, int):
            raise self._fail(f"subjects[sid={sid}]", "wrong types")
        if (
            not isinstance(lookup, bytes)
            or not isinstance(name, bytes)
            or not isinstance(chk, bytes)
        ):
            raise self._fail(f"subjects[sid={sid}]", "wrong types")
        if not hmac.compare_digest(chk, self.subject_check(sid, lookup, slot, name)):
            raise self._fail(f"subjects[sid={sid}]", "check value")
        return sid, lookup, slot, name

    def verify_grant(self, row: Sequence[Any]) -> tuple[Any, ...]:
        if not isinstance(row[-1], bytes) or not hmac.compare_digest(
            row[-1], self.grant_check(row)
        ):
            raise self._fail(f"grants[gid={row[0]}]", "check value")
        return tuple(row[:9])

    def verify_records(self, rows: Sequence[Sequence[Any]]) -> None:
        for rid, gid, chk in rows:
            if (
                not isinstance(rid, int)
                or not isinstance(gid, int)
                or not isinstance(chk, bytes)
                or not hmac.compare_digest(chk, self.record_check(rid, gid))
            ):
                raise self._fail(f"records[id={rid}]", "check value")

    # --- subjects -------------------------------------------------------------------------------
    def subject_by_lookup(self, lookup: bytes) -> tuple[int, bytes, int, bytes] | None:
        row = self.conn.execute(
            "SELECT sid, lookup, slot, name, chk FROM subjects WHERE lookup=?", (lookup,)
        ).fetchone()
        if row is None:
            return None
        got = self.verify_subject(row)
        if got[1] != lookup:  # pragma: no cover - the check value covers it
            raise self._fail(f"subjects[sid={got[0]}]", "look-up tag")
        return got

    def subjects_by_sid(self, sids: Sequence[int]) -> dict[int, tuple[int, bytes, int, bytes]]:
        out: dict[int, tuple[int, bytes, int, bytes]] = {}
        for part in chunks(list(sids)):
            q = (
                "SELECT sid, lookup, slot, name, chk FROM subjects WHERE sid IN "
                f"({marks(len(part))})"
            )
            for row in self.conn.execute(q, part):
                got = self.verify_subject(row)
                out[got[0]] = got
        return out

    def insert_subject(
        self, conn: sqlite3.Connection, sid: int, lookup: bytes, slot: int, name: bytes
    ) -> None:
        conn.execute(
            "INSERT INTO subjects (sid, lookup, slot, name, chk) VALUES (?, ?, ?, ?, ?)",
            (sid, lookup, slot, name, self.subject_check(sid, lookup, slot, name)),
        )

    # --- grants ---------------------------------------------------------------------------------
    def insert_grant(self, conn: sqlite3.Connection, row: Sequence[Any]) -> None:
        conn.execute(
            f"INSERT INTO grants ({GRANT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*row, self.grant_check(row)),
        )

    def grants_by_gid(self, gids: Sequence[int]) -> dict[int, tuple[Any, ...]]:
        out: dict[int, tuple[Any, ...]] = {}
        for part in chunks(list(gids)):
            q = f"SELECT {GRANT_COLS} FROM grants WHERE gid IN ({marks(len(part))})"
            for row in self.conn.execute(q, part):
                g = self.verify_grant(row)
                out[int(g[0])] = g
        return out

    def grants_of(self, sid: int) -> list[tuple[Any, ...]]:
        rows = self.conn.execute(
            f"SELECT {GRANT_COLS} FROM grants WHERE sid=? ORDER BY enrolled_at, gid", (sid,)
        ).fetchall()
        return [self.verify_grant(r) for r in rows]

    # --- records --------------------------------------------------------------------------------
    def insert_records(
        self, conn: sqlite3.Connection, ids: npt.NDArray[np.int64], gids: npt.NDArray[np.int64]
    ) -> None:
        conn.executemany(
            "INSERT INTO records (id, gid, chk) VALUES (?, ?, ?)",
            (
                (rid, gid, self.record_check(rid, gid))
                for rid, gid in zip(ids.tolist(), gids.tolist(), strict=True)
            ),
        )

    def records_of_grants(self, gids: Sequence[int]) -> list[tuple[int, int]]:
        """``(id, gid)`` of every record of the grants (check values verified)."""
        out: list[tuple[int, int]] = []
        for part in chunks(list(gids)):
            q = f"SELECT id, gid, chk FROM records WHERE gid IN ({marks(len(part))})"
            rows = self.conn.execute(q, part).fetchall()
            self.verify_records(rows)
            out.extend((int(r[0]), int(r[1])) for r in rows)
        return out

    def resolve(self, ids: npt.NDArray[np.int64]) -> dict[int, int]:
        """``{id: gid}`` of the ids that are records (check values verified)."""
        uniq = np.unique(ids[ids >= 0]).tolist()
        out: dict[int, int] = {}
        for part in chunks(uniq):
            q = f"SELECT id, gid, chk FROM records WHERE id IN ({marks(len(part))})"
            rows = self.conn.execute(q, part).fetchall()
            self.verify_records(rows)
            out.update((int(r[0]), int(r[1])) for r in rows)
        return out

    def all_record_ids(self) -> npt.NDArray[np.int64]:
        """Every record id, sorted."""
        cur = self.conn.execute("SELECT id FROM records ORDER BY id")
        parts = []
        while batch := cur.fetchmany(200_000):
            parts.append(np.fromiter((r[0] for r in batch), np.int64, len(batch)))
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def delete_records(self, conn: sqlite3.Connection, ids: Sequence[int]) -> None:
        for part in chunks(list(ids)):
            conn.execute(f"DELETE FROM records WHERE id IN ({marks(len(part))})", part)


_MASTER = "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
_SCHEMA_ROWS: list[Any] = []


def _schema_rows() -> list[Any]:
    """``sqlite_master`` as this version's schema makes it (built once, in memory)."""
    if not _SCHEMA_ROWS:
        mem = sqlite3.connect(":memory:")
        for stmt in _SCHEMA.strip().split(";"):
            if stmt.strip():
                mem.execute(stmt)
        _SCHEMA_ROWS.extend(mem.execute(_MASTER).fetchall())
        mem.close()
    return _SCHEMA_ROWS


def _connect(path: Path, *, new: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(
        str(path), isolation_level=None, check_same_thread=False, timeout=BUSY_MS / 1e3
    )
    try:
        if new:
            # freed pages can be returned without rewriting the file; only takes effect on a
            # new, empty database, so it comes before journal_mode
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute("PRAGMA cell_size_check=ON")
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.execute("PRAGMA cache_size=-32768")  # 32 MiB
        conn.execute(f"PRAGMA busy_timeout={BUSY_MS}")
        mode = conn.execute("PRAGMA journal_mode").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            raise sqlite3.DatabaseError(f"journal mode is {mode!r}, expected wal")
    except BaseException:
        conn.close()
        raise
    return conn


# --- the write-ahead log --------------------------------------------------------------------------
_WAL_MAGIC = (0x377F0682, 0x377F0683)


_POWERS: dict[int, npt.NDArray[np.uint64]] = {}


def _powers(n: int) -> npt.NDArray[np.uint64]:
    """``M**k`` for k = 0..n (mod 2**64), M = [[1, 1], [1, 2]]: the checksum's step matrix."""
    if n not in _POWERS:
        p = np.empty((n + 1, 2, 2), np.uint64)
        p[0] = np.eye(2, dtype=np.uint64)
        m = np.array([[1, 1], [1, 2]], np.uint64)
        for k in range(1, n + 1):
            p[k] = p[k - 1] @ m  # wraps mod 2**64, which keeps it exact mod 2**32
        _POWERS[n] = p
    return _POWERS[n]


def _wal_checksum(data: bytes, s0: int, s1: int, big: bool) -> tuple[int, int]:
    """SQLite's WAL checksum of ``data`` (a multiple of 8 bytes), continued from ``(s0, s1)``.

    SQLite's loop is ``s0 += x + s1; s1 += y + s0`` over 32-bit word pairs
    ``(x, y)``, i.e. ``S' = M S + (x, x + y)`` with ``M = [[1, 1], [1, 2]]``:
    linear, so ``S_n = M**n S_0 + sum(M**(n - i) v_i)``, computed at once
    with unsigned 64-bit wrap-around (exact modulo 2**32).
    """
    words = np.frombuffer(data, dtype=">u4" if big else "<u4").astype(np.uint64)
    x, y = words[0::2], words[1::2]
    n = x.size
    p = _powers(n)
    v = np.stack([x, x + y], axis=1)  # (n, 2)
    acc = np.einsum("kij,kj->i", p[n - 1 :: -1][:n] if n else p[:0], v)
    start = p[n] @ np.array([s0, s1], np.uint64)
    out = (start + acc) & np.uint64(0xFFFFFFFF)
    return int(out[0]), int(out[1])


def check_wal(path: Path) -> dict[str, Any]:
    """Parse ``meta.sqlite-wal`` before SQLite replays it.

    SQLite replays the WAL up to the first frame that fails its checksum and
    silently drops the rest. A failing frame followed by a *commit* frame of
    the same log generation means committed transactions would be dropped:
    that is damage, and raises :class:`CorruptGalleryError` naming the file.
    A failing frame after the last commit frame is what a crash in the middle
    of writing leaves (a transaction that never committed): it is reported
    (``discarded_frames``), not raised.
    """
    report: dict[str, Any] = {"frames": 0, "discarded_frames": 0}
    if not os.path.lexists(path):
        return report
    if not files.is_regular(path):
        raise CorruptGalleryError(f"{path}: not a regular file", str(path), "file")
    data = Path(path).read_bytes()
    if len(data) < 32:
        return report  # an empty (truncated) log
    magic, version, page_size, _seq, salt1, salt2, c1, c2 = struct.unpack(">8I", data[:32])
    if magic not in _WAL_MAGIC:
        raise CorruptGalleryError(
            f"{path}: not a SQLite write-ahead log (bad magic)", str(path), "wal.header"
        )
    big = magic == 0x377F0683
    if _wal_checksum(data[:24], 0, 0, big) != (c1, c2) or page_size < 512:
        # a damaged header makes SQLite ignore the whole log: were frames committed in it?
        raise CorruptGalleryError(
            f"{path}: the write-ahead log's header fails its checksum", str(path), "wal.header"
        )
    frame = 24 + page_size
    s0, s1 = c1, c2
    off = 32
    bad_at: int | None = None
    while off + frame <= len(data):
        head = data[off : off + 24]
        pgno, commit, f_salt1, f_salt2, f_c1, f_c2 = struct.unpack(">6I", head)
        if (f_salt1, f_salt2) != (salt1, salt2):
            # the end of this generation of the log, unless a later frame carries its salts:
            # then this header was damaged, and SQLite would drop what follows
            later = off + frame
            while later + frame <= len(data):
                l_commit, l1, l2 = struct.unpack(">3I", data[later + 4 : later + 16])
                if (l1, l2) == (salt1, salt2) and l_commit:
                    raise CorruptGalleryError(
                        f"{path}: a frame header of the write-ahead log is damaged (byte "
                        f"{off}); SQLite would silently drop the committed transactions after "
                        "it. Restore the gallery from a backup",
                        str(path),
                        "wal.frame",
                    )
                later += frame
            break
        if bad_at is None:
            t0, t1 = _wal_checksum(head[:8], s0, s1, big)
            t0, t1 = _wal_checksum(data[off + 24 : off + frame], t0, t1, big)
            if (t0, t1) == (f_c1, f_c2) and pgno > 0:
                s0, s1 = t0, t1
                report["frames"] += 1
            else:
                bad_at = off
        if bad_at is not None:
            report["discarded_frames"] += 1
            if commit and off > bad_at:
                raise CorruptGalleryError(
                    f"{path}: a committed frame of the write-ahead log fails its checksum "
                    f"(frame at byte {bad_at}); SQLite would silently drop the transactions "
                    "after it. Restore the gallery from a backup",
                    str(path),
                    "wal.frame",
                )
        off += frame
    if version != 3007000:
        report["version"] = version
    return report
