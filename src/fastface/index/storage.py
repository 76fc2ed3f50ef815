"""Files on disk: atomic owner-only writes, verified reads, checksummed manifests, the lock.

Writing. Every file is written to an unpredictable temporary name in the
same directory (``.<name>.tmp-<random>``, created with ``O_EXCL |
O_NOFOLLOW``: a planted file or symlink there makes the write fail, it is
never followed), fsynced, renamed over its final name, and the directory is
fsynced: a crash leaves the old file or the new one, never a torn one.
Files are created with an explicit mode (owner-only ``0o600`` by default)
set on the descriptor, never through the process umask. A full disk (or a
file size limit) raises :class:`~fastface.errors.DiskFullError` naming the
file, after the temporary file is removed.

Reading. :func:`open_verified` opens a file named by a manifest record
(``O_NOFOLLOW``), checks its size and SHA-256 on the very bytes it then
hands out (one descriptor, one mapping: a file swapped in between cannot
slip through), and :func:`npy_array` parses a ``.npy`` header from those
bytes, checking dtype and shape before any data is read.

Manifests carry their own checksum (:func:`seal`, :func:`read_manifest`):
a SHA-256 of their canonical JSON, so that any change to a manifest is
detected before any of its fields is trusted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import mmap
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import CorruptIndexError, DiskFullError, IndexLockedError, UnsupportedFormatError

__all__ = [
    "FileRecord",
    "VerifiedFile",
    "WriterLock",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_npy",
    "check_record",
    "dir_file_mode",
    "fsync_dir",
    "make_dir",
    "npy_array",
    "open_verified",
    "read_json_checked",
    "read_manifest",
    "seal",
    "write_fd",
]

_CHUNK = 1 << 22
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_SHA = re.compile(r"^[0-9a-f]{64}$")
#: What a file name in a record may look like: one path component, no dot-dot, no separators.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
_TMP_MARK = ".tmp-"
CHECKSUM_KEY = "checksum"

FileRecord = dict[str, Any]  # {"file": name, "bytes": int, "sha256": hex}


# --- writing -------------------------------------------------------------------------------------


def write_fd(fd: int, data: memoryview) -> int:
    """Write some of ``data`` to ``fd``: the one write primitive (tests fake a full disk here)."""
    return os.write(fd, data)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dir_file_mode(directory: Path) -> int:
    """The mode for new files in ``directory``: its permission bits without execute."""
    return stat.S_IMODE(os.stat(directory).st_mode) & 0o666


def make_dir(path: Path, mode: int = 0o700) -> None:
    """Create ``path`` (parents as usual) with exactly ``mode``, whatever the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not path.is_dir():
            raise
    os.chmod(path, mode)


def tmp_name(path: Path) -> Path:
    """An unpredictable temporary name beside ``path``."""
    return path.with_name(f".{path.name}{_TMP_MARK}{secrets.token_hex(8)}")


def is_tmp_name(name: str) -> bool:
    return name.startswith(".") and _TMP_MARK in name


