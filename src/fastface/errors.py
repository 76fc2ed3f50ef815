"""The library's exception types.

Bad arguments raise the built-in ``TypeError`` / ``ValueError`` /
``FileNotFoundError``; data on disk that cannot be trusted raises one of these.
"""

from __future__ import annotations

__all__ = [
    "CorruptIndexError",
    "EmptyIndexError",
    "FastfaceError",
    "IndexLockedError",
    "NotTrainedError",
    "ReadOnlyIndexError",
    "UnsupportedFormatError",
]


class FastfaceError(Exception):
    """Base class of fastface's own errors."""


class CorruptIndexError(FastfaceError):
    """A file of an index is missing, truncated or does not match its checksum.

    ``path`` names the offending file.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


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
