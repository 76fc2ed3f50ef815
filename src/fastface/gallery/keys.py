"""Keys: the gallery key (audit chain, row checks, subject look-up) and per-subject secrets.

The gallery key
    32 random bytes, never stored in the database: by default in an
    owner-only file ``gallery.key`` beside it, or held by the operator
    (``key=`` bytes or ``key_file=`` elsewhere). Three keys are derived from
    it with HMAC-SHA256: one keys the audit chain, one the check values of
    database rows, one the look-up tags of subject ids. The configuration
    keeps a check value of the key, so a wrong key is refused at open.

Per-subject secrets (crypto-shredding)
    Every subject gets 32 random bytes, kept in ``subjects.keys``: a file of
    fixed 64-byte slots (subject number, secret, keyed check value). Audit
    entries name a subject by a pseudonym derived from its secret; the
    database keeps its id and free-text fields only encrypted with it. An
    erasure overwrites the slot with zeros in place (``pwrite`` + ``fsync``):
    no copy of the secret exists elsewhere (the slot is never moved), so from
    then on nothing can decrypt the subject's fields or link its pseudonym,
    whatever stale pages SQLite keeps.

Encryption
    Standard-library construction, encrypt-then-MAC: a SHAKE-256 keystream
    keyed by a sub-key of the secret and a random 16-byte nonce, and an
    HMAC-SHA256 tag (16 bytes) over nonce, associated data and ciphertext
    under another sub-key. A damaged or moved ciphertext fails its tag.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import os
import secrets
import stat
import struct
import threading
from pathlib import Path
from typing import Any

from ..errors import CorruptGalleryError
from . import files

__all__ = ["GalleryKeys", "SubjectSecrets", "load_keys", "open_sealed", "pseudonym", "seal"]

KEY_FILE = "gallery.key"
SECRETS_FILE = "subjects.keys"
KEY_FORMAT = "fastface.gallery.key"
MIN_KEY_BYTES = 32

_MAGIC = b"FFGSLOT1"
_HEADER = 64
_SLOT = 64
_SLOT_FMT = "<Q32s8s16x"  # subject number, secret, check value, zero padding
_NONCE = 16
_TAG = 16


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


class GalleryKeys:
    """The keys derived from a gallery's master key (never stored in the database)."""

    __slots__ = ("audit", "check", "lookup", "rows")

    def __init__(self, master: bytes) -> None:
        if not isinstance(master, (bytes, bytearray)) or len(master) < MIN_KEY_BYTES:
            got = (
                f"{len(master)}"
                if isinstance(master, (bytes, bytearray))
                else type(master).__name__
            )
            raise ValueError(f"key: expected at least {MIN_KEY_BYTES} random bytes, got {got}")
        master = bytes(master)
        self.audit = _hmac(master, b"fastface/gallery/audit-chain")
        self.rows = _hmac(master, b"fastface/gallery/row-check")
        self.lookup = _hmac(master, b"fastface/gallery/subject-lookup")
        self.check = _hmac(master, b"fastface/gallery/key-check")[:16].hex()

    def lookup_tag(self, subject_id: str) -> bytes:
        """The database's look-up tag of a subject id (16 bytes; the id itself is never stored)."""
        return _hmac(self.lookup, subject_id.encode("utf-8"))[:16]

    def row_check(self, kind: bytes, *fields: Any) -> bytes:
        """Keyed check value of a database row (16 bytes)."""
        body = json.dumps([kind.decode(), *[_plain(f) for f in fields]], separators=(",", ":"))
        return _hmac(self.rows, body.encode())[:16]


def _plain(v: Any) -> Any:
    return v.hex() if isinstance(v, (bytes, bytearray, memoryview)) else v


def new_master() -> bytes:
    return secrets.token_bytes(32)


