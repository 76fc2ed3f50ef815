"""The library's exception types.

Bad arguments raise the built-in ``TypeError`` / ``ValueError`` /
``FileNotFoundError``; data on disk that cannot be trusted raises one of these.
"""

from __future__ import annotations

__all__ = [
    "AuditChainError",
    "CorruptGalleryError",
    "CorruptIndexError",
    "DiskFullError",
    "EmptyIndexError",
    "FastfaceError",
    "IndexLockedError",
    "NotTrainedError",
    "ReadOnlyIndexError",
    "UnknownSubjectError",
    "UnsupportedFormatError",
]


class FastfaceError(Exception):
    """Base class of fastface's own errors."""


class CorruptIndexError(FastfaceError):
    """A file of an index is missing, truncated, fails its checksum or holds invalid fields.

    ``path`` names the offending file and ``field`` (when known) the entry
    or header field that failed, e.g. ``"shards[2].count"`` or ``"header.d"``.
    """

    def __init__(self, message: str, path: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.field = field


class DiskFullError(FastfaceError, OSError):
    """A write failed for lack of space (or a file size limit); nothing was committed.

    Behaves as the ``OSError`` it replaces (``errno``, ``strerror``,
    ``filename``); ``path`` names the file being written. The index in memory
    and on disk is as it was before the call that raised.
    """

    def __init__(self, errno_: int, message: str, path: str) -> None:
        super().__init__(errno_, message, path)
        self.path = path

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


class UnsupportedFormatError(FastfaceError, ValueError):
    """An index was written by a newer (or unknown) format version."""


class IndexLockedError(FastfaceError):
    """Another process holds the write lock of an index directory."""


class NotTrainedError(FastfaceError, RuntimeError):
    """The index must be trained before this call; call ``train(x)`` first."""


class EmptyIndexError(FastfaceError, RuntimeError):
    """The index holds no vectors; call ``add(x)`` first."""


class ReadOnlyIndexError(FastfaceError, RuntimeError):
    """The index was opened memory-mapped or read-only and cannot change."""


class CorruptGalleryError(CorruptIndexError):
    """A file of a gallery is damaged or disagrees with the others.

    Raised for a database that fails SQLite's integrity check, a write-ahead
    log whose committed frames fail their checksums, a record, grant or
    subject row that fails its keyed check, a damaged key store or
    configuration. ``path`` names the file; ``field`` (when known) the table
    row or entry, e.g. ``"records[id=123]"``.
    """


class AuditChainError(CorruptGalleryError):
    """A gallery's audit log fails its keyed chain: an entry was edited, removed or added.

    ``seq`` is the sequence number of the first entry that does not verify.
    """

    def __init__(self, message: str, path: str | None = None, seq: int | None = None) -> None:
        super().__init__(message, path)
        self.seq = seq


class UnknownSubjectError(FastfaceError, LookupError):
    """A gallery holds no (active) record of the subject named in the call."""
