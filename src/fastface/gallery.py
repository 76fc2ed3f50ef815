"""A face gallery held under a recorded legal basis: audited search, access export, erasure.

A gallery is a directory::

    <path>/gallery.json   purpose, embedder, format (written last at creation)
    <path>/meta.sqlite    records (one per vector), audit log, pending operations, receipts
    <path>/index/         a ShardedIndex (IVF-PQ shards, one codec)

Every vector is a *record* with its subject, legal basis, consent reference,
source, embedder, enrolment time and retention date. Record ids are random
62-bit integers: they carry no enrolment order and are never reused, so a
re-enrolment can never collide with an id whose erasure is still pending.

Crash safety. Every multi-step change is written to the ``ops`` table (an
SQLite transaction, ``synchronous=FULL``) before the index is touched, and
:meth:`Gallery.open` replays what a killed process left:

- enrolment: rows are inserted as ``pending`` with their op; the index commit
  (one atomic manifest write) decides: if the ids are in the index the rows
  become ``active``, otherwise they are deleted. Either the old or the new
  state, never a mixture.
- erasure: once its op is committed, an erasure only goes forward: recovery
  hides the records, rewrites every shard that holds them, deletes the rows,
  vacuums SQLite and writes the receipt. An erasure is never undone.

Erasure is immediate and physical. The ids are removed from the in-memory index
first (tombstones applied inside the scan, so ``k`` results still come back),
then every shard that held them is rewritten under a new file name whatever
its deleted fraction, the manifest is committed and the old files deleted; the
rows are deleted with ``secure_delete`` on, SQLite is vacuumed and its WAL
truncated, so no file under the gallery keeps their bytes.

The audit log is append-only and hash-chained: entry ``n`` stores
``sha256(hash(n-1) + entry)``, and the head (last sequence number and hash) is
kept beside it, so an edited, removed or appended entry is detected by
:meth:`Gallery.audit_log`. Entries name subjects only by a keyed hash (HMAC
with a per-gallery key), never by id, and never hold templates.

Examples
--------
>>> import tempfile
>>> import numpy as np
>>> from fastface import Gallery, IVFPQParams
>>> from fastface.datasets import SyntheticFaces
>>> xb, labels = SyntheticFaces(n_identities=100, per_identity=4, d=32, seed=0).vectors()
>>> with tempfile.TemporaryDirectory() as tmp:
...     with Gallery.create(tmp + "/g", d=32, params=IVFPQParams(32, 8, 8),
...                         purpose="access_control", embedder_id="synthetic") as g:
...         g.train(xb)
...         rec = g.enroll("alice", xb[:4], legal_basis="consent", consent_ref="form-17")
...         _ = g.enroll("bob", xb[4:8], legal_basis="consent", consent_ref="form-18")
...         m = g.search(xb[:1], 2, requester="door-3", purpose="access_control")
...         print(m.subject_ids[0])
...         receipt = g.erase_subject("alice")
...         print(receipt.records_erased, g.search(xb[:1], 1, requester="door-3",
...                                               purpose="access_control").subject_ids[0])
['alice', 'alice']
4 ['bob']
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from ._validation import check_k, check_matrix
from .errors import (
    AuditChainError,
    CorruptIndexError,
    EmptyIndexError,
    IndexLockedError,
    UnknownSubjectError,
)
from .index import storage
from .index.ivfpq import IVFPQParams
from .index.sharded import ShardedIndex
from .kernels.exact import scores as exact_scores

__all__ = [
    "LEGAL_BASES",
    "ErasurePlan",
    "ErasureReceipt",
    "Gallery",
    "GalleryMatches",
    "SubjectExport",
]

FORMAT = "fastface.gallery"
FORMAT_VERSION = 1
CONFIG = "gallery.json"
META = "meta.sqlite"
INDEX_DIR = "index"

#: GDPR art. 6(1)(a)-(f). Biometric identification also needs an art. 9(2)
#: condition; record it in ``consent_ref`` (consent) or ``source``.
LEGAL_BASES = (
    "consent",
    "contract",
    "legal_obligation",
    "vital_interests",
    "public_task",
    "legitimate_interests",
)

_GENESIS = "0" * 64
_SQL_CHUNK = 30_000  # below SQLite's limit on bound variables
_MAX_ID = 2**62

# Test hook: called with the name of each step of a multi-step change (enrol,
# erase, compaction). The crash-injection tests set it, in a child process, to
# a function that SIGKILLs the process at one named step.
_step_hook: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if _step_hook is not None:
        _step_hook(name)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).isoformat(timespec="microseconds")


def _parse_time(value: Any, name: str) -> dt.datetime:
    """A date, datetime or ISO-8601 string as an aware UTC datetime."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError as e:
            raise ValueError(
                f"{name}: {value!r} is not an ISO-8601 date or time; pass e.g. '2030-01-31'"
            ) from e
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone.utc)
    raise TypeError(f"{name}: expected a date, datetime or ISO string, got {type(value).__name__}")