def write_key_file(path: Path, master: bytes) -> None:
    """Write a new key file (it must not exist), owner-only."""
    text = json.dumps({"format": KEY_FORMAT, "format_version": 1, "key": master.hex()})
    fd = files.create_exclusive(Path(path))
    try:
        os.write(fd, (text + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_key_file(path: Path) -> bytes:
    """The master key from a key file (owner-only, not a symlink)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT,
            f"{path}: no such key file; a gallery cannot be opened without its key",
            str(path),
        ) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PermissionError(
                errno.EPERM, f"{path}: is a symbolic link; refusing to read a key through it"
            ) from e
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise CorruptGalleryError(f"{path}: not a regular file", str(path), "key")
        if st.st_mode & 0o077:
            raise PermissionError(
                errno.EPERM,
                f"{path}: the key file is readable or writable by others (mode "
                f"{oct(st.st_mode & 0o777)}); run chmod 600 on it",
                str(path),
            )
        raw = f.read(4096)
    try:
        obj = json.loads(raw.decode())
        if obj.get("format") != KEY_FORMAT or obj.get("format_version") != 1:
            raise ValueError("not a gallery key file")
        key = bytes.fromhex(obj["key"])
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise CorruptGalleryError(
            f"{path}: not a valid gallery key file ({e})", str(path), "key"
        ) from e
    if len(key) < MIN_KEY_BYTES:
        raise CorruptGalleryError(f"{path}: the key is too short", str(path), "key")
    return key


def load_keys(
    gallery: Path, location: str, expected_check: str, key: bytes | None, key_file: Any
) -> GalleryKeys:
    """The gallery's keys from ``key``, ``key_file`` or (by default) ``gallery/gallery.key``."""
    if key is not None and key_file is not None:
        raise ValueError("pass key= or key_file=, not both")
    if key is not None:
        keys = GalleryKeys(key)
    elif key_file is not None:
        keys = GalleryKeys(read_key_file(Path(key_file)))
    elif location == "gallery":
        keys = GalleryKeys(read_key_file(gallery / KEY_FILE))
    else:
        raise ValueError(
            f"{gallery}: this gallery's key is kept outside it; pass key= (bytes) or key_file="
        )
    if not hmac.compare_digest(keys.check, expected_check):
        raise ValueError(
            f"key: it is not the key of {gallery} (its check value differs); pass the key the "
            "gallery was created with"
        )
    return keys


# --- encryption under a subject's secret --------------------------------------------------------
def _subkeys(secret: bytes) -> tuple[bytes, bytes]:
    return _hmac(secret, b"fastface/gallery/enc"), _hmac(secret, b"fastface/gallery/mac")


def seal(secret: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """``nonce || ciphertext || tag`` of ``plaintext`` under ``secret`` (``ad`` authenticated)."""
    enc, mac = _subkeys(secret)
    nonce = secrets.token_bytes(_NONCE)
    stream = hashlib.shake_256(b"fastface/gallery/stream/v1" + enc + nonce).digest(len(plaintext))
    ct = (int.from_bytes(plaintext, "little") ^ int.from_bytes(stream, "little")).to_bytes(
        len(plaintext), "little"
    )
    tag = _hmac(mac, nonce + struct.pack("<I", len(ad)) + ad + ct)[:_TAG]
    return nonce + ct + tag


def open_sealed(secret: bytes, blob: bytes, ad: bytes) -> bytes | None:
    """The plaintext of :func:`seal`'s output, or ``None`` when the tag does not verify."""
    if len(blob) < _NONCE + _TAG:
        return None
    enc, mac = _subkeys(secret)
    nonce, ct, tag = blob[:_NONCE], blob[_NONCE:-_TAG], blob[-_TAG:]
    want = _hmac(mac, nonce + struct.pack("<I", len(ad)) + ad + ct)[:_TAG]
    if not hmac.compare_digest(tag, want):
        return None
    stream = hashlib.shake_256(b"fastface/gallery/stream/v1" + enc + nonce).digest(len(ct))
    return (int.from_bytes(ct, "little") ^ int.from_bytes(stream, "little")).to_bytes(
        len(ct), "little"
    )


def pseudonym(secret: bytes) -> str:
    """How the audit log names a subject: 32 hex digits derived from its secret."""
    return _hmac(secret, b"fastface/gallery/pseudonym")[:16].hex()


# --- the subject secrets file -------------------------------------------------------------------
class SubjectSecrets:
    """``subjects.keys``: one fixed 64-byte slot per subject, zeroed in place at erasure.

    Slot ``i`` lives at byte ``64 + 64 * i``: subject number (uint64, 0 =
    free), secret (32 bytes), check value (8 bytes: keyed BLAKE2b of slot number,
    subject number and secret under the row key), zero padding. Slots are
    never moved or copied, so zeroing one destroys the only copy.
    """

    def __init__(self, path: Path, fd: int, row_key: bytes, writable: bool) -> None:
        self.path = path
        self._fd: int | None = fd
        self._key = row_key
        self.writable = writable
        self._lock = threading.Lock()
        self._free: list[int] | None = None
        self._n = 0

    @classmethod
    def create(cls, path: Path, row_key: bytes) -> SubjectSecrets:
        fd = files.create_exclusive(path)
        try:
            os.write(fd, _MAGIC + struct.pack("<I", _SLOT) + bytes(_HEADER - len(_MAGIC) - 4))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, row_key, True)

    @classmethod
    def open(cls, path: Path, row_key: bytes, *, writable: bool) -> SubjectSecrets:
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise CorruptGalleryError(
                f"{path}: the subject key store is missing; restore it from a backup (without "
                "it no subject's records can be read)",
                str(path),
                "file",
            ) from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CorruptGalleryError(
                    f"{path}: is a symbolic link; refusing to use it", str(path), "file"
                ) from e
            raise
        obj = cls(path, fd, row_key, writable)
        try:
            head = os.pread(fd, _HEADER, 0)
            size = os.fstat(fd).st_size
            if head[:8] != _MAGIC or struct.unpack("<I", head[8:12])[0] != _SLOT:
                raise CorruptGalleryError(
                    f"{path}: not a subject key store (bad header)", str(path), "header"
                )
            if size < _HEADER or (size - _HEADER) % _SLOT:
                raise CorruptGalleryError(
                    f"{path}: {size} bytes is not a whole number of slots (truncated?)",
                    str(path),
                    "size",
                )
        except BaseException:
            obj.close()
            raise
        obj._n = (size - _HEADER) // _SLOT
        return obj

    def _fd_or_raise(self) -> int:
        if self._fd is None:
            raise RuntimeError(f"{self.path}: closed")
        return self._fd

    def _check(self, slot: int, sid: int, secret: bytes) -> bytes:
        return hashlib.blake2b(
            struct.pack("<QQ", slot, sid) + secret, digest_size=8, key=self._key, person=b"slot"
        ).digest()

    def _decode(self, slot: int, raw: bytes) -> tuple[int, bytes] | None:
        if len(raw) != _SLOT:
            raise CorruptGalleryError(
                f"{self.path}: slot {slot} is beyond the end of the file", str(self.path), "size"
            )
        if raw == bytes(_SLOT):
            return None
        sid, secret, check = struct.unpack(_SLOT_FMT, raw)
        if raw[56:] != bytes(8) or not hmac.compare_digest(check, self._check(slot, sid, secret)):
            raise CorruptGalleryError(
                f"{self.path}: slot {slot} fails its check value (damaged or edited)",
                str(self.path),
                f"slot[{slot}]",
            )
        return int(sid), bytes(secret)

    def read(self, slot: int) -> tuple[int, bytes] | None:
        """``(subject number, secret)`` in ``slot``, or ``None`` if it is free (zeroed)."""
        fd = self._fd_or_raise()
        return self._decode(slot, os.pread(fd, _SLOT, _HEADER + _SLOT * slot))

    def scan(self) -> dict[int, int]:
        """Every used slot: ``{slot: subject number}`` (check values verified)."""
        fd = self._fd_or_raise()
        size = os.fstat(fd).st_size
        n = (size - _HEADER) // _SLOT
        data = os.pread(fd, n * _SLOT, _HEADER) if n else b""
        used: dict[int, int] = {}
        free: list[int] = []
        for slot in range(n):
            got = self._decode(slot, data[slot * _SLOT : (slot + 1) * _SLOT])
            if got is None:
                free.append(slot)
            else:
                used[slot] = got[0]
        self._n = n
        self._free = free[::-1]  # pop() takes the lowest
        return used

    def allocate(self, entries: list[tuple[int, bytes]]) -> list[int]:
        """Write ``(subject number, secret)`` pairs into free slots (fsync); their slots."""
        fd = self._fd_or_raise()
        with self._lock:
            if self._free is None:
                self.scan()
            assert self._free is not None
            slots: list[int] = []
            try:
                for sid, secret in entries:
                    slot = self._free.pop() if self._free else self._n
                    if slot == self._n:
                        self._n += 1
                    raw = struct.pack(_SLOT_FMT, sid, secret, self._check(slot, sid, secret))
                    slots.append(slot)
                    _pwrite_all(fd, raw, _HEADER + _SLOT * slot)
                os.fsync(fd)
            except BaseException:
                self._free = None  # rescan next time: some slots may be written
                raise
        return slots

    def shred(self, pairs: list[tuple[int, int]]) -> int:
        """Zero each ``(slot, subject number)`` that still holds that subject (fsync); how many."""
        fd = self._fd_or_raise()
        done = 0
        with self._lock:
            for slot, sid in pairs:
                if slot >= self._n and slot >= (os.fstat(fd).st_size - _HEADER) // _SLOT:
                    continue
                raw = os.pread(fd, _SLOT, _HEADER + _SLOT * slot)
                if raw == bytes(_SLOT):
                    continue
                if struct.unpack("<Q", raw[:8])[0] != sid:
                    continue  # not this subject's slot (never reused before shredding)
                _pwrite_all(fd, bytes(_SLOT), _HEADER + _SLOT * slot)
                done += 1
                if self._free is not None:
                    self._free.append(slot)
                    self._free.sort(reverse=True)
            os.fsync(fd)
        return done

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
