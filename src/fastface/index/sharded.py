"""A directory of IVF-PQ shards that share one trained codec.

Layout of a directory::

    manifest.json                     what is committed: parameters, shards, files, checksums
    codec-g000001.faiss               the trained codec (a FAISS index without vectors)
    shard-000000-g000003.faiss        shard 0's codes and ids (a FAISS IVF-PQ file)
    shard-000000-g000003.npy          its ids in row order
    shard-000000-g000003.f16.npy      its raw vectors in row order (store_vectors)
    tombstones-g000007.npy            removed ids still inside sealed shard files
    .lock                             the writer's lock (flock)

File names carry the generation that wrote them and a file is never
rewritten: a change writes new files, then a new manifest (atomically).

The manifest defends itself. It carries the SHA-256 of its own canonical
JSON, checked before any field is read; then every field is type- and
range-checked, file names must be plain names of the kinds this index
writes (never ``..`` or a path), every file's size and SHA-256 must match,
and each shard file's FAISS header is checked against the manifest before
anything parses the rest. Any damage raises
:class:`~fastface.errors.CorruptIndexError` naming the file and the field.
Opening never deletes a file unless the manifest verified.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .._native import merge_topk
from .._validation import as_id_array, as_ids, as_queries, as_vectors, check_k, check_positive_int
from ..errors import CorruptIndexError, EmptyIndexError, NotTrainedError, ReadOnlyIndexError
from . import lists, storage
from .ivfpq import (
    IdSet,
    IVFPQIndex,
    check_assignment,
    check_nprobe,
    check_rerank,
    check_unique_ids,
    consecutive_ids,
    load_shard,
    read_codec,
    sorted_unique,
    train_codec,
)
from .lists import ListRun
from .params import (
    STORE_DTYPES,
    Codec,
    CodecParams,
    FlatParams,
    IVFPQParams,
    params_from_dict,
    parse_spec,
)
from .vectors import check_storable

__all__ = ["ShardedIndex"]

log = logging.getLogger("fastface")

FORMAT = "fastface.sharded"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
LOCK = ".lock"
_G = r"-g\d{6,12}"
_NAMES = {
    "codec": re.compile(rf"^codec{_G}\.faiss$"),
    "index": re.compile(rf"^shard-\d{{6,12}}{_G}\.faiss$"),
    "ids": re.compile(rf"^shard-\d{{6,12}}{_G}\.npy$"),
    "vectors": re.compile(rf"^shard-\d{{6,12}}{_G}\.f(16|32)\.npy$"),
    "tombstones": re.compile(rf"^tombstones{_G}\.npy$"),
}
_OWNED = re.compile(rf"^(codec|shard-\d{{6,12}}|tombstones){_G}\.(faiss|npy|f16\.npy|f32\.npy)$")
_VEC_SUFFIX = {"float16": "f16.npy", "float32": "f32.npy"}
_MANIFEST_KEYS = {
    "format",
    "format_version",
    "generation",
    "params",
    "shard_size",
    "codec",
    "shards",
    "tombstones",
    "ntotal",
    "next_id",
    "build",
    "spec",
}
_OPEN_RETRIES = 50
_MAX_PACKS = 4
#: Where :meth:`ShardedIndex.stage_shard` writes shards for :meth:`ShardedIndex.adopt`.
STAGING = ".staging"
STAGED_FORMAT = "fastface.staged-shard"
_STAGED = {
    "record": re.compile(r"^shard-\d{6,12}\.json$"),
    "index": re.compile(r"^shard-\d{6,12}\.faiss$"),
    "ids": re.compile(r"^shard-\d{6,12}\.npy$"),
    "vectors": re.compile(r"^shard-\d{6,12}\.f(16|32)\.npy$"),
}


@dataclass(frozen=True)
class _Shard:
    number: int
    sealed: bool
    index: IVFPQIndex  # a read-only view; changes go through index.copy()
    files: dict[str, storage.FileRecord] | None  # None: this content is not on disk yet


@dataclass(frozen=True)
class _Pack:
    """Sealed shards' lists merged into one run (in-memory 8-bit indexes)."""

    run: ListRun
    numbers: frozenset[int]


@dataclass(frozen=True)
class _State:
    """Everything a search or a commit needs; never changed once published."""

    generation: int  # the manifest generation this state was loaded from or last committed as
    codec: Codec | None
    codec_rec: storage.FileRecord | None
    shards: tuple[_Shard, ...]
    tombstones: IdSet
    tomb_rec: storage.FileRecord | None
    build: dict[str, Any] | None
    next_id: int
    packs: tuple[_Pack, ...] = ()
    dirty: bool = False

    @property
    def runs(self) -> list[ListRun]:
        """The lists to scan for a one-pass search: packs, then unpacked shards' runs."""
        packed = set().union(*(p.numbers for p in self.packs)) if self.packs else set()
        out = [p.run for p in self.packs]
        for s in self.shards:
            if s.number not in packed:
                out.extend(s.index.list_runs)
        return out


def _fail(path: Path, field: str, why: str) -> CorruptIndexError:
    return CorruptIndexError(f"{path}: manifest field {field}: {why}", str(path), field)