def atomic_write(path: Path, chunks: Iterable[Any], *, mode: int | None = None) -> FileRecord:
    """Write ``chunks`` to ``path`` atomically with ``mode``; return its record (size, SHA-256).

    ``mode=None`` takes the directory's permissions without execute bits.
    """
    path = Path(path)
    if mode is None:
        mode = dir_file_mode(path.parent)
    tmp = tmp_name(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    h = hashlib.sha256()
    size = 0
    try:
        fd = os.open(tmp, flags, mode)
    except OSError as e:
        raise _disk_error(e, path) from e
    try:
        try:
            os.fchmod(fd, mode)  # exactly the mode asked for, whatever the umask
            for chunk in chunks:
                view = memoryview(chunk)
                if view.nbytes == 0:
                    continue
                view = view.cast("B")
                h.update(view)
                size += len(view)
                while len(view):
                    n = write_fd(fd, view)
                    if n <= 0:
                        raise OSError(errno.EIO, "write returned no progress", str(tmp))
                    view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _disk_error(e, path) from e
        raise
    fsync_dir(path.parent)
    return {"file": path.name, "bytes": size, "sha256": h.hexdigest()}


def _disk_error(e: OSError, path: Path) -> OSError:
    if e.errno in _DISK_FULL and not isinstance(e, DiskFullError):
        what = "file size limit reached" if e.errno == errno.EFBIG else "no space left on device"
        return DiskFullError(e.errno, f"{what} while writing it; nothing was committed", str(path))
    return e


def atomic_write_bytes(
    path: Path, data: bytes | memoryview, *, mode: int | None = None
) -> FileRecord:
    """Write ``data`` to ``path`` atomically; return its manifest record."""
    return atomic_write(Path(path), [data], mode=mode)


def atomic_write_npy(path: Path, arr: np.ndarray, *, mode: int | None = None) -> FileRecord:
    """Write ``arr`` as a ``.npy`` file (no pickles) atomically."""
    arr = np.ascontiguousarray(arr)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    return atomic_write(Path(path), [buf.getvalue(), arr.reshape(-1).view(np.uint8)], mode=mode)


def atomic_write_json(path: Path, obj: Any, *, mode: int | None = None) -> FileRecord:
    """Write ``obj`` as JSON (sorted keys) atomically."""
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    return atomic_write(Path(path), [data], mode=mode)


# --- manifests -----------------------------------------------------------------------------------


def _canonical(obj: dict[str, Any]) -> bytes:
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def seal(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with a ``checksum`` field: the SHA-256 of its canonical JSON."""
    out = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    out[CHECKSUM_KEY] = "sha256:" + hashlib.sha256(_canonical(out)).hexdigest()
    return out


def _read_json(path: Path) -> Any:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CorruptIndexError(f"{path}: cannot be opened ({e.strerror})", str(path)) from e
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise CorruptIndexError(f"{path}: not a regular file", str(path))
        raw = f.read(64 << 20)
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptIndexError(f"{path}: not valid JSON ({e})", str(path)) from e


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def read_json_checked(path: Path, *, kind: str, max_version: int) -> dict[str, Any]:
    """Read a JSON record, checking its kind and format version (no checksum required)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; is this a fastface {kind} directory?")
    obj = _read_json(path)
    return _check_kind(obj, path, kind, max_version)


def _check_kind(obj: Any, path: Path, kind: str, max_version: int) -> dict[str, Any]:
    if not isinstance(obj, dict) or obj.get("format") != kind:
        raise CorruptIndexError(f"{path}: not a {kind} manifest", str(path), "format")
    version = obj.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CorruptIndexError(
            f"{path}: format_version missing or invalid", str(path), "format_version"
        )
    if version > max_version:
        raise UnsupportedFormatError(
            f"{path}: written by format version {version}, this fastface reads up to "
            f"{max_version}; upgrade fastface to open it"
        )
    return obj


def read_manifest(path: Path, *, kind: str, max_version: int) -> dict[str, Any]:
    """Read a sealed manifest: verify its checksum first, then its kind and version.

    Returns the manifest without its ``checksum`` field. Format version 1
    (written before manifests were sealed) is read without a checksum.
    Any damage raises :class:`~fastface.errors.CorruptIndexError` naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; is this a fastface {kind} directory?")
    obj = _read_json(path)
    if not isinstance(obj, dict):
        raise CorruptIndexError(f"{path}: not a {kind} manifest", str(path), "format")
    checksum = obj.get(CHECKSUM_KEY)
    if checksum is None and obj.get("format_version") == 1 and obj.get("format") == kind:
        return obj  # legacy, unsealed: every field is still checked by the reader
    if not isinstance(checksum, str) or not checksum.startswith("sha256:"):
        raise CorruptIndexError(
            f"{path}: the manifest's checksum is missing", str(path), "checksum"
        )
    want = "sha256:" + hashlib.sha256(_canonical(obj)).hexdigest()
    if checksum != want:
        raise CorruptIndexError(
            f"{path}: the manifest fails its checksum (edited or damaged); restore it from a "
            "backup",
            str(path),
            "checksum",
        )
    obj = _check_kind(obj, path, kind, max_version)
    return {k: v for k, v in obj.items() if k != CHECKSUM_KEY}


def check_record(rec: Any, where: str, pattern: re.Pattern[str] | None = None) -> FileRecord:
    """A file record from a manifest, type- and range-checked; ``where`` names it in errors.

    The file name must be one plain path component (no ``/``, no ``..``, not
    absolute) and match ``pattern`` when given.
    """
    if not isinstance(rec, dict) or set(rec) != {"file", "bytes", "sha256"}:
        raise ValueError(f"{where}: expected a record with file, bytes and sha256, got {rec!r:.80}")
    name, size, digest = rec["file"], rec["bytes"], rec["sha256"]
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise ValueError(f"{where}.file: {name!r:.80} is not a plain file name")
    if pattern is not None and not pattern.match(name):
        raise ValueError(f"{where}.file: {name!r:.80} is not a name this index writes")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"{where}.bytes: {size!r:.40} is not a size")
    if not isinstance(digest, str) or not _SHA.match(digest):
        raise ValueError(f"{where}.sha256: {digest!r:.80} is not a SHA-256")
    return {"file": name, "bytes": size, "sha256": digest}


# --- verified reading ----------------------------------------------------------------------------


class VerifiedFile:
    """The bytes of a file whose size and SHA-256 matched its record.

    Held in memory (``in_memory=True`` at open) or as a read-only mapping of
    the descriptor that was hashed (pages are read when used).
    """

    __slots__ = ("_buf", "name", "path", "size")

    def __init__(self, path: Path, buf: Any, size: int) -> None:
        self.path = str(path)
        self.name = str(path)
        self._buf = buf  # bytearray, mmap.mmap, or b"" for an empty file
        self.size = size

    def array(self) -> npt.NDArray[np.uint8]:
        """The bytes as a read-only uint8 array (no copy)."""
        if self.size == 0:
            return np.empty(0, np.uint8)
        view = np.frombuffer(self._buf, np.uint8)
        view.flags.writeable = False
        return view

    def bytes(self) -> bytes:
        return bytes(self._buf[: self.size]) if self.size else b""

    def advise_random(self) -> None:
        """Tell the kernel this mapping is read at random (``MADV_RANDOM``): a page fault
        then reads one page instead of a read-around window (128 KiB by default). For
        re-rank vectors, each candidate is one 256-byte row: read-around multiplied the
        bytes read from disk by ~32 and filled the page cache with rows nobody asked for.
        Does nothing for a file held in memory or on platforms without ``madvise``."""
        if isinstance(self._buf, mmap.mmap) and hasattr(mmap, "MADV_RANDOM"):
            self._buf.madvise(mmap.MADV_RANDOM)


def open_verified(directory: Path, rec: FileRecord, *, in_memory: bool = False) -> VerifiedFile:
    """Open ``directory / rec['file']``, check size and SHA-256, and return its bytes.

    With ``in_memory`` the file is read once into memory (hashed as it is
    read); otherwise it is hashed by reading and then memory-mapped from the
    same descriptor, so its pages stay out of the process until used.
    Raises ``FileNotFoundError`` if the file is missing (a concurrent writer
    may have replaced the manifest: the caller decides) and
    :class:`~fastface.errors.CorruptIndexError` naming the file otherwise.
    """
    path = Path(directory) / rec["file"]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CorruptIndexError(
            f"{path}: cannot be opened ({e.strerror})", str(path), "file"
        ) from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptIndexError(f"{path}: not a regular file", str(path), "file")
        size = st.st_size
        if size != rec["bytes"]:
            raise CorruptIndexError(
                f"{path}: size {size} bytes, the manifest records {rec['bytes']} (truncated "
                "or overwritten)",
                str(path),
                "bytes",
            )
        h = hashlib.sha256()
        buf: Any = b""
        if in_memory and size:
            buf = bytearray(size)
            mv = memoryview(buf)
            done = 0
            while done < size:
                n = os.readv(fd, [mv[done : done + _CHUNK]])
                if n <= 0:
                    raise CorruptIndexError(f"{path}: shrank while read", str(path), "bytes")
                h.update(mv[done : done + n])
                done += n
            del mv
        else:
            chunk = bytearray(min(_CHUNK, max(size, 1)))
            cv = memoryview(chunk)
            done = 0
            while done < size:
                n = os.preadv(fd, [cv[: min(_CHUNK, size - done)]], done)
                if n <= 0:
                    raise CorruptIndexError(f"{path}: shrank while read", str(path), "bytes")
                h.update(cv[:n])
                done += n
            del cv
            if size:
                buf = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    digest = h.hexdigest()
    if digest != rec["sha256"]:
        raise CorruptIndexError(
            f"{path}: SHA-256 {digest[:16]}... does not match the manifest's "
            f"{rec['sha256'][:16]}... (the file is corrupted)",
            str(path),
            "sha256",
        )
    return VerifiedFile(path, buf, size)


def npy_array(
    vf: VerifiedFile, dtype: Any, shape: tuple[int | None, ...], *, mmap: bool = True
) -> npt.NDArray[Any]:
    """The array in a verified ``.npy`` file, after checking its header: dtype, shape, size.

    ``None`` in ``shape`` accepts any length on that axis.
    """
    want = np.dtype(dtype)
    raw = vf.array()
    bio = io.BytesIO(bytes(raw[: min(raw.size, 1 << 16)]))
    try:
        version = np.lib.format.read_magic(bio)
        if version == (1, 0):
            hshape, fortran, hdtype = np.lib.format.read_array_header_1_0(bio)
        elif version == (2, 0):
            hshape, fortran, hdtype = np.lib.format.read_array_header_2_0(bio)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, SyntaxError, TypeError, OverflowError) as e:
        raise CorruptIndexError(f"{vf.path}: not a readable .npy file ({e})", vf.path, "npy") from e
    offset = bio.tell()
    shape_ok = len(hshape) == len(shape) and all(
        w is None or h == w for h, w in zip(hshape, shape, strict=True)
    )
    got = tuple(int(h) for h in hshape)
    if fortran or hdtype != want or not shape_ok:
        raise CorruptIndexError(
            f"{vf.path}: holds {hdtype} {tuple(hshape)}{' (Fortran order)' if fortran else ''}, "
            f"expected {want} {tuple(shape)}",
            vf.path,
            "npy",
        )
    if any(h > raw.size for h in got) or (
        int(np.prod(got, dtype=np.float64)) * want.itemsize != raw.size - offset
    ):
        raise CorruptIndexError(
            f"{vf.path}: {raw.size - offset} data bytes do not hold {want} {got}", vf.path, "npy"
        )
    arr = raw[offset:].view(want).reshape(got)
    if not mmap:
        arr = arr.copy()
        arr.flags.writeable = False
    return arr


# --- the writer lock -----------------------------------------------------------------------------


class WriterLock:
    """An exclusive advisory lock (``flock``) on ``<dir>/.lock`` for one writer process."""

    def __init__(self, directory: Path, *, mode: int = 0o600) -> None:
        self.path = Path(directory) / ".lock"
        self.mode = mode
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(
                self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, self.mode
            )
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CorruptIndexError(
                    f"{self.path}: is a symbolic link; remove it", str(self.path), "lock"
                ) from e
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise IndexLockedError(
                    f"{self.path.parent}: another process has it open for writing; close it "
                    "there or open this one read-only"
                ) from e
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()