def _check_text(value: Any, name: str, *, optional: bool = False, limit: int = 1024) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a str, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{name}: must not be empty")
    if len(value) > limit:
        raise ValueError(f"{name}: at most {limit} characters, got {len(value)}")
    return value


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _chunks(seq: Sequence[Any], n: int = _SQL_CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


@contextlib.contextmanager
def _owner_only() -> Iterator[None]:
    """Create files readable by the owner only while the gallery writes (umask 077)."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


# --- results ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GalleryMatches:
    """Result of :meth:`Gallery.search`.

    ``scores`` and ``record_ids`` are shaped ``(nq, k)`` (padded with the
    metric's worst score and ``-1``); ``subject_ids[i]`` lists the subjects of
    query ``i``'s matches, best first (only real matches, after ``threshold``).
    """

    scores: npt.NDArray[np.float32]
    record_ids: npt.NDArray[np.int64]
    subject_ids: list[list[str]]

    def to_dict(self) -> dict[str, Any]:
        out = []
        for i, subjects in enumerate(self.subject_ids):
            out.append(
                [
                    {"subject_id": s, "record_id": int(r), "score": float(d)}
                    for s, r, d in zip(
                        subjects, self.record_ids[i][: len(subjects)], self.scores[i], strict=False
                    )
                ]
            )
        return {"matches": out}


@dataclass(frozen=True)
class ErasureReceipt:
    """Proof of an erasure (GDPR art. 17), returned by the erase calls.

    ``invisible_ms`` is the time from the request until no search can return
    the records; ``purge_ms`` the time of the physical step (shards rewritten,
    old files deleted, rows deleted, SQLite vacuumed). ``digest`` is the
    SHA-256 of the receipt's other fields and the erased record ids.
    """

    subject_ids: tuple[str, ...]
    reason: str
    records_erased: int
    shards_rewritten: int
    requested_at: str
    invisible_at: str
    purged_at: str | None
    invisible_ms: float
    purge_ms: float | None
    vacuumed: bool
    index_generation: int
    digest: str

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["subject_ids"] = list(self.subject_ids)
        return d


@dataclass(frozen=True)
class SubjectExport:
    """Everything a gallery holds about one subject (GDPR art. 15).

    ``records[i]`` is the metadata of the vector ``embeddings[i]``;
    ``dedup`` the near-duplicate groups its records belong to (or why none
    could be computed); ``audit`` every audit entry that concerns the subject
    (each search that returned it, its enrolment, earlier exports).
    """

    subject_id: str
    exported_at: str
    gallery: dict[str, Any]
    records: list[dict[str, Any]]
    embeddings: npt.NDArray[np.float32]
    dedup: dict[str, Any]
    audit: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """Everything but the embeddings, as JSON-ready values."""
        return {
            "subject_id": self.subject_id,
            "exported_at": self.exported_at,
            "gallery": self.gallery,
            "records": self.records,
            "embeddings": {
                "file": "embeddings.npy",
                "dtype": "float32",
                "shape": list(self.embeddings.shape),
                "row_order": "records",
            },
            "dedup": self.dedup,
            "audit": self.audit,
        }

    def write(self, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``subject.json`` and ``embeddings.npy`` (owner-only) into ``directory``."""
        directory = Path(directory)
        with _owner_only():
            directory.mkdir(parents=True, exist_ok=True)
            js = directory / "subject.json"
            npy = directory / "embeddings.npy"
            storage.atomic_write_npy(npy, self.embeddings)
            storage.atomic_write_json(js, self.to_dict())
        return js, npy


@dataclass
class ErasurePlan:
    """What :meth:`Gallery.erase_by_face` would erase; nothing changes until :meth:`confirm`.

    ``matches`` lists the records whose stored embedding scored past the
    threshold against the photo (record id, subject id, score); ``record_ids``
    is what :meth:`confirm` erases: the matched records or, with
    ``whole_subjects=True``, every record of the matched subjects.
    """

    matches: list[dict[str, Any]]
    record_ids: npt.NDArray[np.int64]
    subjects: dict[str, int]
    threshold: float
    _gallery: Gallery | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "matches": self.matches,
            "records_to_erase": int(self.record_ids.size),
            "subjects": self.subjects,
            "threshold": self.threshold,
        }

    def confirm(self, *, requester: str | None = None) -> ErasureReceipt:
        """Erase the planned records (all of them or none, if the gallery has changed)."""
        if self._gallery is None:
            raise RuntimeError("this plan is detached from its gallery; make a new one")
        return self._gallery._confirm_plan(self, requester)


# --- the gallery ---------------------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE records (
    id INTEGER PRIMARY KEY,
    subject_id TEXT NOT NULL,
    state TEXT NOT NULL,
    legal_basis TEXT NOT NULL,
    consent_ref TEXT,
    source TEXT,
    embedder_id TEXT NOT NULL,
    embedder_version TEXT,
    enrolled_at TEXT NOT NULL,
    retain_until TEXT,
    op_id INTEGER,
    embedding BLOB NOT NULL
);
CREATE INDEX records_subject ON records(subject_id);
CREATE INDEX records_op ON records(op_id);
CREATE INDEX records_retain ON records(retain_until) WHERE retain_until IS NOT NULL;
CREATE TABLE ops (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    payload TEXT NOT NULL
);
CREATE TABLE audit (seq INTEGER PRIMARY KEY, entry TEXT NOT NULL, hash TEXT NOT NULL);
CREATE TABLE erasures (id INTEGER PRIMARY KEY AUTOINCREMENT, receipt TEXT NOT NULL);
"""

_INSERT_PENDING = (
    "INSERT INTO records (id, subject_id, state, legal_basis, consent_ref, source, embedder_id, "
    "embedder_version, enrolled_at, retain_until, op_id, embedding) "
    "VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_RECORD_COLS = (
    "id, subject_id, state, legal_basis, consent_ref, source, embedder_id, embedder_version, "
    "enrolled_at, retain_until"
)


class Gallery:
    """Face records held under a legal basis, with audited search, export and erasure.

    Make one with :meth:`create` (then :meth:`train` the index codec on a
    sample), reopen it with :meth:`open`. One process writes a gallery at a
    time (a second gets :class:`~fastface.errors.IndexLockedError`). Calls are
    serialised by a lock, so a gallery may be shared between threads.

    See the module documentation for the on-disk layout and crash safety.
    """

    def __init__(self, path: Path, config: dict[str, Any], index: ShardedIndex) -> None:
        self.path = path
        self._config = config
        self._index = index
        self._db: sqlite3.Connection | None = None
        self._key = b""
        self._mutex = threading.RLock()

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        d: int,
        params: IVFPQParams,
        purpose: str,
        embedder_id: str,
        embedder_version: str | None = None,
        shard_size: int = 250_000,
    ) -> Gallery:
        """Create an empty gallery directory for one ``purpose``.

        ``params`` configures the IVF-PQ index (``params.d`` must equal ``d``);
        ``embedder_id``/``embedder_version`` name the model whose embeddings
        the gallery holds and are recorded with every vector. Shards of
        ``shard_size`` vectors bound what an erasure rewrites.
        """
        if not isinstance(params, IVFPQParams):
            raise TypeError(f"params: expected IVFPQParams, got {type(params).__name__}")
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d != params.d:
            raise ValueError(f"d={d!r} does not match params.d={params.d}; they must be equal")
        _check_text(purpose, "purpose", limit=200)
        _check_text(embedder_id, "embedder_id", limit=200)
        _check_text(embedder_version, "embedder_version", optional=True, limit=200)
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise FileExistsError(
                f"{path}: exists and is not empty; open it with Gallery.open or pick a new "
                "directory"
            )
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "d": int(d),
            "purpose": purpose,
            "embedder_id": embedder_id,
            "embedder_version": embedder_version,
            "metric": params.metric,
            "created_at": _iso(_now()),
        }
        with _owner_only():
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o700)
            index = ShardedIndex.create(path / INDEX_DIR, params, shard_size=shard_size)
            try:
                os.chmod(path / INDEX_DIR, 0o700)
                db_path = path / META
                with contextlib.suppress(FileNotFoundError):
                    db_path.unlink()  # left by a create that was killed before gallery.json
                os.close(os.open(db_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
                obj = cls(path, config, index)
                obj._connect()
                db = obj._conn()
                with db:
                    db.executescript("BEGIN;" + _SCHEMA + "COMMIT;")
                with db:
                    db.execute("INSERT INTO meta VALUES ('key', ?)", (secrets.token_hex(32),))
                    db.execute(
                        "INSERT INTO meta VALUES ('audit_head', ?)",
                        (json.dumps({"seq": 0, "hash": _GENESIS}),),
                    )
                obj._key = bytes.fromhex(obj._meta("key"))
                storage.atomic_write_json(path / CONFIG, config)
            except BaseException:
                index.close()
                raise
        return obj

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Gallery:
        """Open a gallery for reading and writing, completing any change a crash interrupted.

        Takes the gallery's writer lock: a second process gets
        :class:`~fastface.errors.IndexLockedError` and nothing is changed.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such gallery directory")
        config = storage.read_json_checked(path / CONFIG, kind=FORMAT, max_version=FORMAT_VERSION)
        try:
            index = ShardedIndex.open(path / INDEX_DIR, mode="a")
        except IndexLockedError as e:
            raise IndexLockedError(
                f"{path}: another process has this gallery open for writing; close it there "
                "first (one writer at a time)"
            ) from e
        obj = cls(path, config, index)
        try:
            with _owner_only():
                obj._connect()
                obj._key = bytes.fromhex(obj._meta("key"))
                obj._recover()
        except BaseException:
            obj.close()
            raise
        return obj

    def _connect(self) -> None:
        db = sqlite3.connect(
            self.path / META, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        # freed pages can be returned without rewriting the file (see _vacuum); this only
        # takes effect on a new, empty database, so it comes before journal_mode
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA secure_delete=ON")
        db.execute("PRAGMA temp_store=MEMORY")
        db.execute("PRAGMA cache_size=-65536")  # 64 MiB: random-id inserts touch many pages
        db.execute("PRAGMA foreign_keys=ON")
        self._db = db

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"{self.path}: the gallery is closed")
        return self._db

    @contextlib.contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _meta(self, key: str) -> str:
        row = self._conn().execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        if row is None:
            raise CorruptIndexError(f"{self.path / META}: meta key {key!r} missing", str(self.path))
        return str(row[0])

    # --- state --------------------------------------------------------------------------------
    @property
    def d(self) -> int:
        return int(self._config["d"])

    @property
    def purpose(self) -> str:
        return str(self._config["purpose"])

    @property
    def embedder_id(self) -> str:
        return str(self._config["embedder_id"])

    @property
    def index(self) -> ShardedIndex:
        """The underlying index (read it; change it only through the gallery)."""
        return self._index

    @property
    def ntotal(self) -> int:
        """Number of searchable records."""
        return self._index.ntotal

    def subjects(self) -> list[str]:
        """Ids of the subjects with active records."""
        rows = self._conn().execute(
            "SELECT DISTINCT subject_id FROM records WHERE state='active' ORDER BY subject_id"
        )
        return [r[0] for r in rows]

    def __repr__(self) -> str:
        return (
            f"Gallery({str(self.path)!r}, d={self.d}, purpose={self.purpose!r}, "
            f"ntotal={self.ntotal})"
        )

    def _tag(self, subject_id: str) -> str:
        """Keyed pseudonym of a subject for the audit log and receipts."""
        return hmac.new(self._key, subject_id.encode(), hashlib.sha256).hexdigest()[:32]

    # --- train / enrol ------------------------------------------------------------------------
    def train(
        self, x: npt.NDArray[np.float32], *, max_points: int | None = None, seed: int = 0
    ) -> None:
        """Train the index codec on a sample (before the first enrolment).

        The sample's vectors are not stored; only the codebooks learnt from them.
        """
        with self._mutex, _owner_only():
            self._index.train(x, max_points=max_points, seed=seed)

    def enroll(
        self,
        subject_id: str,
        embeddings: npt.NDArray[np.float32],
        *,
        legal_basis: str,
        consent_ref: str | None = None,
        source: str | None = None,
        retain_until: dt.date | dt.datetime | str | None = None,
        requester: str | None = None,
    ) -> npt.NDArray[np.int64]:
        """Enrol ``embeddings`` (float32 ``(n, d)``) of one subject; returns their record ids.

        ``legal_basis`` is one of :data:`LEGAL_BASES`; ``"consent"`` also needs
        ``consent_ref`` (where the consent is recorded). ``retain_until`` (a
        future date) makes :meth:`purge_expired` erase the records after it.
        Nothing is stored when any argument is wrong.
        """
        _check_text(subject_id, "subject_id", limit=256)
        x = check_matrix(embeddings, "embeddings", d=self.d)
        return self._enroll(
            [subject_id] * x.shape[0], x, legal_basis, consent_ref, source, retain_until, requester
        )

    def enroll_many(
        self,
        subject_ids: Sequence[str],
        embeddings: npt.NDArray[np.float32],
        *,
        legal_basis: str,
        consent_ref: str | None = None,
        source: str | None = None,
        retain_until: dt.date | dt.datetime | str | None = None,
        requester: str | None = None,
    ) -> npt.NDArray[np.int64]:
        """Bulk :meth:`enroll`: row ``i`` of ``embeddings`` belongs to ``subject_ids[i]``.

        One transaction and one index commit for the whole batch (all or
        nothing), under one legal basis.
        """
        x = check_matrix(embeddings, "embeddings", d=self.d)
        if isinstance(subject_ids, str) or len(subject_ids) != x.shape[0]:
            raise ValueError(
                f"subject_ids: expected a sequence of {x.shape[0]} ids (one per row of "
                "embeddings); for one subject use enroll()"
            )
        subjects = list(subject_ids)
        for s_id in set(subjects):
            _check_text(s_id, "subject_ids[i]", limit=256)
        return self._enroll(subjects, x, legal_basis, consent_ref, source, retain_until, requester)

    def _enroll(
        self,
        subjects: list[str],
        x: npt.NDArray[np.float32],
        legal_basis: str,
        consent_ref: str | None,
        source: str | None,
        retain_until: dt.date | dt.datetime | str | None,
        requester: str | None,
    ) -> npt.NDArray[np.int64]:
        if legal_basis is None or (isinstance(legal_basis, str) and not legal_basis.strip()):
            raise ValueError(
                "legal_basis: enrolment needs a recorded legal basis; pass one of "
                + ", ".join(LEGAL_BASES)
            )
        if legal_basis not in LEGAL_BASES:
            raise ValueError(
                f"legal_basis: {legal_basis!r} is not a GDPR art. 6 basis; pass one of "
                + ", ".join(LEGAL_BASES)
            )
        _check_text(consent_ref, "consent_ref", optional=True)
        _check_text(source, "source", optional=True)
        _check_text(requester, "requester", optional=True, limit=256)
        if legal_basis == "consent" and consent_ref is None:
            raise ValueError(
                "consent_ref: legal_basis='consent' needs a reference to the recorded consent"
            )
        retain = None
        if retain_until is not None:
            retain_dt = _parse_time(retain_until, "retain_until")
            if retain_dt <= _now():
                raise ValueError(f"retain_until: {_iso(retain_dt)} is already past")
            retain = _iso(retain_dt)
        with self._mutex, _owner_only():
            if not self._index.is_trained:
                from .errors import NotTrainedError

                raise NotTrainedError(
                    f"{self.path}: the index codec is not trained; call gallery.train(sample) "
                    "before the first enrolment"
                )
            now = _iso(_now())
            cfg = self._config
            for attempt in range(3):
                ids = self._new_ids(x.shape[0])
                try:
                    with self._txn() as db:
                        op_id = self._log_op(db, "enroll", "logged", {"n": int(x.shape[0])})
                        db.executemany(
                            _INSERT_PENDING,
                            (
                                (
                                    int(i),
                                    s_id,
                                    legal_basis,
                                    consent_ref,
                                    source,
                                    cfg["embedder_id"],
                                    cfg["embedder_version"],
                                    now,
                                    retain,
                                    op_id,
                                    row.tobytes(),
                                )
                                for i, s_id, row in zip(ids, subjects, x, strict=True)
                            ),
                        )
                    break
                except sqlite3.IntegrityError:  # a random id met a stored one: draw again
                    if attempt == 2:
                        raise
            _step("enroll:logged")
            self._index.add(x, ids)
            _step("enroll:indexed")
            self._finish_enroll(op_id, sorted(set(subjects)), int(ids.size), legal_basis, requester)
            _step("enroll:done")
            return ids

    def _new_ids(self, n: int) -> npt.NDArray[np.int64]:
        """Random ids not stored in any shard, removed or not (the records' primary key
        catches the astronomically unlikely clash with a row)."""
        rng = np.random.default_rng(secrets.randbits(128))
        while True:
            ids = rng.integers(1, _MAX_ID, size=n, dtype=np.int64)
            if np.unique(ids).size != n:
                continue
            in_index = np.zeros(n, bool)
            for shard in self._index.shards():
                in_index |= shard.contains(ids)
            if not in_index.any():
                return ids

    def _log_op(
        self, db: sqlite3.Connection, kind: str, state: str, payload: dict[str, Any]
    ) -> int:
        cur = db.execute(
            "INSERT INTO ops (kind, state, payload) VALUES (?, ?, ?)",
            (kind, state, json.dumps(payload)),
        )
        return int(cur.lastrowid or 0)

    def _finish_enroll(
        self,
        op_id: int,
        subjects: list[str],
        n: int,
        legal_basis: str | None,
        requester: str | None,
        recovered: bool = False,
    ) -> None:
        with self._txn() as db:
            db.execute("UPDATE records SET state='active', op_id=NULL WHERE op_id=?", (op_id,))
            db.execute("DELETE FROM ops WHERE id=?", (op_id,))
            tags = [self._tag(s) for s in subjects]
            self._append_audit(
                db,
                "enroll",
                requester=requester,
                purpose=None,
                subjects=tags,
                detail={"records": n, "legal_basis": legal_basis, "recovered": recovered},
            )

    # --- search -------------------------------------------------------------------------------
    def search(
        self,
        queries: npt.NDArray[np.float32],
        k: int,
        *,
        requester: str,
        purpose: str,
        threshold: float | None = None,
        nprobe: int | None = None,
        rerank: int | None = None,
    ) -> GalleryMatches:
        """Search the gallery for the purpose it was created for, and audit the call.

        Refuses any ``purpose`` other than the gallery's (``PermissionError``).
        Returns the ``k`` best records per query, with their subjects; with
        ``threshold``, matches scoring worse are dropped. ``rerank`` is passed
        to :meth:`ShardedIndex.search` (exact re-ranking from stored vectors).
        Every call appends an audit entry: requester, purpose, time, number of
        queries and of results, and a hash of the returned subjects.
        """
        _check_text(requester, "requester", limit=256)
        if not isinstance(purpose, str):
            raise TypeError(f"purpose: expected a str, got {type(purpose).__name__}")
        if purpose != self.purpose:
            raise PermissionError(
                f"purpose {purpose!r} is not this gallery's purpose {self.purpose!r}; a gallery "
                "may only be searched for the purpose its records were collected for"
            )
        k = check_k(k)
        if threshold is not None and (
            isinstance(threshold, bool) or not np.isfinite(float(threshold))
        ):
            raise ValueError(f"threshold: expected a finite number, got {threshold!r}")
        q = (
            queries.reshape(1, -1)
            if isinstance(queries, np.ndarray) and queries.ndim == 1
            else queries
        )
        q = check_matrix(q, "queries", d=self.d)
        search_kw: dict[str, Any] = {"nprobe": nprobe, "rerank": rerank}
        larger = self._config["metric"] == "ip"
        with self._mutex:
            try:
                D, I = self._index.search(q, k, **search_kw)
            except EmptyIndexError:
                D = np.full((q.shape[0], k), -np.inf if larger else np.inf, np.float32)
                I = np.full((q.shape[0], k), -1, np.int64)
            subj = self._subjects_of(I)
            keep = np.isin(I, np.fromiter(subj.keys(), np.int64, len(subj)))
            if threshold is not None:
                keep &= threshold <= D if larger else threshold >= D
            # compact each row: kept matches first, in score order
            scores = np.full_like(D, -np.inf if larger else np.inf)
            rids = np.full_like(I, -1)
            names: list[list[str]] = []
            for r in range(I.shape[0]):
                cols = np.flatnonzero(keep[r])
                scores[r, : cols.size] = D[r, cols]
                rids[r, : cols.size] = I[r, cols]
                names.append([subj[int(i)] for i in I[r, cols]])
            returned = sorted({s for row in names for s in row})
            with self._txn() as db:
                self._append_audit(
                    db,
                    "search",
                    requester=requester,
                    purpose=purpose,
                    subjects=[self._tag(s) for s in returned],
                    detail={
                        "nq": int(q.shape[0]),
                        "k": k,
                        "results": int(sum(len(row) for row in names)),
                        "threshold": None if threshold is None else float(threshold),
                    },
                )
        return GalleryMatches(scores, rids, names)

    def _subjects_of(self, ids: npt.NDArray[np.int64]) -> dict[int, str]:
        """Subject of each active record among ``ids``."""
        uniq = np.unique(ids[ids >= 0]).tolist()
        out: dict[int, str] = {}
        db = self._conn()
        for part in _chunks(uniq):
            q = (
                f"SELECT id, subject_id FROM records WHERE state='active' AND id IN "
                f"({','.join('?' * len(part))})"
            )
            out.update((int(i), s) for i, s in db.execute(q, part))
        return out

    # --- export (art. 15) ---------------------------------------------------------------------
    def export_subject(
        self, subject_id: str, *, requester: str | None = None, dedup_threshold: float = 0.9
    ) -> SubjectExport:
        """Everything held about ``subject_id``: records, metadata, embeddings, dedup, audit.

        ``dedup_threshold`` is the cosine above which records count as near
        duplicates of each other for the export's dedup groups.

        No time window and no quota: every record and every audit entry that
        concerns the subject. The export itself is audited.
        """
        _check_text(subject_id, "subject_id", limit=256)
        _check_text(requester, "requester", optional=True, limit=256)
        with self._mutex:
            rows = (
                self._conn()
                .execute(
                    f"SELECT {_RECORD_COLS}, embedding FROM records WHERE subject_id=? ORDER BY "
                    "enrolled_at, id",
                    (subject_id,),
                )
                .fetchall()
            )
            if not rows:
                raise UnknownSubjectError(f"{self.path}: no record of subject {subject_id!r}")
            names = [c.strip() for c in _RECORD_COLS.split(",")]
            records = [dict(zip(names, r[:-1], strict=True)) for r in rows]
            emb = np.stack([np.frombuffer(r[-1], dtype=np.float32) for r in rows])
            ids = np.array([r["id"] for r in records], np.int64)
            tag = self._tag(subject_id)
            audit = [e for e in self.audit_log() if tag in e["subjects"]]
            dedup = _dedup_groups(self, ids, dedup_threshold)
            now = _iso(_now())
            with self._txn() as db:
                self._append_audit(
                    db,
                    "export",
                    requester=requester,
                    purpose=None,
                    subjects=[tag],
                    detail={"records": len(records), "audit_entries": len(audit)},
                )
        gallery = {k: self._config[k] for k in ("purpose", "embedder_id", "embedder_version")}
        gallery["path"] = str(self.path)
        return SubjectExport(subject_id, now, gallery, records, emb, dedup, audit)

    # --- erasure (art. 17) --------------------------------------------------------------------
    def erase_subject(
        self,
        subject_id: str,
        *,
        requester: str | None = None,
        purge: bool = True,
        vacuum: bool = True,
    ) -> ErasureReceipt:
        """Erase every record of ``subject_id``: invisible at once, then physically purged.

        With ``purge=False`` the physical step (shard rewrite, row deletion,
        vacuum) waits for :meth:`compact`; the records are invisible either
        way and the erasure completes even if the process is killed.
        The deleted rows are overwritten with zeros (``secure_delete``), the
        freed pages returned by an incremental vacuum (``vacuum=False`` skips
        it: the file keeps its size until :meth:`compact`, which runs a full
        ``VACUUM``) and the WAL truncated, so no byte of them stays on disk.
        """
        _check_text(subject_id, "subject_id", limit=256)
        _check_text(requester, "requester", optional=True, limit=256)
        with self._mutex:
            rows = (
                self._conn()
                .execute("SELECT id, state FROM records WHERE subject_id=?", (subject_id,))
                .fetchall()
            )
            ids = np.array([r[0] for r in rows if r[1] == "active"], np.int64)
            if ids.size == 0:
                hint = (
                    "its erasure is pending; call compact() to complete it"
                    if rows
                    else "check the id (erasure is idempotent: nothing is held)"
                )
                raise UnknownSubjectError(
                    f"{self.path}: no active record of subject {subject_id!r}; {hint}"
                )
            return self._erase(ids, [subject_id], "erase_subject", requester, purge, vacuum)

    def erase_by_face(
        self,
        embedding: npt.NDArray[np.float32],
        threshold: float,
        *,
        whole_subjects: bool = True,
    ) -> ErasurePlan:
        """Plan the erasure of the records that match a requester's own photo.

        For requests where the subject's id is unknown: every stored
        embedding is compared exactly (not through the index) with
        ``embedding`` (one or more rows); records scoring at least
        ``threshold`` (at most, for L2) match. Returns a plan listing the
        matches and what would be erased (every record of the matched
        subjects, or only the matched records with ``whole_subjects=False``);
        call ``plan.confirm()`` to erase.
        """
        q = (
            embedding.reshape(1, -1)
            if isinstance(embedding, np.ndarray) and embedding.ndim == 1
            else embedding
        )
        q = check_matrix(q, "embedding", d=self.d)
        if isinstance(threshold, bool) or not np.isfinite(float(threshold)):
            raise ValueError(f"threshold: expected a finite number, got {threshold!r}")
        threshold = float(threshold)
        larger = self._config["metric"] == "ip"
        matches: list[dict[str, Any]] = []
        with self._mutex:
            cur = self._conn().execute(
                "SELECT id, subject_id, embedding FROM records WHERE state='active'"
            )
            while batch := cur.fetchmany(8192):
                xb = np.frombuffer(b"".join(r[2] for r in batch), np.float32).reshape(-1, self.d)
                S = exact_scores(q, xb, self._config["metric"])
                s = S.max(axis=0) if larger else S.min(axis=0)
                hit = s >= threshold if larger else s <= threshold
                for j in np.flatnonzero(hit):
                    matches.append(
                        {
                            "record_id": int(batch[j][0]),
                            "subject_id": batch[j][1],
                            "score": float(s[j]),
                        }
                    )
            matches.sort(key=lambda m: -m["score"] if larger else m["score"])
            subjects = sorted({m["subject_id"] for m in matches})
            if whole_subjects and subjects:
                ids_list: list[int] = []
                for part in _chunks(subjects):
                    q_sql = (
                        "SELECT id FROM records WHERE state='active' AND subject_id IN "
                        f"({','.join('?' * len(part))})"
                    )
                    ids_list.extend(r[0] for r in self._conn().execute(q_sql, part))
                ids = np.array(sorted(ids_list), np.int64)
            else:
                ids = np.array(sorted(m["record_id"] for m in matches), np.int64)
            counts: dict[str, int] = {}
            if ids.size:
                for part in _chunks(ids.tolist()):
                    q_sql = (
                        "SELECT subject_id, COUNT(*) FROM records WHERE id IN "
                        f"({','.join('?' * len(part))}) GROUP BY subject_id"
                    )
                    for s_id, c in self._conn().execute(q_sql, part):
                        counts[s_id] = counts.get(s_id, 0) + int(c)
        return ErasurePlan(matches, ids, counts, threshold, self)

    def _confirm_plan(self, plan: ErasurePlan, requester: str | None) -> ErasureReceipt:
        _check_text(requester, "requester", optional=True, limit=256)
        with self._mutex:
            if plan.record_ids.size == 0:
                raise UnknownSubjectError(
                    f"{self.path}: the plan matched no record; nothing to erase"
                )
            active = 0
            for part in _chunks(plan.record_ids.tolist()):
                q = (
                    "SELECT COUNT(*) FROM records WHERE state='active' AND id IN "
                    f"({','.join('?' * len(part))})"
                )
                active += int(self._conn().execute(q, part).fetchone()[0])
            if active != plan.record_ids.size:
                raise RuntimeError(
                    "the gallery changed since this plan was made (some planned records are "
                    "already erased); call erase_by_face again"
                )
            return self._erase(
                plan.record_ids, sorted(plan.subjects), "erase_by_face", requester, True
            )

    def purge_expired(self, *, now: dt.datetime | str | None = None) -> ErasureReceipt | None:
        """Erase every record whose retention date is past (``now``: default the clock)."""
        t = _now() if now is None else _parse_time(now, "now")
        with self._mutex:
            rows = (
                self._conn()
                .execute(
                    "SELECT id, subject_id FROM records WHERE state='active' AND "
                    "retain_until IS NOT NULL AND retain_until < ?",
                    (_iso(t),),
                )
                .fetchall()
            )
            if not rows:
                return None
            ids = np.array([r[0] for r in rows], np.int64)
            subjects = sorted({r[1] for r in rows})
            return self._erase(ids, subjects, "retention", None, True)

    def _erase(
        self,
        ids: npt.NDArray[np.int64],
        subject_ids: list[str],
        reason: str,
        requester: str | None,
        purge: bool,
        vacuum: bool = True,
    ) -> ErasureReceipt:
        t0 = time.perf_counter()
        requested_at = _iso(_now())
        tags = [self._tag(s) for s in subject_ids]
        with _owner_only():
            with self._txn() as db:
                op_id = self._log_op(
                    db,
                    "erase",
                    "logged",
                    {
                        "reason": reason,
                        "subjects": tags,
                        "requester": requester,
                        "requested_at": requested_at,
                        "purge": purge,
                    },
                )
                for part in _chunks(ids.tolist()):
                    db.execute(
                        f"UPDATE records SET state='erasing', op_id=? WHERE id IN "
                        f"({','.join('?' * len(part))})",
                        [op_id, *part],
                    )
            _step("erase:logged")
            shards = self._hide(ids)
            t_hidden = time.perf_counter()
            invisible_at = _iso(_now())
            with self._txn() as db:
                self._update_op(
                    db,
                    op_id,
                    "hidden",
                    {
                        "invisible_at": invisible_at,
                        "invisible_ms": (t_hidden - t0) * 1e3,
                        "shards": shards,
                    },
                )
            _step("erase:hidden")
            if not purge:
                self._index.flush()  # tombstones on disk; compact() finishes the erasure
                payload = self._op_payload(op_id)
                return self._receipt(payload, int(ids.size), subject_ids, ids, None, None, False)
            receipt, _ = self._purge([op_id], t_hidden, vacuum=vacuum)[op_id]
        return dataclasses.replace(receipt, subject_ids=tuple(subject_ids))

    def _hide(self, ids: npt.NDArray[np.int64]) -> int:
        """Remove ``ids`` from the in-memory index (no commit); how many shards held them."""
        held = self._shards_holding(ids)
        self._index.remove(ids, commit=False)
        return held

    def _shards_holding(self, ids: npt.NDArray[np.int64]) -> int:
        return sum(1 for shard in self._index.shards() if shard.contains(ids).any())

    def _update_op(
        self, db: sqlite3.Connection, op_id: int, state: str, extra: dict[str, Any]
    ) -> None:
        row = db.execute("SELECT payload FROM ops WHERE id=?", (op_id,)).fetchone()
        payload = {**json.loads(row[0]), **extra}
        db.execute(
            "UPDATE ops SET state=?, payload=? WHERE id=?", (state, json.dumps(payload), op_id)
        )

    def _op_payload(self, op_id: int) -> dict[str, Any]:
        row = self._conn().execute("SELECT payload FROM ops WHERE id=?", (op_id,)).fetchone()
        return dict(json.loads(row[0]))

    def _purge(
        self,
        op_ids: list[int],
        t_hidden: float | None,
        *,
        recovered: bool = False,
        vacuum: bool = True,
    ) -> dict[int, tuple[ErasureReceipt, npt.NDArray[np.int64]]]:
        """Physical step of erase ops: rewrite shards, delete rows, vacuum, write receipts."""
        db = self._conn()
        t1 = time.perf_counter() if t_hidden is None else t_hidden
        per_op: dict[int, npt.NDArray[np.int64]] = {}
        for op_id in op_ids:
            per_op[op_id] = np.array(
                [r[0] for r in db.execute("SELECT id FROM records WHERE op_id=?", (op_id,))],
                np.int64,
            )
        all_ids = np.concatenate(list(per_op.values())) if per_op else np.empty(0, np.int64)
        # any id still in a shard (a replay after a crash) is hidden first
        still = np.zeros(all_ids.size, bool)
        for shard in self._index.shards():
            still |= shard.contains(all_ids)
        if still.any():
            self._index.remove(all_ids[still], commit=False)
        self._index.compact()  # rewrites every sealed shard holding a tombstone
        self._index.flush()  # and the open shard, if it held any; deletes the old files
        _step("erase:index_purged")
        generation = self._index_generation()
        with self._txn() as db:
            for op_id, ids in per_op.items():
                for part in _chunks(ids.tolist()):
                    db.execute(
                        f"DELETE FROM records WHERE id IN ({','.join('?' * len(part))})", part
                    )
                self._update_op(
                    db,
                    op_id,
                    "vacuum",
                    {
                        "records": int(ids.size),
                        "index_generation": generation,
                        "recovered": recovered,
                    },
                )
        _step("erase:rows_deleted")
        if vacuum:
            self._vacuum()
        else:
            self._checkpoint()
        _step("erase:vacuumed")
        return self._finish_erasures(op_ids, t1, per_op, vacuumed=vacuum)

    def _finish_erasures(
        self,
        op_ids: list[int],
        t1: float,
        per_op: dict[int, npt.NDArray[np.int64]] | None = None,
        *,
        vacuumed: bool = True,
    ) -> dict[int, tuple[ErasureReceipt, npt.NDArray[np.int64]]]:
        purged_at = _iso(_now())
        purge_ms = (time.perf_counter() - t1) * 1e3
        out = {}
        with self._txn() as db:
            for op_id in op_ids:
                p = self._op_payload(op_id)
                ids = (per_op or {}).get(op_id, np.empty(0, np.int64))
                rec = self._receipt(p, int(p["records"]), [], ids, purged_at, purge_ms, vacuumed)
                stored = rec.to_dict()
                stored.pop("subject_ids")
                stored["subjects"] = p["subjects"]
                db.execute("INSERT INTO erasures (receipt) VALUES (?)", (json.dumps(stored),))
                self._append_audit(
                    db,
                    "erase",
                    requester=p.get("requester"),
                    purpose=None,
                    subjects=p["subjects"],
                    detail={
                        "reason": p["reason"],
                        "records": int(p["records"]),
                        "digest": rec.digest,
                        "recovered": bool(p.get("recovered")),
                    },
                )
                db.execute("DELETE FROM ops WHERE id=?", (op_id,))
                out[op_id] = (rec, ids)
        self._checkpoint()
        return out

    def _receipt(
        self,
        p: dict[str, Any],
        n: int,
        subject_ids: Sequence[str],
        ids: npt.NDArray[np.int64],
        purged_at: str | None,
        purge_ms: float | None,
        vacuumed: bool,
    ) -> ErasureReceipt:
        body = {
            "reason": p["reason"],
            "subjects": p["subjects"],
            "records_erased": n,
            "shards_rewritten": int(p.get("shards", 0)) if purged_at else 0,
            "requested_at": p["requested_at"],
            "invisible_at": p.get("invisible_at", p["requested_at"]),
            "purged_at": purged_at,
            "record_ids": sorted(int(i) for i in ids),
        }
        digest = hashlib.sha256(_canonical(body)).hexdigest()
        return ErasureReceipt(
            subject_ids=tuple(subject_ids),
            reason=p["reason"],
            records_erased=n,
            shards_rewritten=body["shards_rewritten"],
            requested_at=p["requested_at"],
            invisible_at=body["invisible_at"],
            purged_at=purged_at,
            invisible_ms=float(p.get("invisible_ms", 0.0)),
            purge_ms=purge_ms,
            vacuumed=vacuumed,
            index_generation=int(p.get("index_generation", self._index_generation())),
            digest=digest,
        )

    def _index_generation(self) -> int:
        return self._index.generation

    def _vacuum(self, *, full: bool = False) -> None:
        """Return free pages to the file system, then truncate the WAL.

        Deleted rows are already zeroed (``secure_delete``); the incremental
        vacuum moves the last pages into the freed ones and truncates the
        file, so it costs what was freed, not the size of the gallery.
        ``full=True`` rewrites the whole file (``VACUUM``), as compaction does.
        """
        db = self._conn()
        if full:
            db.execute("VACUUM")
        else:
            db.execute("PRAGMA incremental_vacuum").fetchall()
        self._checkpoint()

    def _checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it, so it keeps no old page."""
        row = self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if row is not None and row[0] != 0:
            raise RuntimeError(f"{self.path / META}: WAL checkpoint was blocked by a reader")

    def erasure_receipts(self) -> list[dict[str, Any]]:
        """Stored receipts of completed erasures (subjects named by their keyed hash)."""
        rows = self._conn().execute("SELECT receipt FROM erasures ORDER BY id")
        return [json.loads(r[0]) for r in rows]

    # --- compaction ---------------------------------------------------------------------------
    def compact(self) -> dict[str, int]:
        """Complete deferred erasures and fold every pending removal into the shard files."""
        with self._mutex, _owner_only():
            ops = [
                int(r[0])
                for r in self._conn().execute(
                    "SELECT id FROM ops WHERE kind='erase' AND state IN ('logged', 'hidden') "
                    "ORDER BY id"
                )
            ]
            pending = self._index.pending_removals
            if ops:
                with self._txn() as db:
                    for op_id in ops:
                        self._update_op(db, op_id, "purging", {})
            _step("compact:start")
            if ops:
                done = self._purge(ops, None)
                self._vacuum(full=True)
                return {
                    "erasures_completed": len(done),
                    "records_purged": sum(int(r.records_erased) for r, _ in done.values()),
                    "pending_removals_folded": pending,
                }
            stats = self._index.compact()
            _step("compact:index")
            self._vacuum(full=True)
            return {
                "erasures_completed": 0,
                "records_purged": 0,
                "pending_removals_folded": int(stats["removed"]),
            }

    # --- recovery -----------------------------------------------------------------------------
    def _recover(self) -> None:
        """Complete or roll back what a killed process left in the ``ops`` table."""
        db = self._conn()
        ops = db.execute("SELECT id, kind, state FROM ops ORDER BY id").fetchall()
        erase_purge: list[int] = []
        erase_finish: list[int] = []
        erase_hide: list[int] = []
        for op_id, kind, state in ops:
            if kind == "enroll":
                ids = np.array(
                    [r[0] for r in db.execute("SELECT id FROM records WHERE op_id=?", (op_id,))],
                    np.int64,
                )
                present = self._index.contains(ids) if ids.size else np.zeros(0, bool)
                if ids.size and present.all():
                    rows = db.execute(
                        "SELECT DISTINCT subject_id, legal_basis FROM records WHERE op_id=?",
                        (op_id,),
                    ).fetchall()
                    self._finish_enroll(
                        op_id,
                        sorted({r[0] for r in rows}),
                        int(ids.size),
                        rows[0][1],
                        None,
                        recovered=True,
                    )
                else:  # the index commit never happened: the enrolment did not take place
                    if present.any():
                        self._index.remove(ids[present], commit=False)
                        self._index.compact()
                        self._index.flush()
                    with self._txn() as tx:
                        tx.execute("DELETE FROM records WHERE op_id=?", (op_id,))
                        tx.execute("DELETE FROM ops WHERE id=?", (op_id,))
                    self._vacuum()
            elif kind == "erase":
                if state == "vacuum":
                    erase_finish.append(op_id)
                elif state == "purging" or self._op_payload(op_id).get("purge", True):
                    erase_purge.append(op_id)
                else:  # a deferred erasure: keep it hidden until compact()
                    erase_hide.append(op_id)
            else:
                raise CorruptIndexError(f"{self.path / META}: unknown pending op {kind!r}")
        if erase_finish:
            self._vacuum()
            self._finish_erasures(erase_finish, time.perf_counter())
        for op_id in erase_purge:
            payload = self._op_payload(op_id)
            if "shards" not in payload:
                ids = np.array(
                    [r[0] for r in db.execute("SELECT id FROM records WHERE op_id=?", (op_id,))],
                    np.int64,
                )
                with self._txn() as tx:
                    self._update_op(
                        tx,
                        op_id,
                        "purging",
                        {
                            "invisible_at": _iso(_now()),
                            "shards": self._shards_holding(ids),
                        },
                    )
            with self._txn() as tx:
                self._update_op(tx, op_id, "purging", {"recovered": True})
        if erase_purge:
            self._purge(erase_purge, None, recovered=True)
        for op_id in erase_hide:
            ids = np.array(
                [r[0] for r in db.execute("SELECT id FROM records WHERE op_id=?", (op_id,))],
                np.int64,
            )
            if self._index.contains(ids).any():
                self._index.remove(ids)  # commits the tombstones
            payload = self._op_payload(op_id)
            if "shards" not in payload:
                with self._txn() as tx:
                    self._update_op(
                        tx,
                        op_id,
                        "hidden",
                        {"invisible_at": _iso(_now()), "shards": self._shards_holding(ids)},
                    )
        self._checkpoint()

    # --- audit --------------------------------------------------------------------------------
    def _append_audit(
        self,
        db: sqlite3.Connection,
        kind: str,
        *,
        requester: str | None,
        purpose: str | None,
        subjects: list[str],
        detail: dict[str, Any],
    ) -> None:
        head = json.loads(self._meta("audit_head"))
        seq = int(head["seq"]) + 1
        tags = sorted(set(subjects))
        entry = {
            "seq": seq,
            "time": _iso(_now()),
            "kind": kind,
            "requester": requester,
            "purpose": purpose,
            "subjects": tags,
            "subjects_hash": hashlib.sha256("\n".join(tags).encode()).hexdigest(),
            "detail": detail,
            "prev": head["hash"],
        }
        text = _canonical(entry).decode()
        digest = hashlib.sha256((head["hash"] + text).encode()).hexdigest()
        db.execute("INSERT INTO audit (seq, entry, hash) VALUES (?, ?, ?)", (seq, text, digest))
        db.execute(
            "UPDATE meta SET value=? WHERE key='audit_head'",
            (json.dumps({"seq": seq, "hash": digest}),),
        )

    def audit_head(self) -> dict[str, Any]:
        """``{"seq", "hash"}`` of the last audit entry: anchor it elsewhere to detect truncation."""
        return dict(json.loads(self._meta("audit_head")))

    def audit_log(self, since: dt.datetime | str | None = None) -> list[dict[str, Any]]:
        """The audit entries (all, or those at or after ``since``), after verifying the chain.

        Raises :class:`~fastface.errors.AuditChainError` when an entry was
        edited, removed or inserted (the whole chain is checked from the first
        entry to the recorded head on every call).
        """
        cutoff = None if since is None else _iso(_parse_time(since, "since"))
        where = str(self.path / META)
        prev = _GENESIS
        expect = 1
        out = []
        with self._mutex:
            rows = self._conn().execute("SELECT seq, entry, hash FROM audit ORDER BY seq")
            for seq, text, digest in rows:
                if seq != expect:
                    raise AuditChainError(
                        f"{where}: audit entry {expect} is missing (next is {seq}); the log "
                        "was tampered with",
                        where,
                        expect,
                    )
                if hashlib.sha256((prev + text).encode()).hexdigest() != digest:
                    raise AuditChainError(
                        f"{where}: audit entry {seq} does not match its hash; it was edited",
                        where,
                        seq,
                    )
                try:
                    entry = json.loads(text)
                except json.JSONDecodeError as e:
                    raise AuditChainError(
                        f"{where}: audit entry {seq} is not JSON", where, seq
                    ) from e
                if entry.get("prev") != prev or entry.get("seq") != seq:
                    raise AuditChainError(
                        f"{where}: audit entry {seq} does not chain to entry {seq - 1}",
                        where,
                        seq,
                    )
                prev = digest
                expect += 1
                if cutoff is None or entry["time"] >= cutoff:
                    out.append(dict(entry, hash=digest))
            head = json.loads(self._meta("audit_head"))
        if int(head["seq"]) != expect - 1 or head["hash"] != prev:
            raise AuditChainError(
                f"{where}: the audit log ends at entry {expect - 1} but its head records entry "
                f"{head['seq']}; entries were removed from (or added to) the end",
                where,
                expect,
            )
        return out

    # --- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Close the metadata store and release the writer lock."""
        with self._mutex:
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._checkpoint()
                self._db.close()
                self._db = None
            self._index.close()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _dedup_groups(
    gallery: Gallery, record_ids: npt.NDArray[np.int64], threshold: float
) -> dict[str, Any]:
    """Near-duplicate groups (cosine >= ``threshold``) that hold any of ``record_ids``.

    Runs :func:`fastface.dedup` over the whole index (exact cosine on stored
    vectors, transitive groups). Groups list the subject's own record ids and
    only the number of other members, never other subjects' ids.
    """
    from ._dedup import dedup

    result = dedup(gallery.index, threshold, progress=False)
    mine = set(record_ids.tolist())
    groups = []
    for members in result.groups(min_size=2):
        own = sorted(int(i) for i in members.tolist() if int(i) in mine)
        if own:
            groups.append({"records": own, "other_members": int(members.size) - len(own)})
    return {"available": True, "threshold": float(threshold), "groups": groups}
