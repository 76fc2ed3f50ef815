"""The :class:`Gallery` facade: one object, one lock, the verbs; the work is in the modules."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import hmac
import json
import logging
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar, cast

import numpy as np
import numpy.typing as npt

from .._validation import check_k, check_positive_int
from ..errors import (
    CorruptGalleryError,
    CorruptIndexError,
    IndexLockedError,
    UnknownSubjectError,
)
from ..index import IVFPQParams, storage
from . import access, enrolment, erasure, journal, keys, policy, recovery
from .context import Context
from .records import META, Database
from .results import ErasurePlan, ErasureReceipt, GalleryMatches, SubjectExport
from .vectors import DEFAULT_FLAT_LIMIT, FLAT, IVFPQ, VectorStore, default_params

__all__ = ["Gallery"]

log = logging.getLogger("fastface")

FORMAT = "fastface.gallery"
FORMAT_VERSION = 2
CONFIG = "gallery.json"
_INDEX_DIR = re.compile(r"^index-\d{1,9}$")
F = TypeVar("F", bound=Any)
_OWN = {CONFIG, META, META + "-wal", META + "-shm", keys.KEY_FILE, keys.SECRETS_FILE, ".lock"}


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = storage.read_manifest(path / CONFIG, kind=FORMAT, max_version=FORMAT_VERSION)
    except CorruptIndexError as e:
        raise CorruptGalleryError(str(e), str(path / CONFIG), e.field) from e
    if cfg.get("format_version") != FORMAT_VERSION:
        raise CorruptGalleryError(
            f"{path / CONFIG}: gallery format {cfg.get('format_version')} (embeddings kept in the "
            f"database) is not read by this version, which reads format {FORMAT_VERSION}; "
            "export the subjects with the fastface that wrote it and enrol them anew",
            str(path / CONFIG),
            "format_version",
        )
    try:
        ok = (
            isinstance(cfg["d"], int)
            and cfg["index"]["kind"] in (FLAT, IVFPQ)
            and _INDEX_DIR.match(cfg["index"]["dir"]) is not None
            and cfg["key"]["location"] in ("gallery", "external")
            and isinstance(cfg["key"]["check"], str)
        )
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise CorruptGalleryError(f"{path / CONFIG}: fields missing or invalid", str(path / CONFIG))
    return cfg


def _guarded(fn: F) -> F:
    """Damage SQLite reports mid-call becomes :class:`CorruptGalleryError` naming the file."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError) and not any(
                w in str(e) for w in ("malformed", "no such", "corrupt", "not a database")
            ):
                raise  # locked, busy, full disk, I/O: not damage
            obj = args[0] if args and isinstance(args[0], Gallery) else None
            where = obj.path if obj is not None else Path(args[1] if len(args) > 1 else ".")
            db = Path(where) / META
            raise CorruptGalleryError(f"{db}: {e}", str(db), "sqlite") from e

    return cast(F, call)


def _write_config(path: Path, cfg: dict[str, Any]) -> None:
    storage.atomic_write_json(path / CONFIG, storage.seal(cfg), mode=0o600)


