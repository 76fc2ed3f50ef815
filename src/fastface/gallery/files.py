"""Owner-only files without the umask: explicit modes, no symlinks followed, atomic replacement.

Everything the gallery writes outside SQLite and the index goes through here:
the key file, the subject key store, the configuration and exports. Files are
created with ``os.open(..., O_CREAT | O_EXCL | O_NOFOLLOW, 0o600)`` and the
mode is set again on the descriptor (``fchmod``), so neither the process
umask (which the gallery never changes: other threads share it) nor a file
planted at the name can widen or redirect them. Directories are ``0o700``.
Writes into a directory go through a descriptor of that directory opened
with ``O_NOFOLLOW``, so a symlink swapped in for it is refused, not followed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["create_exclusive", "open_private_dir", "write_atomic"]

FILE_MODE = 0o600
DIR_MODE = 0o700
_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW


def open_private_dir(path: Path, *, create: bool = True) -> int:
    """A descriptor of directory ``path`` (created ``0o700`` if missing); symlinks refused.

    An existing directory must belong to this user; it keeps its mode (the
    files written into it are ``0o600`` whatever it is).
    """
    path = Path(path)
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, DIR_MODE)
            os.chmod(path, DIR_MODE, follow_symlinks=False)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _FLAGS)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            kind = "a symbolic link" if os.path.islink(path) else "not a directory"
            raise NotADirectoryError(
                errno.ENOTDIR, f"{path}: is {kind}; refusing to write through it", str(path)
            ) from e
        raise
    st = os.fstat(fd)
    if st.st_uid != os.getuid():
        os.close(fd)
        raise PermissionError(
            errno.EPERM, f"{path}: belongs to another user; pick a directory of your own", str(path)
        )
    return fd


def create_exclusive(path: Path, mode: int = FILE_MODE, *, dir_fd: int | None = None) -> int:
    """Create ``path`` (it must not exist, symlinks included) with exactly ``mode``; an fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _FLAGS, mode, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, chunks: Iterable[Any]) -> None:
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        while len(view):
            n = os.write(fd, view)
            view = view[n:]


def write_atomic(
    directory: Path | int, name: str, chunks: Iterable[Any], mode: int = FILE_MODE
) -> None:
    """Write ``name`` in ``directory`` (a path or a directory fd) atomically, owner-only.

    The data goes to an unpredictable temporary name created with
    ``O_EXCL | O_NOFOLLOW``, is fsynced and renamed over ``name`` (a symlink
    at ``name`` is replaced, never followed).
    """
    own = not isinstance(directory, int)
    dir_fd = directory if isinstance(directory, int) else open_private_dir(directory, create=False)
    try:
        for _ in range(8):
            tmp = f".{name}.tmp-{secrets.token_hex(8)}"
            try:
                fd = create_exclusive(Path(tmp), mode, dir_fd=dir_fd)
            except FileExistsError:
                continue  # something sits at that name (planted?): draw another
            break
        else:  # pragma: no cover - eight collisions of 64 random bits
            raise FileExistsError(errno.EEXIST, "no free temporary name", name)
        try:
            try:
                _write_all(fd, chunks)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.fsync(dir_fd)
    finally:
        if own:
            os.close(dir_fd)


def is_regular(path: Path) -> bool:
    """``path`` exists and is a regular file (not a symlink)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False
