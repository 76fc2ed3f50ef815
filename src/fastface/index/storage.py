"""Files on disk: atomic writes, checksums, the manifest and the writer lock.

Every file is written to a temporary name in the same directory, fsynced and
renamed over its final name, then the directory is fsynced, so a crash leaves
either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptIndexError, IndexLockedError, UnsupportedFormatError

__all__ = [
    "FileRecord",
    "WriterLock",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_npy",
    "fsync_dir",
    "read_json_checked",
    "sha256_file",
    "verify_file",
]

_CHUNK = 1 << 22

FileRecord = dict[str, Any]  # {"file": name, "bytes": int, "sha256": hex}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> FileRecord:
    """Write ``data`` to ``path`` atomically; return its manifest record."""
    path = Path(path)
    tmp = _tmp_name(path)
    digest = hashlib.sha256(data).hexdigest()
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return {"file": path.name, "bytes": len(data), "sha256": digest}


def atomic_write_npy(path: Path, arr: np.ndarray) -> FileRecord:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return atomic_write_bytes(path, buf.getbuffer())


def atomic_write_json(path: Path, obj: Any) -> FileRecord:
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    return atomic_write_bytes(path, data)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_file(directory: Path, rec: FileRecord) -> Path:
    """Check that ``rec['file']`` exists with the recorded size and SHA-256."""
    path = Path(directory) / rec["file"]
    if not path.exists():
        raise CorruptIndexError(
            f"{path}: listed in the manifest but missing; restore it from a backup", str(path)
        )
    size = path.stat().st_size
    if size != rec["bytes"]:
        raise CorruptIndexError(
            f"{path}: size {size} bytes, the manifest records {rec['bytes']} (truncated or "
            "overwritten)",
            str(path),
        )
    digest = sha256_file(path)
    if digest != rec["sha256"]:
        raise CorruptIndexError(
            f"{path}: SHA-256 {digest[:16]}... does not match the manifest's "
            f"{rec['sha256'][:16]}... (the file is corrupted)",
            str(path),
        )
    return path


def read_json_checked(path: Path, *, kind: str, max_version: int) -> dict[str, Any]:
    """Read a manifest-like JSON file, checking its kind and format version."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; is this a fastface {kind} directory?")
    try:
        obj = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptIndexError(f"{path}: not valid JSON ({e})", str(path)) from e
    if not isinstance(obj, dict) or obj.get("format") != kind:
        raise CorruptIndexError(f"{path}: not a {kind} manifest", str(path))
    version = obj.get("format_version")
    if not isinstance(version, int):
        raise CorruptIndexError(f"{path}: format_version missing", str(path))
    if version > max_version:
        raise UnsupportedFormatError(
            f"{path}: written by format version {version}, this fastface reads up to "
            f"{max_version}; upgrade fastface to open it"
        )
    return obj


class WriterLock:
    """An exclusive advisory lock (``flock``) on ``<dir>/.lock`` for one writer process."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
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