def _int(value: Any, path: Path, field: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, field, f"expected an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise _fail(path, field, f"{value} is outside {lo}..{hi}")
    return value


def _record(value: Any, path: Path, field: str, kind: str) -> storage.FileRecord:
    try:
        return storage.check_record(value, field, _NAMES[kind])
    except ValueError as e:
        raise _fail(path, field, str(e)) from e


@dataclass(frozen=True)
class _Manifest:
    """A manifest whose every field has been checked."""

    generation: int
    params: CodecParams
    shard_size: int
    codec: storage.FileRecord | None
    shards: list[tuple[int, bool, int, dict[str, storage.FileRecord]]]
    tombstones: storage.FileRecord | None
    ntotal: int
    next_id: int | None
    build: dict[str, Any] | None
    sealed: bool  # carried a checksum that verified (format 2); format 1 had none


def _shard_file_kinds(params: CodecParams) -> set[str]:
    """The files a shard has: its FAISS lists (none for a flat shard, whose vectors are its
    data), its ids in row order, and its raw vectors when the index stores them."""
    return ({"ids"} if params.kind == "flat" else {"index", "ids"}) | (
        {"vectors"} if params.store_vectors else set()
    )


def _check_manifest(man: dict[str, Any], path: Path) -> _Manifest:
    unknown = set(man) - _MANIFEST_KEYS - {"checksum"}
    if unknown:
        raise _fail(path, sorted(unknown)[0], "unknown field")
    for key in _MANIFEST_KEYS - {"next_id", "spec"}:
        if key not in man:
            raise _fail(path, key, "missing")
    generation = _int(man["generation"], path, "generation", 1)
    try:
        params = params_from_dict(man["params"])
    except (TypeError, ValueError) as e:
        raise _fail(path, "params", str(e)) from e
    if "spec" in man and man["spec"] != params.spec:
        raise _fail(path, "spec", f"{man['spec']!r} does not name the params ({params.spec!r})")
    shard_size = _int(man["shard_size"], path, "shard_size", 1, 2**40)
    codec = None if man["codec"] is None else _record(man["codec"], path, "codec", "codec")
    if not isinstance(man["shards"], list):
        raise _fail(path, "shards", "expected a list")
    shards = []
    last = -1
    for i, entry in enumerate(man["shards"]):
        f = f"shards[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"number", "sealed", "count", "files"}:
            raise _fail(path, f, "expected number, sealed, count and files")
        number = _int(entry["number"], path, f"{f}.number", last + 1, 10**12 - 1)
        last = number
        if not isinstance(entry["sealed"], bool):
            raise _fail(path, f"{f}.sealed", "expected true or false")
        count = _int(entry["count"], path, f"{f}.count", 0, shard_size)
        files = entry["files"]
        want = _shard_file_kinds(params)
        if not isinstance(files, dict) or set(files) != want:
            raise _fail(path, f"{f}.files", f"expected the files {sorted(want)}")
        recs = {k: _record(files[k], path, f"{f}.files.{k}", k) for k in sorted(want)}
        if not entry["sealed"] and i != len(man["shards"]) - 1:
            raise _fail(path, f"{f}.sealed", "only the last shard may be open")
        shards.append((number, entry["sealed"], count, recs))
    if shards and codec is None:
        raise _fail(path, "codec", "shards without a trained codec")
    tomb = None
    if man["tombstones"] is not None:
        tomb = _record(man["tombstones"], path, "tombstones", "tombstones")
    ntotal = _int(man["ntotal"], path, "ntotal")
    # 2**63 means every id has been used
    next_id = None if "next_id" not in man else _int(man["next_id"], path, "next_id", 0, 2**63)
    build = man["build"]
    if build is not None and not isinstance(build, dict):
        raise _fail(path, "build", "expected an object or null")
    sealed = man["format_version"] >= 2
    return _Manifest(
        generation, params, shard_size, codec, shards, tomb, ntotal, next_id, build, sealed
    )


class ShardedIndex:
    """IVF-PQ split into shards on disk, with one codec, tombstones and compaction.

    Create with :meth:`create` (then :meth:`train`, :meth:`add`) or
    :meth:`build` (streams a vector file), reopen with :meth:`open`. Shards are
    sealed at ``shard_size`` vectors and never rewritten in place; ``add`` fills
    the open shard; ``remove`` makes vectors unsearchable at once (tombstones,
    skipped inside the scan) and :meth:`compact` rewrites the affected shards
    without them. Every change is committed by writing new files, then the
    manifest, atomically.

    Search
        8-bit codes are searched in one pass over every shard's lists, in
        place: one coarse assignment and one look-up table per query; the
        sealed shards' lists of an in-memory index are merged once into one
        run when they seal (or at :meth:`open`), so four shards cost what one
        does. ``strategy="fanout"`` scans shard by shard and merges the
        per-shard top-k (:func:`fastface._native.merge_topk`); both give the
        same bits (equal scores by lower id). 4-bit fast-scan shards are
        scanned by FAISS and merged.

    Readers and writers
        One process writes (``mode="a"`` holds the directory's ``flock``);
        any number of processes read (``mode="r"``, the default). A reader
        opening during a commit always loads one consistent generation: the
        writer keeps the files of the previous generation until the next
        commit (deleting one generation late), and a reader that still finds
        a file gone (it was two commits behind) re-reads the manifest and
        retries. A reader loads everything it needs at open (memory-mapped
        files stay valid after the writer unlinks them), so it never notices
        later commits; reopen to see them.

    Threads
        One ``ShardedIndex`` may be shared by threads: any number search in
        parallel while one writes. A write builds a new state (sharing
        every unchanged buffer) and publishes it when it has been committed;
        a search works on the state it found when it started, so it never
        waits and never sees a half-done change. Writes are serialised.

    Failures
        A write that raises (bad input, :class:`~fastface.errors.DiskFullError`,
        anything) changes nothing, in memory or on disk: files written for a
        failed commit are deleted and the previous state stays published.
        ``add(..., commit=False)`` publishes at once in memory; :meth:`flush`
        commits.

    Files
        Owner-only by default (directory ``0o700``, files ``0o600``), set on
        the descriptor when each file is created, never through the umask;
        ``create(..., file_mode=0o640)`` chooses otherwise (the directory
        gets the matching execute bits) and later commits keep that choice.

    Examples
    --------
    >>> import tempfile
    >>> from fastface import IVFPQParams, ShardedIndex
    >>> from fastface.datasets import SyntheticFaces
    >>> xb, _ = SyntheticFaces(n_identities=300, per_identity=10, d=32, seed=1).vectors()
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     params = IVFPQParams(32, 16, 8)
    ...     with ShardedIndex.create(tmp + "/idx", params, shard_size=1000) as index:
    ...         index.train(xb)
    ...         _ = index.add(xb)
    ...         D, I = index.search(xb[:3], 4, nprobe=16)
    ...         print(index.nshards, index.ntotal, D.shape)
    3 3000 (3, 4)
    """

    def __init__(
        self,
        path: Path,
        params: CodecParams,
        shard_size: int,
        *,
        writable: bool,
        mmap: bool = False,
        file_mode: int = 0o600,
    ) -> None:
        self.path = Path(path)
        self.params: CodecParams = params
        self.shard_size = shard_size
        self._writable = writable
        self._mmap = mmap
        self._file_mode = file_mode
        self._lock: storage.WriterLock | None = None
        self._write_lock = threading.RLock()
        self._prev_files: set[str] = set()
        self._sealed_manifest = True
        # a build never searches: sealed shards stay memory-mapped instead of packed in memory
        self._build_mode = False
        self._state = _State(0, None, None, (), IdSet(()), None, None, 0)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        params: CodecParams | Codec | str,
        *,
        d: int | None = None,
        metric: Literal["ip", "l2"] = "ip",
        shard_size: int = 1_000_000,
        file_mode: int = 0o600,
    ) -> ShardedIndex:
        """Create an empty index directory.

        ``params`` is an index spec such as ``"IVF4096,PQ32,F16"`` (with ``d``
        and ``metric``; see :mod:`fastface.index.params`), an
        :class:`IVFPQParams` (then :meth:`train`), a
        :class:`~fastface.index.params.FlatParams` (exact search, no training),
        or a trained :class:`~fastface.index.params.Codec` (e.g. another
        index's :attr:`codec`: both then encode alike). The directory must not exist,
        be empty, or hold only what an interrupted ``create`` left (a lock
        file, temporary files). Files are created with ``file_mode``
        (owner-only ``0o600`` by default).
        """
        codec, params = _resolve_params(params, d, metric)
        shard_size = check_positive_int(shard_size, "shard_size")
        if (
            isinstance(file_mode, bool)
            or not isinstance(file_mode, int)
            or not (0o400 <= file_mode <= 0o666 and file_mode & 0o600 == 0o600)
        ):
            raise ValueError(
                f"file_mode: expected permission bits that let the owner read and write "
                f"(e.g. 0o600, 0o640), got {file_mode!r}"
            )
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path}: exists and is not a directory")
        if path.is_dir() and _foreign(path):
            raise FileExistsError(
                f"{path}: exists and is not empty; open the index there or pick a new directory"
            )
        dir_mode = file_mode | ((file_mode & 0o444) >> 2)
        storage.make_dir(path, dir_mode)
        if codec is None and isinstance(params, FlatParams):
            codec = Codec.flat(params)  # nothing to train
        obj = cls(path, params, shard_size, writable=True, file_mode=file_mode)
        obj._acquire_lock()
        try:
            if _foreign(path):  # someone else created it meanwhile
                raise FileExistsError(f"{path}: was created by another process meanwhile")
            for p in path.iterdir():  # what an interrupted create left
                if storage.is_tmp_name(p.name):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
            obj._commit_state(replace(obj._state, codec=codec))
        except BaseException:
            obj.close()
            raise
        return obj

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        mode: Literal["r", "a"] = "r",
        mmap: bool = False,
        shards: Iterable[int] | None = None,
    ) -> ShardedIndex:
        """Open an index directory, verifying the manifest and every file before using it.

        ``mode="r"`` reads (any number of processes); ``mode="a"`` also
        allows changes and takes the directory's writer lock. ``mmap=True``
        leaves codes and vectors in the files (read mode only): opening is
        fast and memory stays low; searches read the pages they need.

        ``shards`` (read mode only) opens a part of the index: the codec and
        only the shards with these numbers (see :meth:`inspect`), verifying
        only their files; the tombstones of other shards are left out. A
        search of the part gives that part's results: merging the parts'
        results (:func:`fastface._native.merge_topk`) gives the whole index's
        (what :class:`fastface.distributed.RayShardedIndex` does). ``()``
        opens the codec alone (e.g. for :meth:`assign`).
        """
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        if mmap and mode == "a":
            raise ValueError("mmap=True is read-only; open with mode='r'")
        only: frozenset[int] | None = None
        if shards is not None:
            if mode != "r":
                raise ValueError("shards=: a part of an index opens read-only; use mode='r'")
            if isinstance(shards, (str, bytes)) or not isinstance(shards, Iterable):
                raise TypeError(
                    f"shards: expected shard numbers (an iterable of ints), got "
                    f"{type(shards).__name__}"
                )
            nums = list(shards)
            for n in nums:
                if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
                    raise TypeError(f"shards: expected shard numbers >= 0, got {n!r}")
            only = frozenset(int(n) for n in nums)
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such index directory")
        if mode == "a":
            lock = storage.WriterLock(path)
            lock.acquire()
            try:
                obj = cls._load(path, writable=True, mmap=False)
                obj._lock = lock
                obj._prev_files = obj._referenced(obj._state)
                if obj._sealed_manifest:  # only a verified manifest may delete leftovers
                    obj._remove_unreferenced(obj._state)
            except BaseException:
                lock.release()
                raise
            return obj
        for attempt in range(_OPEN_RETRIES):
            try:
                return cls._load(path, writable=False, mmap=mmap, only=only)
            except _Vanished as gone:
                # a file listed in the manifest went away: a writer committed meanwhile?
                if _generation(path) == gone.generation and attempt > 0:
                    raise CorruptIndexError(
                        f"{gone.path}: listed in the manifest but missing; restore it from a "
                        "backup",
                        gone.path,
                        "file",
                    ) from None
        raise CorruptIndexError(  # pragma: no cover - a writer committing non-stop
            f"{path}: the manifest kept changing while opening; try again", str(path)
        )

    @classmethod
    def inspect(cls, path: str | os.PathLike[str]) -> dict[str, Any]:
        """What an index directory's manifest says, without opening its shard files.

        The manifest's seal and every field are checked as :meth:`open`
        checks them; the files themselves are not read. Returns a dict:
        ``generation``, ``params`` (:class:`IVFPQParams` or
        :class:`FlatParams`), ``shard_size``, ``ntotal`` (searchable
        vectors), ``pending_removals``, ``next_id``, ``build`` and
        ``shards``, one dict per shard in number order with
        ``number``, ``sealed``, ``count`` (vectors in its files) and ``bytes``
        (its files' sizes on disk).
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such index directory")
        man_path = path / MANIFEST
        man = _check_manifest(
            storage.read_manifest(man_path, kind=FORMAT, max_version=FORMAT_VERSION), man_path
        )
        shards = [
            {
                "number": number,
                "sealed": sealed,
                "count": count,
                "bytes": sum(rec["bytes"] for rec in recs.values()),
            }
            for number, sealed, count, recs in man.shards
        ]
        return {
            "generation": man.generation,
            "params": man.params,
            "shard_size": man.shard_size,
            "ntotal": man.ntotal,
            "pending_removals": sum(x["count"] for x in shards) - man.ntotal,
            "next_id": man.next_id,
            "build": man.build,
            "shards": shards,
        }

    @classmethod
    def _load(
        cls,
        path: Path,
        *,
        writable: bool,
        mmap: bool,
        build: bool = False,
        only: frozenset[int] | None = None,
    ) -> ShardedIndex:
        man_path = path / MANIFEST
        raw = storage.read_manifest(man_path, kind=FORMAT, max_version=FORMAT_VERSION)
        man = _check_manifest(raw, man_path)
        if only is not None:
            absent = sorted(only - {number for number, _, _, _ in man.shards})
            if absent:
                raise ValueError(
                    f"{path}: no shard {absent[0]} in generation {man.generation} (it holds "
                    f"{[number for number, _, _, _ in man.shards]}); see ShardedIndex.inspect"
                )
        file_mode = storage.dir_file_mode(path) | 0o600
        with contextlib.suppress(FileNotFoundError):
            file_mode = os.stat(man_path).st_mode & 0o666
        obj = cls(
            path, man.params, man.shard_size, writable=writable, mmap=mmap, file_mode=file_mode
        )
        obj._build_mode = build
        obj._state = obj._load_state(man, man_path, only)
        obj._sealed_manifest = man.sealed
        return obj

    @staticmethod
    @contextlib.contextmanager
    def _entry(where: str) -> Iterator[None]:
        """Name the manifest entry in a file's error: ``shards[2].files.index.d``."""
        try:
            yield
        except CorruptIndexError as e:
            e.field = f"{where}.{e.field}" if e.field else where
            raise

    def _open_file(
        self, rec: storage.FileRecord, generation: int, *, in_memory: bool = False
    ) -> storage.VerifiedFile:
        try:
            return storage.open_verified(self.path, rec, in_memory=in_memory)
        except FileNotFoundError:
            raise _Vanished(str(self.path / rec["file"]), generation) from None

    def _load_state(
        self, man: _Manifest, man_path: Path, only: frozenset[int] | None = None
    ) -> _State:
        p = man.params
        g = man.generation
        codec = None
        if man.codec is not None:
            with self._entry("codec"):
                codec = read_codec(p, self._open_file(man.codec, g, in_memory=True))
        shards: list[_Shard] = []
        next_id = 0
        for i, (number, sealed, count, recs) in enumerate(man.shards):
            if only is not None and number not in only:
                continue
            with self._entry(f"shards[{i}].files"):
                assert codec is not None
                index = self._shard_from_files(
                    codec,
                    recs,
                    count,
                    sealed,
                    lambda rec, mem: self._open_file(rec, g, in_memory=mem),
                )
            if count:
                next_id = max(next_id, int(index.ids.max()) + 1)
            shards.append(_Shard(number, sealed, index, recs))
        tomb = IdSet(())
        if man.tombstones is not None:
            with self._entry("tombstones"):
                vf = self._open_file(man.tombstones, g, in_memory=True)
                arr = storage.npy_array(vf, np.int64, (None,), mmap=False)
            if arr.size and ((np.diff(arr) <= 0).any() or int(arr[0]) < 0):
                raise CorruptIndexError(
                    f"{vf.path}: tombstones must be sorted, unique ids", vf.path, "tombstones"
                )
            held = np.zeros(arr.size, bool)
            for s in shards:
                if s.sealed:
                    held |= s.index.rows_of(arr) >= 0
            if only is not None:  # a part: the tombstones of its own shards
                if arr.size:
                    next_id = max(next_id, int(arr[-1]) + 1)
                arr = arr[held]
                held = held[held]
            if not held.all():
                raise CorruptIndexError(
                    f"{vf.path}: tombstone {int(arr[~held][0])} is in no sealed shard",
                    vf.path,
                    "tombstones",
                )
            tomb = IdSet(arr)
            if arr.size:
                next_id = max(next_id, int(arr[-1]) + 1)
        stored = sum(s.index.ntotal for s in shards)
        if only is None and man.ntotal != stored - len(tomb):
            raise _fail(man_path, "ntotal", f"{man.ntotal}, the files hold {stored - len(tomb)}")
        if man.next_id is not None:
            if man.next_id < next_id:
                raise _fail(
                    man_path, "next_id", f"{man.next_id} is below a stored id {next_id - 1}"
                )
            next_id = man.next_id
        state = _State(g, codec, man.codec, tuple(shards), tomb, man.tombstones, man.build, next_id)
        return self._with_packs(state, rebuild=True)

    def _shard_from_files(
        self,
        codec: Codec,
        recs: Mapping[str, storage.FileRecord],
        count: int,
        sealed: bool,
        open_file: Callable[[storage.FileRecord, bool], storage.VerifiedFile],
    ) -> IVFPQIndex:
        """One shard from its verified files, the same way for opening and for adopting.

        ``open_file(record, in_memory)`` verifies and opens one file. Ids are
        read into memory; raw vectors stay mapped, advised for random reads
        (re-ranking reads scattered rows).
        """
        p = self.params
        ids_vf = open_file(recs["ids"], True)
        ids = storage.npy_array(ids_vf, np.int64, (count,), mmap=False)
        vectors = None
        if p.store_vectors is not None:
            vec_vf = open_file(recs["vectors"], False)
            vec_vf.advise_random()
            vectors = storage.npy_array(vec_vf, STORE_DTYPES[p.store_vectors], (count, p.d))
        if isinstance(p, FlatParams):
            check_unique_ids(ids, ids_vf.path)
            return IVFPQIndex.from_parts(codec, ids, vectors=vectors, read_only=True)
        # hashed, then mapped: in memory, sealed shards' lists are packed from the mappings
        # (see _with_packs) and the open shard's copied, one copy each, the files' pages
        # never held all at once; 4-bit: FAISS copies the lists
        data = open_file(recs["index"], False)
        index = load_shard(p, codec, data, vectors, ntotal=count, ids=ids, read_only=True)
        return self._own_lists(index, sealed)

    def _own_lists(self, index: IVFPQIndex, sealed: bool) -> IVFPQIndex:
        """The open shard of an in-memory 8-bit index with its lists copied out of the
        file's mapping into one run (sealed shards join a pack instead; memory-mapped
        indexes and 4-bit codes keep what ``load_shard`` gave)."""
        p = self.params
        if self._mmap or sealed or p.nbits != 8:
            return index
        return IVFPQIndex.from_parts(
            index.codec,
            index.ids,
            runs=(lists.concat(index.list_runs, p.nlist, p.code_size),),
            vectors=index.vectors,
            read_only=True,
        )

    def _acquire_lock(self) -> None:
        self._lock = storage.WriterLock(self.path, mode=self._file_mode)
        self._lock.acquire()

    # --- state --------------------------------------------------------------------------------
    @property
    def d(self) -> int:
        return self.params.d

    @property
    def ntotal(self) -> int:
        """Number of searchable vectors (removed ones excluded)."""
        st = self._state
        return sum(s.index.ntotal for s in st.shards) - len(st.tombstones)

    @property
    def is_trained(self) -> bool:
        return self._state.codec is not None

    @property
    def codec(self) -> Codec:
        """The trained codec every shard shares (read-only)."""
        codec = self._state.codec
        if codec is None:
            raise NotTrainedError(f"{self.path}: not trained; call train(x) first")
        return codec

    @property
    def generation(self) -> int:
        """Generation of the last commit this index loaded or wrote (one more per commit)."""
        return self._state.generation

    @property
    def read_only(self) -> bool:
        return not self._writable

    @property
    def nshards(self) -> int:
        return len(self._state.shards)

    @property
    def shard_counts(self) -> list[int]:
        """Vectors held per shard, removed-but-uncompacted ones included."""
        return [s.index.ntotal for s in self._state.shards]

    @property
    def shard_numbers(self) -> list[int]:
        """Number of each shard held (all of them, or those asked for with ``open(shards=)``)."""
        return [s.number for s in self._state.shards]

    @property
    def pending_removals(self) -> int:
        """Removed vectors still present in sealed shard files (folded in by :meth:`compact`)."""
        return len(self._state.tombstones)

    @property
    def tombstones(self) -> npt.NDArray[np.int64]:
        """Ids removed but still inside sealed shard files, ascending (read-only)."""
        return self._state.tombstones.array

    @property
    def build_state(self) -> dict[str, Any] | None:
        b = self._state.build
        return None if b is None else dict(b)

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        p = self.params
        return (
            f"ShardedIndex({str(self.path)!r}, {p.spec!r}, d={p.d}, metric={p.metric!r}, "
            f"nshards={self.nshards}, ntotal={self.ntotal})"
        )

    def shards(self) -> Iterator[IVFPQIndex]:
        """The shards, in order, as read-only indexes (removed vectors may still be inside)."""
        for s in self._state.shards:
            yield s.index

    def contains(self, ids: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Which of ``ids`` (integers) are searchable in this index."""
        st = self._state
        arr = np.asarray(ids)
        return self._live(st, as_id_array(arr)).reshape(arr.shape)

    def stored(self, ids: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Which of ``ids`` some shard file holds, removed-but-uncompacted ones included."""
        arr = np.asarray(ids)
        return _stored(self._state, as_id_array(arr)).reshape(arr.shape)

    def live_ids(self) -> npt.NDArray[np.int64]:
        """Ids of every searchable vector, shard by shard in row order."""
        parts = [s.ids[rows] for s, rows in self.live_rows()]
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def live_rows(self) -> Iterator[tuple[IVFPQIndex, npt.NDArray[np.int64]]]:
        """Each non-empty shard with the rows of its searchable (not removed) vectors."""
        st = self._state
        for s in st.shards:
            n = s.index.ntotal
            if n == 0:
                continue
            rows = np.arange(n, dtype=np.int64)
            if len(st.tombstones):
                rows = rows[~st.tombstones.contains(s.index.ids)]
            if rows.size:
                yield s.index, rows

    def get_vectors(self, ids: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Stored raw vectors of searchable ``ids`` as float32.

        Unknown or removed ids raise ``KeyError``.
        """
        st = self._state
        if self.params.store_vectors is None:
            raise ValueError("get_vectors: this index keeps no raw vectors (store_vectors=None)")
        flat = as_id_array(ids)
        out = np.empty((flat.size, self.d), np.float32)
        found = np.zeros(flat.size, bool)
        for s in st.shards:
            rows = s.index.rows_of(flat)
            hit = rows >= 0
            if hit.any():
                vec = s.index.vectors
                assert vec is not None
                out[hit] = vec[rows[hit]]
                found |= hit
        if len(st.tombstones):
            found &= ~st.tombstones.contains(flat)
        if not found.all():
            raise KeyError(f"ids not searchable in {self.path}, e.g. {int(flat[~found][0])}")
        return out

    def excluding(self, ids: npt.ArrayLike) -> ShardedIndex:
        """A read-only view of this index in which ``ids`` are removed too, in memory only.

        Nothing is written and nothing is copied: the view shares every shard
        with this index, with the removed ids skipped by every search, by
        ``ntotal``, ``contains``, ``live_ids`` and ``get_vectors``, as after
        :meth:`remove`. A process serving an index (or a part of it) uses
        this to apply removals that the writer has committed, without
        reopening. Ids not held here are ignored.
        """
        st = self._state
        arr = sorted_unique(as_id_array(ids))
        arr = arr[_stored(st, arr)]
        obj = ShardedIndex(
            self.path,
            self.params,
            self.shard_size,
            writable=False,
            mmap=self._mmap,
            file_mode=self._file_mode,
        )
        if arr.size:
            tomb = IdSet(np.concatenate([st.tombstones.array, arr]))
            obj._state = replace(st, tombstones=tomb, tomb_rec=None)
        else:
            obj._state = st
        return obj

    def _check_writable(self) -> None:
        if not self._writable:
            raise ReadOnlyIndexError(
                f"{self.path}: opened read-only; use ShardedIndex.open(path, mode='a') to change it"
            )
        if self._lock is None:
            raise ReadOnlyIndexError(f"{self.path}: closed; open it again to change it")

    # --- train / add --------------------------------------------------------------------------
    def train(
        self,
        x: npt.NDArray[np.float32],
        *,
        max_points: int | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        """Train the shared codec on a sample of ``x`` (see :meth:`IVFPQIndex.train`); commits.

        Training stages are logged (``logging.getLogger("fastface")``);
        ``progress=True`` shows a bar.
        """
        self._check_writable()
        if self.params.kind == "flat":  # nothing to learn: check x and accept, as FAISS does
            as_vectors(x[:1024] if isinstance(x, np.ndarray) else x, "x", d=self.params.d)
            return
        with self._write_lock:
            st = self._state
            if st.codec is not None:
                raise RuntimeError(
                    f"{self.path}: already trained; create a new index to retrain (or reencode())"
                )
            codec = train_codec(self.params, x, max_points=max_points, seed=seed, progress=progress)
            self._commit_state(replace(st, codec=codec, codec_rec=None, dirty=True))

    def add(
        self,
        x: npt.NDArray[np.float32],
        ids: npt.ArrayLike | None = None,
        *,
        batch_size: int = 65536,
        commit: bool = True,
    ) -> npt.NDArray[np.int64]:
        """Add vectors to the open shard, sealing shards as they reach ``shard_size``.

        ``x`` is 2-D float16/32/64 (cast to float32). Ids default to
        consecutive values after the largest ever used; given ids must be new
        (not stored, not removed-but-uncompacted). With ``commit=True``
        (default) the change is on disk when this returns; nothing changes if
        this raises.
        """
        self._check_writable()
        x = as_vectors(x, "x", d=self.d, allow_empty=True)
        check_storable(x, self.params.store_vectors)
        batch_size = check_positive_int(batch_size, "batch_size")
        with self._write_lock:
            st = self._state
            if st.codec is None:
                raise NotTrainedError(f"{self.path}: not trained; call train(x) before add(x)")
            n = x.shape[0]
            if ids is None:
                id_arr = consecutive_ids(st.next_id, n)
            else:
                id_arr = as_ids(ids, n)
                taken = _stored(st, id_arr)
                if taken.any():
                    pending = st.tombstones.contains(id_arr[taken])
                    hint = (
                        "it was removed and awaits compact()"
                        if pending.any()
                        else "remove it first or pass new ids"
                    )
                    raise ValueError(
                        f"ids: {int(taken.sum())} id(s) already in the index, e.g. "
                        f"{int(id_arr[taken][0])}; {hint}"
                    )
            new = self._added(st, x, id_arr, batch_size)
            if commit:
                self._commit_state(new)
            else:
                self._state = new
        return id_arr

    def _added(
        self, st: _State, x: npt.NDArray[np.float32], ids: npt.NDArray[np.int64], batch_size: int
    ) -> _State:
        assert st.codec is not None
        n = x.shape[0]
        if n == 0:
            return st
        shards = list(st.shards)
        done = 0
        while done < n:
            if shards and not shards[-1].sealed:
                cur = shards.pop()
                number, base = cur.number, cur.index
            else:
                number = shards[-1].number + 1 if shards else 0
                base = IVFPQIndex(st.codec)
            take = min(self.shard_size - base.ntotal, n - done)
            grown = base.copy()
            grown.add(x[done : done + take], ids[done : done + take], batch_size=batch_size)
            sealed = grown.ntotal >= self.shard_size
            shards.append(_Shard(number, sealed, _frozen(grown), None))
            done += take
        next_id = max(st.next_id, int(ids.max()) + 1)
        return replace(st, shards=tuple(shards), next_id=next_id, dirty=True)

    # --- search -------------------------------------------------------------------------------
    def assign(
        self, q: npt.NDArray[np.float32], nprobe: int | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Coarse assignment of queries, one for all shards: ``(Dq, Iq)``, ``(nq, nprobe)``."""
        codec = self.codec
        nprobe = check_nprobe(nprobe, self.params.nlist)
        return codec.assign(as_queries(q, "q", d=self.d), nprobe)

    def scan(
        self,
        q: npt.NDArray[np.float32],
        k: int,
        assignment: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]],
        *,
        strategy: Literal["auto", "stacked", "fanout"] = "auto",
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """PQ top-``k`` over every shard with a given assignment, removed vectors skipped."""
        st = self._state
        codec = self.codec
        k = check_k(k)
        q = as_queries(q, "q", d=self.d)
        a = check_assignment(assignment, q.shape[0], self.params.nlist)
        return self._scan(st, codec, q, k, a, self._strategy(strategy))

    def rescore(
        self, q: npt.NDArray[np.float32], ids: npt.ArrayLike, k: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Exact top-``k`` of each query among candidate ``ids`` (removed ids skipped)."""
        st = self._state
        self.codec  # noqa: B018 - raises NotTrainedError before training
        if self.params.store_vectors is None:
            raise ValueError("rescore: this index keeps no raw vectors (store_vectors=None)")
        k = check_k(k)
        q = as_queries(q, "q", d=self.d)
        cand = np.asarray(ids)
        flat = as_id_array(cand, "ids")
        if cand.ndim == 1:
            cand2 = np.broadcast_to(flat, (q.shape[0], flat.size))
        elif cand.ndim == 2 and cand.shape[0] == q.shape[0]:
            cand2 = flat.reshape(cand.shape)
        else:
            raise ValueError(f"ids: expected shape ({q.shape[0]}, m) or (m,), got {cand.shape}")
        cand2 = np.ascontiguousarray(cand2)
        if len(st.tombstones):
            cand2 = np.where(
                st.tombstones.contains(cand2.reshape(-1)).reshape(cand2.shape), -1, cand2
            )
        return self._rescore(st, q, cand2, k)

    def _rescore(
        self, st: _State, q: npt.NDArray[np.float32], cand: npt.NDArray[np.int64], k: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Exact top-``k`` of candidates: each candidate's vector is read from the one shard
        that holds it (routed by id ranges), then all are scored in one call of the exact
        scorer: what the shards' own ``rescore`` computes, without visiting every shard with
        every candidate."""
        from ..kernels.exact import rescore

        live = [s for s in st.shards if s.index.ntotal]
        nq, m = cand.shape
        if len(live) <= 1:
            if not live:
                return (
                    np.full((nq, k), self.params.pad_score, np.float32),
                    np.full((nq, k), -1, np.int64),
                )
            return live[0].index.rescore(q, cand, k)
        flat = cand.reshape(-1)
        shard_of, row_of = _route(live, flat)
        found = shard_of >= 0
        pos = np.flatnonzero(found)
        vec0 = live[0].index.vectors
        assert vec0 is not None
        gathered = np.empty((pos.size, self.d), vec0.dtype)
        for j, s in enumerate(live):
            sel = np.flatnonzero(shard_of[pos] == j)
            if sel.size:
                vec = s.index.vectors
                assert vec is not None
                rows = row_of[pos[sel]]
                order = np.argsort(rows, kind="stable")  # read the file front to back
                gathered[sel[order]] = vec[rows[order]]
        rows_all = np.full(flat.size, -1, np.int64)
        rows_all[pos] = np.arange(pos.size, dtype=np.int64)
        return rescore(
            q,
            gathered,
            rows_all.reshape(nq, m),
            np.ascontiguousarray(cand),
            k,
            metric=self.params.metric,
        )

    def _strategy(self, strategy: str) -> str:
        if strategy not in ("auto", "stacked", "fanout"):
            raise ValueError(f"strategy must be 'auto', 'stacked' or 'fanout', got {strategy!r}")
        if strategy == "stacked" and self.params.nbits != 8:
            raise ValueError(
                "strategy='stacked' needs 8-bit codes (fast-scan packs codes in blocks, and a "
                "flat index has no codes: both are scanned per shard); use 'fanout' or 'auto'"
            )
        if strategy == "auto":
            return "stacked" if self.params.nbits == 8 else "fanout"
        return strategy

    def _scan(
        self,
        st: _State,
        codec: Codec,
        q: npt.NDArray[np.float32],
        k: int,
        assignment: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]],
        strategy: str,
        *,
        ordered: bool = True,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        exclude = st.tombstones if len(st.tombstones) else None
        if strategy == "stacked":
            ex = None if exclude is None else exclude.array
            return lists.scan(codec, q, k, assignment, st.runs, ex)
        parts = []
        nq = q.shape[0]
        Iq = assignment[1]
        for s in st.shards:
            if not s.index.ntotal:
                continue
            # skip the shard for queries none of whose probed lists it holds
            sizes = s.index.list_sizes()
            holds = (sizes[np.maximum(Iq, 0)] > 0) & (Iq >= 0)
            rows = np.flatnonzero(holds.any(axis=1))
            if rows.size == 0:
                continue
            if rows.size == nq:
                parts.append(s.index.scan(q, k, assignment, exclude=exclude, ordered=ordered))
                continue
            sub = (
                np.ascontiguousarray(assignment[0][rows]),
                np.ascontiguousarray(Iq[rows]),
            )
            Ds, Is = s.index.scan(
                np.ascontiguousarray(q[rows]), k, sub, exclude=exclude, ordered=ordered
            )
            D = np.full((nq, k), self.params.pad_score, np.float32)
            I = np.full((nq, k), -1, np.int64)
            D[rows], I[rows] = Ds, Is
            parts.append((D, I))
        if not parts:
            return (
                np.full((q.shape[0], k), self.params.pad_score, np.float32),
                np.full((q.shape[0], k), -1, np.int64),
            )
        if len(parts) == 1:
            return parts[0]
        return merge_topk(
            np.stack([p[0] for p in parts]),
            np.stack([p[1] for p in parts]),
            k,
            larger_is_better=self.params.larger_is_better,
        )

    def to_gpu(
        self,
        *,
        device: str = "cuda",
        vectors: bool = True,
        vectors_on: str = "device",
        memory_budget: int | None = None,
    ) -> Any:
        """Every shard of this index on a GPU: one ``fastface.gpu.GpuIVFPQ`` over the shared
        codec, all shards' codes, ids and stored vectors (no retraining); removed vectors
        stay skipped. The GPU index is a snapshot: later changes here are not seen.

        ``device="emulate"`` runs the same kernels on the CPU. ``vectors=False``
        leaves the stored vectors behind (no re-ranking); ``vectors_on="host"``
        streams them from pinned host memory. See ``fastface.gpu.from_cpu``.
        """
        from ..gpu import from_cpu

        return from_cpu(
            self,
            device=device,
            vectors=vectors,
            vectors_on=vectors_on,
            memory_budget=memory_budget,
        )

    def search(
        self,
        q: npt.NDArray[np.float32],
        k: int,
        *,
        nprobe: int | None = None,
        rerank: int | None = None,
        strategy: str = "auto",
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Search every shard: ``(D, I)`` shaped ``(nq, k)``, equal scores by lower id.

        ``q`` is ``(nq, d)`` or one query ``(d,)`` (float16/32/64). Removed
        vectors are skipped inside the scan, so ``k`` results still come back
        when enough vectors remain. ``strategy`` (see the class docstring)
        never changes the result: ``"stacked"`` scans every shard's lists in
        one pass (8-bit codes), ``"fanout"`` shard by shard and merges;
        ``"auto"`` takes ``"stacked"`` for 8-bit codes.

        With ``rerank=f`` the ``k * f`` best PQ candidates of all shards are
        re-scored exactly from the stored vectors (see
        :meth:`IVFPQIndex.search`).
        """
        st = self._state
        if st.codec is None:
            raise NotTrainedError(f"{self.path}: not trained; call train(x) and add(x) first")
        if sum(s.index.ntotal for s in st.shards) - len(st.tombstones) <= 0:
            raise EmptyIndexError(f"{self.path}: the index is empty; add(x) vectors first")
        k = check_k(k)
        nprobe = check_nprobe(nprobe, self.params.nlist)
        factor = check_rerank(rerank, k, self.params)
        strategy = self._strategy(strategy)
        q = as_queries(q, "q", d=self.d)
        assignment = st.codec.assign(q, nprobe)
        if factor is None:
            return self._scan(st, st.codec, q, k, assignment, strategy)
        # candidates in any order: re-scoring orders them
        _, cand = self._scan(st, st.codec, q, k * factor, assignment, strategy, ordered=False)
        return self._rescore(st, q, cand, k)

    # --- remove / compact ---------------------------------------------------------------------
    def remove(self, ids: npt.ArrayLike, *, commit: bool = True) -> int:
        """Make ``ids`` (integers) unsearchable at once; returns how many were found.

        Vectors in shards not yet written in their current form (the open
        shard, a shard sealed by an uncommitted add) are dropped directly;
        those in sealed shard files are tombstoned until :meth:`compact`.
        Unknown ids are ignored.
        """
        self._check_writable()
        arr = sorted_unique(as_id_array(ids))
        with self._write_lock:
            st = self._state
            arr = arr[self._live(st, arr)]
            if arr.size == 0:
                return 0
            shards = []
            tomb: list[npt.NDArray[np.int64]] = []
            for s in st.shards:
                hit = arr[s.index.contains(arr)] if s.index.ntotal else arr[:0]
                if hit.size == 0:
                    shards.append(s)
                elif s.sealed and s.files is not None:
                    tomb.append(hit)
                    shards.append(s)
                else:
                    smaller = s.index.copy()
                    smaller.remove(hit)
                    shards.append(replace(s, index=_frozen(smaller), files=None))
            new = replace(st, shards=tuple(shards), dirty=True)
            if tomb:
                all_t = sorted_unique(np.concatenate([st.tombstones.array, *tomb]))
                new = replace(new, tombstones=IdSet(all_t), tomb_rec=None)
            new = self._with_packs(new)
            if commit:
                self._commit_state(new)
            else:
                self._state = new
        return int(arr.size)

    def compact(self) -> dict[str, int]:
        """Rewrite every sealed shard that holds removed vectors, without them; commits.

        Returns ``{"removed": n, "shards_rewritten": m}``. Unlike other
        commits, which delete replaced files one generation late, compaction
        deletes them at once: removed vectors are gone from every file when it
        returns (a reader loading the old files meanwhile retries).
        """
        self._check_writable()
        with self._write_lock:
            st = self._state
            rewritten = removed = 0
            if len(st.tombstones):
                tomb = st.tombstones.array
                shards = []
                for s in st.shards:
                    hit = tomb[s.index.contains(tomb)] if s.index.ntotal else tomb[:0]
                    if hit.size:
                        smaller = s.index.copy()
                        removed += smaller.remove(hit)
                        rewritten += 1
                        s = replace(s, index=_frozen(smaller), files=None)
                    if s.index.ntotal > 0 or not s.sealed:
                        shards.append(s)
                new = replace(
                    st,
                    shards=tuple(shards),
                    tombstones=IdSet(()),
                    tomb_rec=None,
                    packs=(),
                    dirty=True,
                )
                self._commit_state(new, purge=True)
            elif st.dirty:
                self._commit_state(st, purge=True)
        return {"removed": removed, "shards_rewritten": rewritten}

    # --- persistence --------------------------------------------------------------------------
    def flush(self) -> None:
        """Commit pending changes (``add``/``remove`` with ``commit=False``)."""
        self._check_writable()
        with self._write_lock:
            self._commit_state(self._state)

    def set_build_state(self, state: dict[str, Any] | None, *, commit: bool = True) -> None:
        """Record a JSON-serialisable dict (or ``None``) in the manifest, e.g. build progress."""
        self._check_writable()
        if state is not None:
            if not isinstance(state, dict):
                raise TypeError(f"state: expected a dict or None, got {type(state).__name__}")
            import json

            try:
                state = json.loads(json.dumps(state, allow_nan=False))
            except (TypeError, ValueError) as e:
                raise ValueError(f"state: not JSON-serialisable ({e})") from e
        with self._write_lock:
            new = replace(self._state, build=state, dirty=True)
            if commit:
                self._commit_state(new)
            else:
                self._state = new

    def _commit_state(self, st: _State, *, purge: bool = False) -> None:
        """Write ``st``'s new files, then the manifest; publish ``st`` only if all succeeded.

        Files no longer referenced are deleted one generation late (readers may be
        loading them), or at once with ``purge`` (compaction: removed data must go).
        """
        g = st.generation + 1
        written: list[Path] = []
        mode = self._file_mode

        def write(name: str, chunks: Any) -> storage.FileRecord:
            target = self.path / name
            written.append(target)
            return storage.atomic_write(target, chunks, mode=mode)

        def write_npy(name: str, arr: np.ndarray) -> storage.FileRecord:
            target = self.path / name
            written.append(target)
            return storage.atomic_write_npy(target, arr, mode=mode)

        try:
            codec_rec = st.codec_rec
            if st.codec is not None and codec_rec is None:
                codec_rec = write(f"codec-g{g:06d}.faiss", [st.codec.to_bytes()])
            shards = []
            for s in st.shards:
                if s.files is not None:
                    shards.append(s)
                    continue
                stem = f"shard-{s.number:06d}-g{g:06d}"
                files = {}
                if self.params.kind != "flat":
                    files["index"] = write(f"{stem}.faiss", s.index.serialize())
                files["ids"] = write_npy(f"{stem}.npy", s.index.ids)
                index = s.index
                if self.params.store_vectors is not None:
                    vec_name = f"{stem}.{_VEC_SUFFIX[self.params.store_vectors]}"
                    vec = s.index.vectors
                    assert vec is not None
                    files["vectors"] = write_npy(vec_name, vec)
                    if s.sealed:
                        # a sealed shard's vectors stay on disk: map the file just written
                        mapped = _map_npy(self.path / vec_name, vec.dtype, vec.shape)
                        index = _with_vectors(index, mapped)
                if (
                    s.sealed
                    and self._build_mode
                    and self.params.kind == "ivfpq"
                    and self.params.nbits == 8
                ):
                    # a build keeps sealed shards' codes on disk too: map the file just written
                    index = _mapped_shard(self.path, files["index"], index, st.codec)
                shards.append(replace(s, index=index, files=files))
            tomb_rec = st.tomb_rec
            if len(st.tombstones) and tomb_rec is None:
                tomb_rec = write_npy(f"tombstones-g{g:06d}.npy", st.tombstones.array)
            elif not len(st.tombstones):
                tomb_rec = None
            new = replace(
                st,
                generation=g,
                codec_rec=codec_rec,
                shards=tuple(shards),
                tomb_rec=tomb_rec,
                dirty=False,
            )
            man = storage.seal(self._manifest(new))
            storage.atomic_write_json(self.path / MANIFEST, man)
        except BaseException:
            for p in written:
                with contextlib.suppress(OSError):
                    p.unlink()
            raise
        new = self._with_packs(new)
        prev = self._prev_files
        self._state = new
        self._prev_files = self._referenced(new)
        # delete one generation late: readers that read the previous manifest may still load it
        self._remove_unreferenced(new, keep=None if purge else prev)

    def _manifest(self, st: _State) -> dict[str, Any]:
        stored = sum(s.index.ntotal for s in st.shards)
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "generation": st.generation,
            "params": self.params.to_dict(),
            "spec": self.params.spec,
            "shard_size": self.shard_size,
            "codec": st.codec_rec,
            "shards": [
                {"number": s.number, "sealed": s.sealed, "count": s.index.ntotal, "files": s.files}
                for s in st.shards
            ],
            "tombstones": st.tomb_rec,
            "ntotal": stored - len(st.tombstones),
            "next_id": st.next_id,
            "build": st.build,
        }

    def _with_packs(self, st: _State, *, rebuild: bool = False) -> _State:
        """Merge written sealed shards' lists into packs (in-memory 8-bit indexes only)."""
        if self._mmap or self._build_mode or self.params.nbits != 8 or st.codec is None:
            return st
        p = self.params
        by_number = {s.number: s for s in st.shards}
        # packs whose shards all still exist unchanged (same objects) stay
        keep: list[_Pack] = []
        for pk in st.packs if not rebuild else ():
            if all(
                n in by_number and by_number[n].sealed and by_number[n].files is not None
                for n in pk.numbers
            ):
                keep.append(pk)
        packed = set().union(*(pk.numbers for pk in keep)) if keep else set()
        todo = [s for s in st.shards if s.sealed and s.files is not None and s.number not in packed]
        if not todo and len(keep) == len(st.packs) and not rebuild:
            return st
        groups: list[list[_Shard]] = [[by_number[n] for n in sorted(pk.numbers)] for pk in keep]
        if todo:
            groups.append(todo)
        # size-tiered: merge the newest groups while the last is at least half the one before
        sizes = [sum(s.index.ntotal for s in g) for g in groups]
        while len(groups) >= 2 and (2 * sizes[-1] >= sizes[-2] or len(groups) > _MAX_PACKS):
            groups[-2:] = [groups[-2] + groups[-1]]
            sizes[-2:] = [sizes[-2] + sizes[-1]]
        new_packs: list[_Pack] = []
        replaced: dict[int, _Shard] = {}
        old = {frozenset(pk.numbers): pk for pk in keep}
        for g in groups:
            numbers = frozenset(s.number for s in g)
            if numbers in old:
                new_packs.append(old[numbers])
                continue
            run, views = lists.pack([list(s.index.list_runs) for s in g], p.nlist, p.code_size)
            new_packs.append(_Pack(run, numbers))
            for s, view in zip(g, views, strict=True):
                idx = IVFPQIndex.from_parts(
                    st.codec, s.index.ids, runs=(view,), vectors=s.index.vectors, read_only=True
                )
                replaced[s.number] = replace(s, index=idx)
        shards = tuple(replaced.get(s.number, s) for s in st.shards)
        return replace(st, shards=shards, packs=tuple(new_packs))

    def _referenced(self, st: _State) -> set[str]:
        names = {MANIFEST, LOCK}
        if st.codec_rec:
            names.add(st.codec_rec["file"])
        if st.tomb_rec:
            names.add(st.tomb_rec["file"])
        for s in st.shards:
            if s.files:
                names.update(rec["file"] for rec in s.files.values())
        return names

    def _remove_unreferenced(self, st: _State, keep: set[str] | None = None) -> None:
        """Delete files this index owns that neither ``st`` nor ``keep`` reference."""
        wanted = self._referenced(st) | (keep or set())
        for p in self.path.iterdir():
            if p.name in wanted:
                continue
            if _OWNED.match(p.name) or storage.is_tmp_name(p.name):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def _live(self, st: _State, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        found = _stored(st, ids)
        if len(st.tombstones):
            found &= ~st.tombstones.contains(ids)
        return found

    def close(self) -> None:
        """Release the writer lock (pending changes must be flushed first)."""
        with self._write_lock:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def __enter__(self) -> ShardedIndex:
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
            if self._lock is not None:
                self._lock.release()

    # --- shards written elsewhere -------------------------------------------------------------
    @classmethod
    def stage_shard(
        cls, path: str | os.PathLike[str], number: int, shard: IVFPQIndex, *, tag: str = ""
    ) -> dict[str, Any]:
        """Write a shard's files into ``path/.staging`` for :meth:`adopt`; any process may call it.

        The files are exactly those a commit writes for ``shard`` (its FAISS
        file, its ids and raw vectors in row order), written atomically with
        the index's file mode; a sealed record ``shard-NNNNNN.json`` naming
        their sizes and SHA-256 is written last, so a shard counts as staged
        only when all its files are complete. Staging shard ``number`` again
        replaces it. ``tag`` is returned by :meth:`staged` (e.g. which build
        staged it). Nothing in the index changes until the writer calls
        :meth:`adopt`. Returns the record.
        """
        path = Path(path)
        if isinstance(number, bool) or not isinstance(number, (int, np.integer)) or number < 0:
            raise TypeError(f"number: expected a shard number >= 0, got {number!r}")
        number = int(number)
        if not isinstance(shard, IVFPQIndex):
            raise TypeError(f"shard: expected an IVFPQIndex, got {type(shard).__name__}")
        if not isinstance(tag, str):
            raise TypeError(f"tag: expected a str, got {type(tag).__name__}")
        info = cls.inspect(path)
        if shard.params != info["params"]:
            raise ValueError(
                f"shard: its params {shard.params} differ from the index's {info['params']}"
            )
        if shard.ntotal > info["shard_size"]:
            raise ValueError(
                f"shard: holds {shard.ntotal} vectors, more than shard_size={info['shard_size']}"
            )
        mode = os.stat(path / MANIFEST).st_mode & 0o666
        stage = _staging_dir(path, create=True)
        assert stage is not None  # made when missing
        stem = f"shard-{number:06d}"
        with contextlib.suppress(FileNotFoundError):
            (stage / f"{stem}.json").unlink()  # the files change: the old record must go first
        files = {}
        if shard.params.kind != "flat":  # a flat shard's vectors are its data
            files["index"] = storage.atomic_write(
                stage / f"{stem}.faiss", shard.serialize(), mode=mode
            )
        files["ids"] = storage.atomic_write_npy(stage / f"{stem}.npy", shard.ids, mode=mode)
        if shard.params.store_vectors is not None:
            vec = shard.vectors
            assert vec is not None  # store_vectors is set
            name = f"{stem}.{_VEC_SUFFIX[shard.params.store_vectors]}"
            files["vectors"] = storage.atomic_write_npy(stage / name, vec, mode=mode)
        record = {
            "format": STAGED_FORMAT,
            "format_version": 1,
            "number": number,
            "count": shard.ntotal,
            "params": shard.params.to_dict(),
            "tag": tag,
            "files": files,
        }
        storage.atomic_write_json(stage / f"{stem}.json", storage.seal(record), mode=mode)
        return record

    @classmethod
    def staged(cls, path: str | os.PathLike[str]) -> list[dict[str, Any]]:
        """The records of the shards staged in ``path`` (:meth:`stage_shard`), by number.

        A record that fails its seal or its fields, or whose files are
        missing or of another size (a writer died half-way), is left out and
        logged: stage that shard again. Checksums are verified by
        :meth:`adopt`.
        """
        path = Path(path)
        stage = _staging_dir(path, create=False)
        if stage is None:
            return []
        out = []
        for p in sorted(stage.iterdir()):
            if not _STAGED["record"].match(p.name):
                continue
            try:
                raw = storage.read_manifest(p, kind=STAGED_FORMAT, max_version=1)
                number, _, files, _ = _check_staged(raw, p)
                if p.name != f"shard-{number:06d}.json":
                    raise _fail(p, "number", f"{number} does not match the file name")
                for rec in files.values():
                    st = os.lstat(stage / rec["file"])
                    if not stat.S_ISREG(st.st_mode) or st.st_size != rec["bytes"]:
                        raise _fail(p, "files", f"{rec['file']} is missing or has another size")
            except (OSError, CorruptIndexError, ValueError) as e:
                log.warning("%s: staged shard left out (%s)", p, e)
                continue
            out.append(raw)
        return sorted(out, key=lambda r: int(r["number"]))

    def adopt(self, records: Iterable[dict[str, Any]]) -> list[int]:
        """Add shards staged by :meth:`stage_shard` (from any process or machine) and commit.

        Before anything changes, every file of every record is verified as
        :meth:`open` verifies a shard: size and SHA-256, the FAISS header
        against this index's params and codec, ids against the lists. The
        shard numbers must be new; a shard holding fewer than ``shard_size``
        vectors stays open and must be the last one; ids must not be in the
        index already. The files are then moved into the index (renamed, not
        copied) and the manifest is committed once, for all of them. If this
        raises, nothing changed and the files stay staged. Returns the
        numbers adopted.
        """
        self._check_writable()
        entries = []
        for i, rec in enumerate(records):
            number, count, files, _ = _check_staged(rec, Path(f"records[{i}]"))
            entries.append((number, count, files))
        entries.sort(key=lambda e: e[0])
        if not entries:
            return []
        p = self.params
        with self._write_lock:
            st = self._state
            codec = self.codec
            have = {s.number for s in st.shards}
            numbers = [e[0] for e in entries]
            if len(set(numbers)) != len(numbers) or have & set(numbers):
                dup = sorted(
                    set(n for n in numbers if numbers.count(n) > 1) | (have & set(numbers))
                )
                raise ValueError(f"records: shard {dup[0]} is in the index or staged twice")
            stage = _staging_dir(self.path, create=False)
            if stage is None:
                raise FileNotFoundError(f"{self.path / STAGING}: nothing is staged")
            new_shards: list[_Shard] = []
            for number, count, files in entries:
                if files.keys() != _shard_file_kinds(p):
                    raise ValueError(f"records: shard {number} has files {sorted(files)}")
                if count > self.shard_size:
                    raise ValueError(
                        f"records: shard {number} holds {count} vectors, more than "
                        f"shard_size={self.shard_size}"
                    )
                sealed = count == self.shard_size
                index = self._shard_from_files(
                    codec,
                    files,
                    count,
                    sealed,
                    lambda rec, mem: storage.open_verified(stage, rec, in_memory=mem),
                )
                new_shards.append(_Shard(number, sealed, index, dict(files)))
            merged = sorted([*st.shards, *new_shards], key=lambda s: s.number)
            for s in merged[:-1]:
                if not s.sealed:
                    raise ValueError(
                        f"records: shard {s.number} holds {s.index.ntotal} < shard_size="
                        f"{self.shard_size} vectors and would not be the last shard; only the "
                        "last shard may be open"
                    )
            added = np.concatenate([s.index.ids for s in new_shards])
            if sorted_unique(added).size != added.size:
                raise ValueError("records: the staged shards hold the same id twice")
            taken = _stored(st, added)
            if taken.any():
                raise ValueError(
                    f"records: id {int(added[taken][0])} is in the index already; ids must be new"
                )
            g = st.generation + 1
            moved: list[tuple[Path, Path]] = []
            try:
                renamed = []
                for s in new_shards:
                    assert s.files is not None
                    recs: dict[str, storage.FileRecord] = {}
                    for kind, rec in s.files.items():
                        suffix = {"index": "faiss", "ids": "npy"}.get(kind) or _VEC_SUFFIX[
                            str(p.store_vectors)
                        ]
                        name = f"shard-{s.number:06d}-g{g:06d}.{suffix}"
                        src, dst = stage / rec["file"], self.path / name
                        if os.path.lexists(dst):
                            raise FileExistsError(f"{dst}: exists; will not replace it")
                        os.rename(src, dst)
                        moved.append((src, dst))
                        recs[kind] = {"file": name, "bytes": rec["bytes"], "sha256": rec["sha256"]}
                    renamed.append(replace(s, files=recs))
                storage.fsync_dir(self.path)
                by_number = {s.number: s for s in renamed}
                shards = tuple(by_number.get(s.number, s) for s in merged)
                next_id = max(st.next_id, int(added.max()) + 1) if added.size else st.next_id
                self._commit_state(replace(st, shards=shards, next_id=next_id, dirty=True))
            except BaseException:
                for src, dst in reversed(moved):
                    with contextlib.suppress(OSError):
                        os.rename(dst, src)
                raise
            for number in numbers:
                with contextlib.suppress(FileNotFoundError):
                    (stage / f"shard-{number:06d}.json").unlink()
            _tidy_staging(stage)
        return numbers

    # --- build --------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        source: Any,
        path: str | os.PathLike[str],
        params: CodecParams | str | None = None,
        *,
        metric: Literal["ip", "l2"] = "ip",
        memory_budget: int | str | None = None,
        shard_size: int = 1_000_000,
        chunk_size: int = 100_000,
        commit_every: int | None = None,
        train_size: int | None = None,
        seed: int = 0,
        column: str | None = None,
        progress: bool = False,
    ) -> ShardedIndex:
        """Build an index directory from a stream of vectors, resumably.

        ``source``: a ``.npy`` (memory-mapped), ``.fvecs`` or ``.parquet`` file,
        an array, a generator such as :class:`fastface.datasets.SyntheticFaces`
        (rows regenerated on demand: 100M rows never need a 51 GB file), a
        function ``start -> iterable of chunks``, or an iterable of chunks
        (:func:`fastface.io.open_vectors`). Vectors get their row numbers as ids.

        ``params``: an index spec (``"OPQ32,IVF65536_HNSW32,PQ32,F16"``), an
        :class:`IVFPQParams` / :class:`~fastface.index.params.FlatParams`, or
        ``None``: :func:`fastface.auto_spec` chooses from the source's size and
        ``memory_budget`` (the choice and its reason are logged and recorded in
        the build state).

        Resuming: the rows done are committed every ``commit_every`` rows
        (default: every chunk; each commit rewrites the open shard, so for big
        builds pass ``shard_size``) and whenever a shard seals. A build that
        was interrupted, even killed, continues from its last commit when
        called again with the same arguments; sealed shards are never redone.
        Sources that can be read again from a row resume (files, arrays,
        generators, functions); an iterable of chunks cannot (see
        :mod:`fastface.io`).

        Training, then encoding, report progress through
        ``logging.getLogger("fastface")`` and, with ``progress=True``, bars.
        """
        from ..io import open_vectors

        src = open_vectors(source, column=column)
        chunk_size = check_positive_int(chunk_size, "chunk_size")
        if commit_every is not None:
            commit_every = check_positive_int(commit_every, "commit_every")
        path = Path(path)
        reason = None
        if params is None:
            from .auto import auto_spec

            if src.n is None:
                raise ValueError(
                    "params: the source's size is unknown (an iterable of chunks); pass a spec "
                    "such as 'IVF4096,PQ32,F16', or fastface.auto_spec(n, d) for the n you expect"
                )
            choice = auto_spec(src.n, src.d, memory_budget=memory_budget, metric=metric)
            params, reason = choice.params, choice.reason
            log.info("build: auto_spec chose %s: %s", choice.spec, reason)
        elif isinstance(params, str):
            params = parse_spec(params, src.d, metric=metric)
        if not isinstance(params, (IVFPQParams, FlatParams)):
            raise TypeError(
                f"params: expected an index spec, IVFPQParams, FlatParams or None, got "
                f"{type(params).__name__}"
            )
        if src.d != params.d:
            raise ValueError(f"source has d={src.d}, params.d={params.d}; they must match")
        fingerprint = {"source": src.describe(), "n": src.n}
        if (path / MANIFEST).exists():
            if not src.resumable:
                raise FileExistsError(
                    f"{path}: holds an index; a build from an iterable of chunks cannot resume, "
                    "pick a new directory (or pass a function start -> chunks)"
                )
            index = cls._open_for_build(path)
            state = index.build_state
            if state is None or state.get("source") != fingerprint or index.params != params:
                index.close()
                raise FileExistsError(
                    f"{path}: holds another index or a build of another source; pick a new "
                    "directory or remove this one"
                )
            log.info("build: resuming %s at row %s", path, state.get("rows_done"))
        else:
            index = cls.create(path, params, shard_size=shard_size)
            index._build_mode = True
            first: dict[str, Any] = {"source": fingerprint, "rows_done": 0, "complete": False}
            if reason is not None:
                first["auto_spec"] = reason
            index.set_build_state(first)
        try:
            if not index.is_trained:
                from .train import default_train_size

                assert isinstance(params, IVFPQParams)
                limit = train_size or default_train_size(params)
                log.info("build: sampling %d training rows from %s", limit, fingerprint["source"])
                index.train(
                    src.sample(limit, seed=seed), max_points=limit, seed=seed, progress=progress
                )
            state = index.build_state or {}
            extra = {k: v for k, v in state.items() if k not in ("source", "rows_done", "complete")}
            start = state.get("rows_done", 0)
            top = src.n if src.n is not None else 2**62
            if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= top:
                raise CorruptIndexError(
                    f"{path / MANIFEST}: build.rows_done {start!r} is not a row count",
                    str(path / MANIFEST),
                    "build.rows_done",
                )
            if not state.get("complete"):
                index._stream(src, start, fingerprint, extra, chunk_size, commit_every, progress)
        except BaseException:
            index.close()
            raise
        index._build_mode = False
        return index

    def reencode(
        self,
        path: str | os.PathLike[str],
        params: CodecParams | str,
        *,
        shard_size: int | None = None,
        chunk_size: int = 100_000,
        train_size: int | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> ShardedIndex:
        """Copy the searchable vectors, with their ids, into a new index with another codec.

        ``params``: an index spec (``"IVF4096,PQ32,F16"``) or parameters of the
        same dimension and metric. The new codec is trained on a sample of this
        index's stored vectors (so it needs ``store_vectors``; a flat index
        always has them), then every live vector is added with its id; removed
        vectors are left out and ids never used again stay unused. This index
        is only read. Returns the new index, open for writing (``mode="a"``).

        This is how a flat index that grew becomes IVF-PQ without enrolling
        anything again::

            small = ShardedIndex.create(path, "Flat", d=512)
            ...
            big = small.reencode(path2, "IVF4096,PQ64,F16")

        To replace an index in place, reencode to a new directory and point
        readers at it (a directory cannot be swapped atomically while it has
        readers).
        """
        st = self._state
        if self.params.store_vectors is None:
            raise ValueError(
                f"{self.path}: keeps no raw vectors (store_vectors=None); nothing to reencode from"
            )
        if isinstance(params, str):
            params = parse_spec(params, self.d, metric=self.params.metric)
        if not isinstance(params, (IVFPQParams, FlatParams)):
            raise TypeError(
                f"params: expected an index spec, IVFPQParams or FlatParams, got "
                f"{type(params).__name__}"
            )
        if params.d != self.d or params.metric != self.params.metric:
            raise ValueError(
                f"params: d={params.d}, metric={params.metric!r} must match this index's "
                f"d={self.d}, metric={self.params.metric!r}"
            )
        chunk_size = check_positive_int(chunk_size, "chunk_size")
        parts = list(self.live_rows())
        total = sum(rows.size for _, rows in parts)
        out = ShardedIndex.create(path, params, shard_size=shard_size or self.shard_size)
        try:
            out._build_mode = True
            if not out.is_trained:
                from .train import default_train_size

                assert isinstance(params, IVFPQParams)
                limit = min(train_size or default_train_size(params), total)
                rng = np.random.default_rng(seed)
                pick = np.sort(rng.choice(total, size=limit, replace=False))
                sample = np.empty((limit, self.d), np.float32)
                base = filled = 0
                for shard, rows in parts:
                    sel = pick[(pick >= base) & (pick < base + rows.size)] - base
                    vec = shard.vectors
                    assert vec is not None
                    sample[filled : filled + sel.size] = vec[rows[sel]]
                    filled += sel.size
                    base += rows.size
                out.train(sample, max_points=limit, seed=seed, progress=progress)
                del sample
            from tqdm.auto import tqdm

            with tqdm(total=total, unit="vec", disable=not progress, desc="reencode") as bar:
                for shard, rows in parts:
                    vec = shard.vectors
                    assert vec is not None
                    for lo in range(0, rows.size, chunk_size):
                        r = rows[lo : lo + chunk_size]
                        out.add(np.asarray(vec[r], np.float32), shard.ids[r], commit=False)
                        bar.update(r.size)
                    out.flush()
            with out._write_lock:
                out._commit_state(replace(out._state, next_id=max(out._state.next_id, st.next_id)))
            log.info(
                "reencode: %s (%s) -> %s (%s), %d vectors",
                self.path,
                self.params.spec,
                out.path,
                params.spec,
                total,
            )
        except BaseException:
            out.close()
            raise
        out._build_mode = False
        out._state = out._with_packs(out._state, rebuild=True)
        return out

    @classmethod
    def _open_for_build(cls, path: Path) -> ShardedIndex:
        """Open for writing as a build does: sealed shards stay memory-mapped, never packed."""
        lock = storage.WriterLock(path)
        lock.acquire()
        try:
            obj = cls._load(path, writable=True, mmap=False, build=True)
            obj._lock = lock
            obj._prev_files = obj._referenced(obj._state)
            if obj._sealed_manifest:
                obj._remove_unreferenced(obj._state)
        except BaseException:
            lock.release()
            raise
        return obj

    def _stream(
        self,
        src: Any,
        start: int,
        fingerprint: dict[str, Any],
        extra: dict[str, Any],
        chunk_size: int,
        commit_every: int | None,
        progress: bool,
    ) -> None:
        """Add the source's rows from ``start`` on, committing the rows done as it goes."""
        import time

        from tqdm.auto import tqdm

        def state(done: int, complete: bool) -> dict[str, Any]:
            return {"source": fingerprint, "rows_done": done, "complete": complete, **extra}

        bar = tqdm(total=src.n, initial=start, unit="vec", disable=not progress, desc="encode")
        done = last_commit = start
        t0 = time.perf_counter()
        log.info("build: encoding rows %d..%s", start, src.n if src.n is not None else "end")
        with bar:
            for lo, chunk in src.iter_chunks(chunk_size, start=start):
                ids = np.arange(lo, lo + chunk.shape[0], dtype=np.int64)
                sealed_before = sum(1 for s in self._state.shards if s.sealed)
                self.add(chunk, ids, commit=False)
                done = lo + chunk.shape[0]
                sealed = sum(1 for s in self._state.shards if s.sealed) > sealed_before
                due = commit_every is None or done - last_commit >= commit_every
                self.set_build_state(state(done, False), commit=due or sealed)
                if due or sealed:
                    last_commit = done
                    rate = (done - start) / max(time.perf_counter() - t0, 1e-9)
                    log.info("build: %d rows committed (%.0f rows/s)", done, rate)
                bar.update(chunk.shape[0])
        self.set_build_state(state(done, True))
        log.info("build: complete, %d rows in %d shards", done, self.nshards)


class _Vanished(Exception):
    """A file listed in manifest generation ``generation`` was not there."""

    def __init__(self, path: str, generation: int) -> None:
        super().__init__(path)
        self.path = path
        self.generation = generation


def _staging_dir(path: Path, *, create: bool) -> Path | None:
    """``path/.staging``: a real directory (never a symbolic link), made when asked."""
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"{path}: not an index directory (no {MANIFEST})")
    stage = path / STAGING
    try:
        st = os.lstat(stage)
    except FileNotFoundError:
        if not create:
            return None
        storage.make_dir(stage, os.stat(path).st_mode & 0o777)
        st = os.lstat(stage)
    if not stat.S_ISDIR(st.st_mode):
        raise CorruptIndexError(
            f"{stage}: not a directory (a symbolic link or a file); remove it", str(stage)
        )
    return stage


def _tidy_staging(stage: Path) -> None:
    """Remove what writers left in a staging directory whose records are all adopted."""
    left = list(stage.iterdir())
    if any(_STAGED["record"].match(p.name) for p in left):
        return
    for p in left:
        if storage.is_tmp_name(p.name) or any(_STAGED[k].match(p.name) for k in _STAGED):
            with contextlib.suppress(OSError):
                p.unlink()
    with contextlib.suppress(OSError):
        stage.rmdir()


def _check_staged(rec: Any, where: Path) -> tuple[int, int, dict[str, storage.FileRecord], str]:
    """The fields of a staged shard's record, type-checked: number, count, files, tag."""
    if not isinstance(rec, dict):
        raise _fail(where, "record", "expected a dict")
    want = {"format", "format_version", "number", "count", "params", "tag", "files"}
    if set(rec) - {"checksum"} != want:
        raise _fail(where, "record", f"expected the fields {sorted(want)}")
    if rec["format"] != STAGED_FORMAT:
        raise _fail(where, "format", f"expected {STAGED_FORMAT!r}")
    number = _int(rec["number"], where, "number", 0, 10**12 - 1)
    count = _int(rec["count"], where, "count", 0, 2**40)
    if not isinstance(rec["tag"], str):
        raise _fail(where, "tag", "expected a string")
    files = rec["files"]
    if not isinstance(files, dict) or not set(files) <= {"index", "ids", "vectors"}:
        raise _fail(where, "files", "expected index, ids and (stored vectors) vectors")
    out = {}
    for kind, r in files.items():
        try:
            out[kind] = storage.check_record(r, f"files.{kind}", _STAGED[kind])
        except ValueError as e:
            raise _fail(where, f"files.{kind}", str(e)) from e
    return number, count, out, rec["tag"]


def _resolve_params(
    params: Any, d: int | None, metric: Literal["ip", "l2"]
) -> tuple[Codec | None, CodecParams]:
    """``(codec or None, params)`` from a spec string, params or a trained codec."""
    if isinstance(params, str):
        if d is None:
            raise ValueError(
                f"d: a spec names no dimension; pass d=, e.g. create(path, {params!r}, d=128)"
            )
        return None, parse_spec(params, d, metric=metric)
    if isinstance(params, Codec):
        return params, params.params
    if isinstance(params, (IVFPQParams, FlatParams)):
        return None, params
    raise TypeError(
        f"params: expected an index spec string, IVFPQParams, FlatParams or a Codec, got "
        f"{type(params).__name__}"
    )


def _generation(path: Path) -> int | None:
    try:
        raw = storage.read_manifest(path / MANIFEST, kind=FORMAT, max_version=FORMAT_VERSION)
    except (OSError, CorruptIndexError, ValueError):
        return None
    g = raw.get("generation")
    return g if isinstance(g, int) else None


def _foreign(path: Path) -> bool:
    """True when ``path`` holds anything but what an interrupted create leaves."""
    return any(p.name != LOCK and not storage.is_tmp_name(p.name) for p in path.iterdir())


def _route(
    shards: list[_Shard], ids: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``(shard, row)`` of each id among ``shards`` (``-1, -1`` if none holds it).

    When the shards' id ranges do not overlap (what builds and appends give) each
    id is looked up in the one shard whose range holds it; otherwise in every shard.
    """
    shard_of = np.full(ids.size, -1, np.int64)
    row_of = np.full(ids.size, -1, np.int64)
    bounds = [s.index.id_bounds() for s in shards]
    lo = np.array([b[0] if b else 0 for b in bounds], np.int64)
    hi = np.array([b[1] if b else -1 for b in bounds], np.int64)
    order = np.argsort(lo, kind="stable")
    disjoint = bool((lo[order][1:] > hi[order][:-1]).all())
    if disjoint:
        k = np.searchsorted(lo[order], ids, side="right") - 1
        inside = (k >= 0) & (ids >= 0)
        j = order[np.where(inside, k, 0)]
        inside &= ids <= hi[j]
        for sj in np.unique(j[inside]):
            sel = np.flatnonzero(inside & (j == sj))
            rows = shards[int(sj)].index.rows_of(ids[sel])
            ok = rows >= 0
            shard_of[sel[ok]] = sj
            row_of[sel[ok]] = rows[ok]
        return shard_of, row_of
    for n, s in enumerate(shards):
        rows = s.index.rows_of(ids)
        ok = (rows >= 0) & (shard_of < 0)
        shard_of[ok] = n
        row_of[ok] = rows[ok]
    return shard_of, row_of


def _stored(st: _State, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    found = np.zeros(ids.shape, bool)
    for s in st.shards:
        if s.index.ntotal:
            found |= s.index.rows_of(ids) >= 0
    return found


def _frozen(index: IVFPQIndex) -> IVFPQIndex:
    """A read-only view of ``index`` (the same state)."""
    return index.view()


def _with_vectors(index: IVFPQIndex, vectors: npt.NDArray[Any]) -> IVFPQIndex:
    return index.with_vectors(vectors).view()


def _mapped_shard(
    directory: Path, rec: storage.FileRecord, index: IVFPQIndex, codec: Codec | None
) -> IVFPQIndex:
    """``index`` with its lists read from the shard file just written, memory-mapped."""
    import mmap as _mmap

    from . import faiss_format

    assert codec is not None
    with open(directory / rec["file"], "rb") as f:
        buf = np.frombuffer(_mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ), np.uint8)
    layout = faiss_format.parse(buf, rec["file"])
    run = ListRun.from_layout(buf, layout)
    want = index.ntotal * index.params.max_copies  # two entries per vector when spilled
    if run.n != want:  # pragma: no cover - we wrote it
        raise CorruptIndexError(f"{rec['file']}: holds {run.n} codes, expected {want}")
    return IVFPQIndex.from_parts(
        codec, index.ids, runs=(run,), vectors=index.vectors, read_only=True
    )


def _map_npy(path: Path, dtype: Any, shape: tuple[int, ...]) -> npt.NDArray[Any]:
    """Map a ``.npy`` file this process has just written (and still holds the lock for)."""
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.dtype != dtype or arr.shape != shape:  # pragma: no cover - we wrote it
        raise CorruptIndexError(f"{path}: holds {arr.dtype} {arr.shape}", str(path))
    return arr