class Gallery:
    """Face records held under a legal basis: audited, exact search; export; erasure.

    Make one with :meth:`create`, reopen it with :meth:`open`. A gallery
    works from its first enrolment: it searches exactly (every stored vector
    scored) until it holds ``flat_limit`` vectors, then trains an IVF-PQ
    codec on its own vectors and re-encodes them (or call :meth:`train`).
    Scores are cosine similarities everywhere; embeddings must be
    L2-normalised.

    One process writes at a time (``mode="a"``, the default; a second gets
    :class:`~fastface.errors.IndexLockedError`); any number may open it with
    ``mode="r"`` to search and export (audited) while one writes. Calls are
    serialised by a lock, so a gallery may be shared between threads.

    Examples
    --------
    >>> import tempfile
    >>> from fastface import Gallery
    >>> from fastface.datasets import SyntheticFaces
    >>> xb, _ = SyntheticFaces(n_identities=3, per_identity=4, d=32, seed=0).vectors()
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     with Gallery.create(tmp + "/g", d=32, purpose="access_control",
    ...                         embedder_id="synthetic") as g:
    ...         _ = g.enroll("alice", xb[:4], legal_basis="consent", consent_ref="form-17")
    ...         _ = g.enroll("bob", xb[4:8], legal_basis="contract")
    ...         m = g.search(xb[:1], 2, requester="door-3", purpose="access_control")
    ...         print(m.subject_ids[0], round(float(m.scores[0, 0]), 3))
    ...         r = g.erase_subject("alice")
    ...         print(r.records_erased, r.purge_status, g.subjects())
    ['alice', 'alice'] 1.0
    4 purged ['bob']
    """

    def __init__(self, ctx: Context, lock: storage.WriterLock | None) -> None:
        self._ctx: Context | None = ctx
        self._lock = lock
        self.path = ctx.path

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        d: int,
        purpose: str,
        embedder_id: str,
        embedder_version: str | None = None,
        params: IVFPQParams | None = None,
        store_vectors: Literal["float16", "float32"] = "float16",
        flat_limit: int | None = DEFAULT_FLAT_LIMIT,
        shard_size: int = 50_000,
        key: bytes | None = None,
        key_file: str | os.PathLike[str] | None = None,
    ) -> Gallery:
        """Create an empty gallery directory for one ``purpose``; ready to enrol.

        Parameters
        ----------
        d : int
            Dimension of the embeddings (L2-normalised rows).
        purpose, embedder_id, embedder_version : str
            The one purpose searches must state; the model whose embeddings
            the gallery holds (recorded with every grant).
        params : IVFPQParams, optional
            The IVF-PQ codec to use once the gallery grows past ``flat_limit``
            (or on :meth:`train`); default: chosen from the size then. Its
            metric must be ``"ip"`` (cosine on unit vectors).
        store_vectors : {"float16", "float32"}
            Precision of the stored vectors: float32 makes exports bit-exact
            copies of what was enrolled (twice the disk of float16).
        flat_limit : int or None
            Vectors up to which the gallery stays flat (exact, no training);
            ``None``: stay flat until :meth:`train` is called.
        shard_size : int
            Vectors per index shard: an erasure rewrites the shards holding
            the erased vectors, so this bounds its cost.
        key, key_file
            The gallery key (audit chain, row checks, subject look-up). By
            default a new one is written to ``<path>/gallery.key``
            (owner-only). ``key`` (32+ random bytes) or ``key_file`` (an
            existing key file, or a new one written there) keeps it outside
            the gallery; pass the same to :meth:`open`.
        """
        policy.check_text(purpose, "purpose", limit=200)
        policy.check_text(embedder_id, "embedder_id", limit=200)
        policy.check_text(embedder_version, "embedder_version", optional=True, limit=200)
        d = check_positive_int(d, "d")
        shard_size = check_positive_int(shard_size, "shard_size")
        if store_vectors not in ("float16", "float32"):
            raise ValueError(f"store_vectors must be 'float16' or 'float32', got {store_vectors!r}")
        if flat_limit is not None:
            flat_limit = check_positive_int(flat_limit, "flat_limit")
        params = _check_params(params, d, store_vectors)
        if key is not None and key_file is not None:
            raise ValueError("pass key= or key_file=, not both")
        master = keys.new_master() if key is None else bytes(key)
        gk = keys.GalleryKeys(master)  # checks the key's length
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path}: exists and is not a directory")
        if path.is_dir() and (path / CONFIG).exists():
            raise FileExistsError(
                f"{path}: exists and holds a gallery; open it with Gallery.open or pick a new "
                "directory"
            )
        if path.is_dir() and any(
            p.name not in _OWN and not _INDEX_DIR.match(p.name) for p in path.iterdir()
        ):
            raise FileExistsError(f"{path}: exists and is not empty; pick a new directory")
        storage.make_dir(path, 0o700)
        lock = storage.WriterLock(path)
        lock.acquire()
        try:
            for p in path.iterdir():  # what a killed create left (no gallery.json: no gallery)
                if p.name != ".lock":
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            location = "gallery"
            if key_file is not None:
                location = "external"
                if Path(key_file).exists():
                    master = keys.read_key_file(Path(key_file))
                    gk = keys.GalleryKeys(master)
                else:
                    keys.write_key_file(Path(key_file), master)
            elif key is not None:
                location = "external"
            else:
                keys.write_key_file(path / keys.KEY_FILE, master)
            secrets_ = keys.SubjectSecrets.create(path / keys.SECRETS_FILE, gk.rows)
            db = Database.create(path / META, gk)
            store = VectorStore.create_flat(
                path, "index-1", d=d, store_vectors=store_vectors, shard_size=shard_size
            )
            config = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "d": d,
                "purpose": purpose,
                "embedder_id": embedder_id,
                "embedder_version": embedder_version,
                "created_at": policy.iso(policy.now()),
                "index": {"dir": "index-1", "kind": FLAT},
                "ivfpq": None if params is None else params.to_dict(),
                "store_vectors": store_vectors,
                "flat_limit": flat_limit,
                "key": {"location": location, "check": gk.check},
            }
            ctx = Context(path, config, db, gk, secrets_, store, writable=True)
            with db.txn() as conn:
                ctx.audit.init(conn)
                ctx.publish_state(conn, index="index-1", shreds=0)
            _write_config(path, config)  # last: from here on the directory is a gallery
        except BaseException:
            lock.release()
            raise
        return cls(ctx, lock)

    @classmethod
    @_guarded
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        mode: Literal["a", "r"] = "a",
        key: bytes | None = None,
        key_file: str | os.PathLike[str] | None = None,
    ) -> Gallery:
        """Open a gallery: check every store, finish or undo interrupted changes, reconcile.

        ``mode="a"`` (default) takes the writer lock (a second writer gets
        :class:`~fastface.errors.IndexLockedError`), replays the journal and
        reconciles index and records (see ``status()["reconciliation"]``).
        ``mode="r"`` searches and exports while another process writes (its
        searches are still audited); it follows the writer's commits.

        Damage raises :class:`~fastface.errors.CorruptGalleryError` naming
        the file: a database failing ``PRAGMA quick_check``, a write-ahead
        log whose committed frames fail their checksums, a damaged
        configuration or key store.
        """
        if mode not in ("a", "r"):
            raise ValueError(f"mode must be 'a' or 'r', got {mode!r}")
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such gallery directory")
        lock = None
        if mode == "a":
            lock = storage.WriterLock(path)
            try:
                lock.acquire()
            except IndexLockedError as e:
                raise IndexLockedError(
                    f"{path}: another process has this gallery open for writing; close it "
                    "there first (one writer at a time), or open it with mode='r'"
                ) from e
        try:
            cfg = _read_config(path)
            gk = keys.load_keys(path, cfg["key"]["location"], cfg["key"]["check"], key, key_file)
            writable = mode == "a"
            if writable:
                for p in path.iterdir():  # index directories a conversion left behind
                    if _INDEX_DIR.match(p.name) and p.name != cfg["index"]["dir"] and p.is_dir():
                        shutil.rmtree(p)
            secrets_ = keys.SubjectSecrets.open(
                path / keys.SECRETS_FILE, gk.rows, writable=writable
            )
            try:
                db, wal = Database.open(path / META, gk)
            except BaseException:
                secrets_.close()
                raise
            try:
                store = VectorStore.open(
                    path, cfg["index"]["dir"], cfg["index"]["kind"], writable=writable
                )
            except BaseException:
                secrets_.close()
                db.close()
                raise
            ctx = Context(path, cfg, db, gk, secrets_, store, writable=writable)
            ctx.report = {"wal": wal}
            obj = cls(ctx, lock)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        try:
            if writable:
                with ctx.mutex:
                    ctx.report["replay"] = recovery.replay(ctx)
                    ctx.report["reconciliation"] = recovery.reconcile(ctx, wal)
            else:
                ctx.seen_state = ctx.state()
        except BaseException:
            obj.close()
            raise
        return obj

    # --- state --------------------------------------------------------------------------------
    @property
    def _c(self) -> Context:
        if self._ctx is None:
            raise RuntimeError(f"{self.path}: the gallery is closed")
        return self._ctx

    @property
    def d(self) -> int:
        return self._c.d

    @property
    def purpose(self) -> str:
        return str(self._c.config["purpose"])

    @property
    def embedder_id(self) -> str:
        return str(self._c.config["embedder_id"])

    @property
    def kind(self) -> str:
        """``"flat"`` (exact search, no training) or ``"ivfpq"``."""
        return self._c.store.kind

    @property
    def index(self) -> Any:
        """The underlying :class:`~fastface.ShardedIndex` (read it; change it only through the
        gallery)."""
        return self._c.store.index

    @property
    def ntotal(self) -> int:
        """Number of searchable vectors."""
        return self._c.store.ntotal

    def __repr__(self) -> str:
        if self._ctx is None:
            return f"Gallery({str(self.path)!r}, closed)"
        return (
            f"Gallery({str(self.path)!r}, d={self.d}, purpose={self.purpose!r}, "
            f"kind={self.kind!r}, ntotal={self.ntotal})"
        )

    @_guarded
    def subjects(self) -> list[str]:
        """Ids of the subjects with records, sorted."""
        ctx = self._c
        with ctx.mutex:
            self._refresh()
            rows = ctx.db.conn.execute(
                "SELECT sid, lookup, slot, name, chk FROM subjects"
            ).fetchall()
            return sorted(ctx.subject_from_row(ctx.db.verify_subject(r)).subject_id for r in rows)

    def _refresh(self) -> None:
        """A read-only gallery follows the writer: reload the index when it changed."""
        ctx = self._c
        if ctx.writable:
            return
        st = ctx.state()
        if st.get("shreds") != ctx.seen_state.get("shreds"):
            ctx.forget()
        if st.get("index") != ctx.store.dirname or st.get("generation") != ctx.store.generation:
            for attempt in range(5):
                try:
                    cfg = _read_config(ctx.path)
                    store = VectorStore.open(
                        ctx.path, cfg["index"]["dir"], cfg["index"]["kind"], writable=False
                    )
                except (FileNotFoundError, CorruptIndexError):
                    if attempt == 4:
                        raise
                    time.sleep(0.05)
                    continue
                old, ctx.store, ctx.config = ctx.store, store, cfg
                old.close()
                break
        ctx.seen_state = st

    @_guarded
    def status(self) -> dict[str, Any]:
        """Kind, sizes, pending purges (with why), the open-time reconciliation report."""
        ctx = self._c
        with ctx.mutex:
            self._refresh()
            pending = [
                {
                    "requested_at": p.get("requested_at"),
                    "records": p.get("records"),
                    "receipt": p.get("receipt"),
                    "note": p.get("note", "in progress"),
                }
                for _, kind, _s, p, _ids in journal.ops(ctx.db)
                if kind == "erase"
            ]
            conn = ctx.db.conn
            return {
                "mode": "a" if ctx.writable else "r",
                "kind": ctx.store.kind,
                "ntotal": ctx.store.ntotal,
                "records": int(conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]),
                "subjects": int(conn.execute("SELECT COUNT(*) FROM subjects").fetchone()[0]),
                "store_vectors": ctx.store.store_vectors,
                "index_dir": ctx.store.dirname,
                "index_generation": ctx.store.generation,
                "pending_purges": pending,
                "audit_head": ctx.audit.head(),
                **{k: v for k, v in ctx.report.items()},
            }

    # --- enrolment ----------------------------------------------------------------------------
    @_guarded
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
        """Enrol ``embeddings`` (float32 ``(n, d)``, L2-normalised rows) of one subject.

        Returns their record ids. ``legal_basis`` is one of
        :data:`~fastface.gallery.LEGAL_BASES`; ``"consent"`` also needs
        ``consent_ref``. ``retain_until`` (a future date) makes
        :meth:`purge_expired` erase the records after it. Nothing is stored
        when any argument is wrong, and an enrolment that raises for any
        reason leaves nothing behind (now or after a reopen).
        """
        policy.check_text(subject_id, "subject_id", limit=policy.SUBJECT_LIMIT)
        x = policy.unit_rows(embeddings, "embeddings", self.d)
        return self._enroll([subject_id] * x.shape[0], x, legal_basis, consent_ref, source,
                            retain_until, requester)  # fmt: skip

    @_guarded
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
        """Bulk :meth:`enroll`: row ``i`` belongs to ``subject_ids[i]``; all or nothing."""
        x = policy.unit_rows(embeddings, "embeddings", self.d)
        if isinstance(subject_ids, str) or len(subject_ids) != x.shape[0]:
            raise ValueError(
                f"subject_ids: expected a sequence of {x.shape[0]} ids (one per row of "
                "embeddings); for one subject use enroll()"
            )
        subjects = list(subject_ids)
        for s in set(subjects):
            policy.check_text(s, "subject_ids[i]", limit=policy.SUBJECT_LIMIT)
        return self._enroll(subjects, x, legal_basis, consent_ref, source, retain_until, requester)

    def _enroll(self, subjects: list[str], x: Any, *args: Any) -> npt.NDArray[np.int64]:
        ctx = self._c
        legal_basis, consent_ref, source, retain_until, requester = args
        with ctx.mutex:
            ids = enrolment.enroll(
                ctx,
                subjects,
                x,
                legal_basis=legal_basis,
                consent_ref=consent_ref,
                source=source,
                retain_until=retain_until,
                requester=requester,
            )
            limit = ctx.config.get("flat_limit")
            if ctx.store.kind == FLAT and limit is not None and ctx.store.ntotal > limit:
                try:
                    self._reindex(None, None, None, 0, requester=None)
                except Exception as e:  # the enrolment stands; the gallery stays flat for now
                    log.warning("%s: moving to IVF-PQ failed (%s); still flat", self.path, e)
                    ctx.report["reindex_error"] = str(e)
        return ids

    @_guarded
    def train(
        self,
        x: npt.NDArray[np.float32] | None = None,
        *,
        params: IVFPQParams | None = None,
        max_points: int | None = None,
        seed: int = 0,
    ) -> None:
        """Move the gallery to IVF-PQ now (it does so by itself past ``flat_limit``).

        Trains the codec (``params``, the ones given at :meth:`create`, or
        chosen from the size) on ``x`` or, without ``x``, on the gallery's
        own vectors, and re-encodes every stored vector (ids unchanged). The
        sample is not stored. Enrolment never needs this.
        """
        ctx = self._c
        ctx.require_writable("training")
        with ctx.mutex:
            self._reindex(x, params, max_points, seed, requester=None)

    def _reindex(
        self,
        x: npt.NDArray[np.float32] | None,
        params: IVFPQParams | None,
        max_points: int | None,
        seed: int,
        *,
        requester: str | None,
    ) -> None:
        ctx = self._c
        store_vectors = ctx.config["store_vectors"]
        if params is None and ctx.config.get("ivfpq") is not None:
            params = IVFPQParams.from_dict(ctx.config["ivfpq"])
        n_sample = x.shape[0] if isinstance(x, np.ndarray) and x.ndim == 2 else ctx.store.ntotal
        if params is None:
            params = default_params(max(n_sample, ctx.store.ntotal), self.d, store_vectors)
        params = _check_params(params, self.d, store_vectors)
        assert params is not None
        need = max(params.nlist, 2**params.nbits)
        if n_sample < need:
            largest = (
                max(
                    n
                    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
                    if n * 39 <= max(n_sample, 1)
                )
                if n_sample >= 39
                else 0
            )
            hint = (
                f"pass at least {need} training vectors, or params with nlist <= {largest}"
                if n_sample >= 2**params.nbits
                else f"IVF-PQ with {params.nbits}-bit codes needs at least {2**params.nbits} "
                "training vectors"
            )
            raise ValueError(
                f"x: training nlist={params.nlist} lists with {params.nbits}-bit codes needs at "
                f"least {need} vectors, got {n_sample}; {hint}. A gallery needs no training: it "
                f"searches exactly until it holds {ctx.config.get('flat_limit')} vectors, then "
                "trains itself on them"
            )
        if x is not None:
            x = policy.unit_rows(x, "x", self.d)
        old = ctx.store
        number = int(old.dirname.split("-")[1]) + 1
        new = old.reencode(ctx.path, f"index-{number}", params, x, max_points=max_points, seed=seed)
        journal.step("reindex:built")
        cfg = dict(ctx.config, index={"dir": new.dirname, "kind": IVFPQ}, ivfpq=params.to_dict())
        try:
            _write_config(ctx.path, cfg)  # the switch
        except BaseException:
            new.close()
            shutil.rmtree(ctx.path / new.dirname, ignore_errors=True)
            raise
        journal.step("reindex:switched")
        ctx.config, ctx.store = cfg, new
        old.close()
        shutil.rmtree(ctx.path / old.dirname, ignore_errors=True)
        with ctx.db.txn() as conn:
            ctx.audit.append(
                conn,
                "reindex",
                requester=requester,
                purpose=None,
                subjects=(),
                detail={"kind": IVFPQ, "nlist": params.nlist, "M": params.M, "vectors": new.ntotal},
            )
            ctx.publish_state(conn, index=new.dirname)
        # erasures waiting for a purge: their vectors were not copied, the old files are gone
        if journal.ops(ctx.db, "erase"):
            self.finish_purges()

    # --- search and access --------------------------------------------------------------------
    @_guarded
    def search(
        self,
        queries: npt.NDArray[np.float32],
        k: int,
        *,
        requester: str,
        purpose: str,
        threshold: float | None = None,
        exact: bool = True,
        nprobe: int | None = None,
        rerank: int | None = None,
    ) -> GalleryMatches:
        """The ``k`` best records per query, with their subjects; audited, purpose-bound.

        Scores are exact cosine similarities (queries are normalised; stored
        vectors are unit rows): a flat gallery scores every vector; an IVF-PQ
        one re-scores its best ``k * rerank`` PQ candidates (default at
        least 100 and ``10 * k``) from the stored vectors. ``exact=False``
        returns the PQ estimates instead (faster; ``threshold`` then refused).
        ``threshold`` (cosine) drops weaker matches. Refuses any ``purpose``
        other than the gallery's (``PermissionError``). Every call appends an
        audit entry: requester, purpose, time, counts and the pseudonyms of
        the subjects returned.
        """
        policy.check_text(requester, "requester", limit=256)
        policy.check_purpose(purpose, self.purpose)
        k = check_k(k)
        t = None if threshold is None else policy.check_threshold(threshold)
        q = policy.queries(queries, "queries", self.d)
        ctx = self._c
        with ctx.mutex:
            self._refresh()
            return access.search(
                ctx, q, k, requester=requester, purpose=purpose, threshold=t, exact=bool(exact),
                nprobe=nprobe, rerank=rerank,
            )  # fmt: skip

    @_guarded
    def export_subject(
        self, subject_id: str, *, requester: str | None = None, dedup_threshold: float = 0.9
    ) -> SubjectExport:
        """Everything held about ``subject_id`` (art. 15): records, vectors, dedup, audit.

        No time window and no quota: every record, and every audit entry that
        names the subject's pseudonym (verified chain). The export itself is
        audited. ``dedup_threshold`` (cosine) links near-duplicate records.
        """
        policy.check_text(subject_id, "subject_id", limit=policy.SUBJECT_LIMIT)
        policy.check_text(requester, "requester", optional=True, limit=256)
        t = policy.check_threshold(dedup_threshold, "dedup_threshold")
        ctx = self._c
        with ctx.mutex:
            self._refresh()
            subj = ctx.find_subject(subject_id)
            if subj is None:
                raise UnknownSubjectError(f"{self.path}: no record of subject {subject_id!r}")
            return access.export(ctx, subj, requester=requester, dedup_threshold=t)

    # --- erasure ------------------------------------------------------------------------------
    @_guarded
    def erase_subject(
        self, subject_id: str, *, requester: str | None = None, purge: bool = True
    ) -> ErasureReceipt:
        """Erase every record of ``subject_id``: invisible and unlinkable at once, then purged.

        With ``purge=False`` the index files are rewritten later
        (:meth:`compact`); the records are invisible, and the subject's
        secret shredded, either way. The receipt says whether the purge is
        done (``purge_status``); see :mod:`fastface.gallery.erasure`.
        """
        policy.check_text(subject_id, "subject_id", limit=policy.SUBJECT_LIMIT)
        policy.check_text(requester, "requester", optional=True, limit=256)
        ctx = self._c
        ctx.require_writable("erasure")
        with ctx.mutex:
            subj = ctx.find_subject(subject_id)
            if subj is None:
                raise UnknownSubjectError(
                    f"{self.path}: no record of subject {subject_id!r}; check the id (erasure "
                    "is idempotent: nothing is held)"
                )
            gids = [int(g[0]) for g in ctx.db.grants_of(subj.sid)]
            ids = np.array([r for r, _ in ctx.db.records_of_grants(gids)], np.int64)
            return erasure.erase(ctx, ids, [subject_id], "erase_subject", requester, purge=purge)

    @_guarded
    def erase_by_face(
        self,
        embedding: npt.NDArray[np.float32],
        threshold: float,
        *,
        whole_subjects: bool = True,
        requester: str | None = None,
    ) -> ErasurePlan:
        """Plan the erasure of the records that match a requester's own photo (exact).

        For requests where the subject's id is unknown: every stored vector
        is compared with ``embedding`` (one or more rows); records scoring at
        least ``threshold`` (cosine) match. The plan lists the matches and
        what would be erased (every record of the matched subjects, or only
        the matched records with ``whole_subjects=False``); pass it to
        :meth:`confirm_erasure`. Making the plan is audited.
        """
        t = policy.check_threshold(threshold)
        policy.check_text(requester, "requester", optional=True, limit=256)
        q = policy.queries(embedding, "embedding", self.d)
        ctx = self._c
        with ctx.mutex:
            self._refresh()
            return access.plan_by_face(
                ctx, q, t, whole_subjects=bool(whole_subjects), requester=requester
            )

    @_guarded
    def confirm_erasure(self, plan: ErasurePlan, *, requester: str | None = None) -> ErasureReceipt:
        """Erase what ``plan`` lists: all of it, or nothing if the gallery changed meanwhile."""
        if not isinstance(plan, ErasurePlan):
            raise TypeError(f"plan: expected an ErasurePlan, got {type(plan).__name__}")
        policy.check_text(requester, "requester", optional=True, limit=256)
        ctx = self._c
        ctx.require_writable("erasure")
        with ctx.mutex:
            if plan.record_ids.size == 0:
                raise UnknownSubjectError(
                    f"{self.path}: the plan matched no record; nothing to erase"
                )
            if len(ctx.db.resolve(plan.record_ids)) != plan.record_ids.size:
                raise RuntimeError(
                    "the gallery changed since this plan was made (some planned records are "
                    "already erased); call erase_by_face again"
                )
            return erasure.erase(
                ctx, plan.record_ids, sorted(plan.subjects), "erase_by_face", requester
            )

    @_guarded
    def purge_expired(self, *, now: dt.datetime | str | None = None) -> ErasureReceipt | None:
        """Erase every record whose retention date is past (``now``: default the clock)."""
        t = policy.now() if now is None else policy.parse_time(now, "now")
        ctx = self._c
        ctx.require_writable("erasure")
        with ctx.mutex:
            rows = ctx.db.conn.execute(
                "SELECT gid FROM grants WHERE retain_until IS NOT NULL AND retain_until < ?",
                (policy.iso(t),),
            ).fetchall()
            if not rows:
                return None
            gids = [int(r[0]) for r in rows]
            subj = ctx.subjects_of_gids(gids)
            ids = np.array([r for r, _ in ctx.db.records_of_grants(gids)], np.int64)
            if ids.size == 0:
                return None
            names = sorted({s.subject_id for s in subj.values()})
            return erasure.erase(ctx, ids, names, "retention", None)

    def _erase_ops(self, *, deferred: bool) -> list[tuple[int, dict[str, Any], Any]]:
        """Pending erase ops; with ``deferred``, deferred ones too, marked to be purged now (so
        that the next open finishes them should this process die)."""
        ctx = self._c
        todo = [
            (op_id, p, ids)
            for op_id, kind, _s, p, ids in journal.ops(ctx.db)
            if kind == "erase" and (deferred or p.get("purge", True))
        ]
        later = [(op_id, p) for op_id, p, _ in todo if not p.get("purge", True)]
        if later:
            with ctx.db.txn() as conn:
                for op_id, p in later:
                    journal.update_op(conn, op_id, "hidden", {"purge": True})
                    p["purge"] = True
        return todo

    @_guarded
    def finish_purges(self) -> list[dict[str, Any]]:
        """Complete every erasure whose purge is pending (deferred ones included).

        Returns what is still pending (e.g. while a reader holds the
        database's write-ahead log), as ``status()["pending_purges"]``.
        """
        ctx = self._c
        ctx.require_writable("purging")
        with ctx.mutex:
            todo = self._erase_ops(deferred=True)
            if todo:
                erasure.finish(ctx, todo, time.perf_counter(), purge=True)
            return list(self.status()["pending_purges"])

    @_guarded
    def compact(self) -> dict[str, int]:
        """Finish pending erasures, fold every removal into the shard files, rewrite the
        database (``VACUUM``) and truncate its log."""
        ctx = self._c
        ctx.require_writable("compaction")
        with ctx.mutex:
            todo = self._erase_ops(deferred=True)
            pending = ctx.store.index.pending_removals
            journal.step("compact:start")
            if todo:
                erasure.finish(ctx, todo, time.perf_counter(), purge=True)
            else:
                ctx.store.purge()
            journal.step("compact:index")
            ctx.db.vacuum(full=True)
            ctx.db.checkpoint()
            left = {op_id for op_id, _k, _s, _p, _i in journal.ops(ctx.db, "erase")}
            done = [p for op_id, p, _ids in todo if op_id not in left]
            return {
                "erasures_completed": len(done),
                "records_purged": sum(int(p["records"]) for p in done),
                "pending_removals_folded": int(pending),
            }

    @_guarded
    def erasure_receipts(self) -> list[dict[str, Any]]:
        """Stored receipts (subjects named by pseudonym), with ``purged_at`` once purged."""
        db = self._c.db
        out = []
        for n, (r, p) in enumerate(db.conn.execute("SELECT receipt, purged_at FROM receipts")):
            try:
                out.append(dict(json.loads(r), stored_purged_at=p))
            except (ValueError, TypeError) as e:
                raise CorruptGalleryError(
                    f"{db.path}: stored receipt {n} is damaged", db.where, f"receipts[{n}]"
                ) from e
        return out

    # --- audit --------------------------------------------------------------------------------
    def audit_head(self) -> dict[str, Any]:
        """``{"seq", "mac"}`` of the last audit entry: publish it to detect truncation later."""
        return self._c.audit.head()

    @_guarded
    def audit_log(
        self,
        since: dt.datetime | str | None = None,
        *,
        anchors: Sequence[dict[str, Any]] = (),
    ) -> list[dict[str, Any]]:
        """The audit entries (at or after ``since``), after verifying the keyed chain.

        Every entry from the first to the head is checked, and so is every
        anchor given (heads published earlier, ``receipt.audit_head``), plus
        the heads of the stored receipts; raises
        :class:`~fastface.errors.AuditChainError` for an edited, inserted or
        removed entry.
        """
        cutoff = None if since is None else policy.iso(policy.parse_time(since, "since"))
        ctx = self._c
        with ctx.mutex:
            stored = [r["audit_head"] for r in self.erasure_receipts()]
            return ctx.audit.verify(since=cutoff, anchors=[*anchors, *stored])

    @_guarded
    def verify_receipt(self, receipt: ErasureReceipt | dict[str, Any]) -> dict[str, Any]:
        """Check that ``receipt`` was issued by this gallery and its audit head is still there.

        Raises ``ValueError`` for a receipt that was altered or issued by
        another gallery, :class:`~fastface.errors.AuditChainError` when the
        audit log no longer holds the receipt's head (truncated or
        rewritten). Returns ``{"valid": True, "purged_at": ...}``.
        """
        body = receipt.to_dict() if isinstance(receipt, ErasureReceipt) else dict(receipt)
        digest = str(body.pop("digest", ""))
        body["subject_ids"] = sorted(body.get("subject_ids", []))
        ctx = self._c
        if not hmac.compare_digest(digest, erasure.receipt_digest(ctx, body)):
            raise ValueError("receipt: its digest does not match; it was altered, or another "
                             "gallery (another key) issued it")  # fmt: skip
        with ctx.mutex:
            row = ctx.db.conn.execute(
                "SELECT purged_at FROM receipts WHERE digest=?", (digest,)
            ).fetchone()
            if row is None:
                raise ValueError(f"{self.path}: no stored receipt has this digest; it was removed")
            ctx.audit.verify(anchors=[body["audit_head"]])
        return {"valid": True, "purged_at": row[0] or body.get("purged_at")}

    @_guarded
    def verify(self) -> dict[str, Any]:
        """Check everything: SQLite integrity, every row's keyed check, every secret, the audit
        chain with the receipts' anchors, index against records. Raises on damage."""
        ctx = self._c
        with ctx.mutex:
            self._refresh()
            ctx.db.integrity()
            conn = ctx.db.conn
            n_rec = 0
            cur = conn.execute("SELECT id, gid, chk FROM records")
            while batch := cur.fetchmany(50_000):
                ctx.db.verify_records(batch)
                n_rec += len(batch)
            grants = conn.execute("SELECT gid FROM grants").fetchall()
            subj = ctx.subjects_of_gids([int(g[0]) for g in grants])
            for g in ctx.db.grants_by_gid([int(g[0]) for g in grants]).values():
                s = subj[int(g[0])]
                ctx.decrypt_field(s, int(g[0]), "consent_ref", g[3])
                ctx.decrypt_field(s, int(g[0]), "source", g[4])
            n_subj = len(self.subjects())
            entries = len(self.audit_log())
            records = ctx.db.all_record_ids()
            live = np.sort(ctx.store.live_ids())
            return {
                "records": n_rec,
                "grants": len(grants),
                "subjects": n_subj,
                "audit_entries": entries,
                "vectors_without_record": int(np.setdiff1d(live, records).size),
                "records_without_vector": int(np.setdiff1d(records, live).size),
            }

    # --- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Finish what can be finished (a pending WAL truncation), close the files, unlock."""
        ctx = self._ctx
        if ctx is None:
            return
        with ctx.mutex:
            if ctx.writable:
                with contextlib.suppress(Exception):
                    todo = self._erase_ops(deferred=False)  # blocked or failed purges
                    if todo:
                        erasure.finish(ctx, todo, time.perf_counter(), purge=True)
                with contextlib.suppress(Exception):
                    ctx.db.checkpoint()
            ctx.store.close()
            ctx.db.close()
            ctx.secrets.close()
            ctx.forget()
            self._ctx = None
            if self._lock is not None:
                self._lock.release()
                self._lock = None

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


def _check_params(params: Any, d: int, store_vectors: str) -> IVFPQParams | None:
    if params is None:
        return None
    if not isinstance(params, IVFPQParams):
        raise TypeError(f"params: expected IVFPQParams or None, got {type(params).__name__}")
    if params.d != d:
        raise ValueError(f"d={d} does not match params.d={params.d}; they must be equal")
    if params.metric != "ip":
        raise ValueError(
            "params: a gallery scores by cosine similarity (inner product of unit vectors); "
            "use metric='ip'"
        )
    return dataclasses.replace(params, store_vectors=store_vectors)  # type: ignore[arg-type]
