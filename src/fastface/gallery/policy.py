"""What the gallery accepts: legal bases, texts, times, purposes, unit vectors, cosine thresholds.

Every check here runs before anything is written, so a refused call changes
nothing. Messages say what was expected, what came, and how to fix it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import numpy.typing as npt

from .._validation import as_queries, check_matrix

__all__ = [
    "LEGAL_BASES",
    "check_grant",
    "check_purpose",
    "check_text",
    "check_threshold",
    "iso",
    "now",
    "parse_time",
    "queries",
    "unit_rows",
]

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

#: How far from 1 an enrolled embedding's L2 norm may be (float16 round trips stay well inside).
NORM_TOLERANCE = 1e-3
SUBJECT_LIMIT = 256  # characters of a subject id


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).isoformat(timespec="microseconds")


def parse_time(value: Any, name: str) -> dt.datetime:
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


def check_text(value: Any, name: str, *, optional: bool = False, limit: int = 1024) -> str | None:
    """A non-empty ``str`` of at most ``limit`` characters (``None`` allowed when optional)."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a str, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{name}: must not be empty")
    if len(value) > limit:
        raise ValueError(f"{name}: at most {limit} characters, got {len(value)}")
    if "\x00" in value:
        raise ValueError(f"{name}: must not contain NUL characters")
    return value


def check_grant(
    legal_basis: Any,
    consent_ref: Any,
    source: Any,
    retain_until: Any,
    requester: Any,
) -> str | None:
    """Check an enrolment's legal record; returns ``retain_until`` as ISO text (or ``None``)."""
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
    check_text(consent_ref, "consent_ref", optional=True)
    check_text(source, "source", optional=True)
    check_text(requester, "requester", optional=True, limit=256)
    if legal_basis == "consent" and consent_ref is None:
        raise ValueError(
            "consent_ref: legal_basis='consent' needs a reference to the recorded consent"
        )
    if retain_until is None:
        return None
    t = parse_time(retain_until, "retain_until")
    if t <= now():
        raise ValueError(f"retain_until: {iso(t)} is already past")
    return iso(t)


def check_purpose(purpose: Any, gallery_purpose: str) -> None:
    if not isinstance(purpose, str):
        raise TypeError(f"purpose: expected a str, got {type(purpose).__name__}")
    if purpose != gallery_purpose:
        raise PermissionError(
            f"purpose {purpose!r} is not this gallery's purpose {gallery_purpose!r}; a gallery "
            "may only be searched for the purpose its records were collected for"
        )


def check_threshold(threshold: Any, name: str = "threshold") -> float:
    """A cosine similarity threshold in [-1, 1]."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)):
        raise TypeError(f"{name}: expected a number (a cosine similarity), got {threshold!r}")
    t = float(threshold)
    if not np.isfinite(t) or not -1.0 <= t <= 1.0:
        raise ValueError(
            f"{name}: expected a cosine similarity in [-1, 1], got {threshold!r}; scores are "
            "cosine similarities of unit vectors"
        )
    return t


def unit_rows(x: Any, name: str, d: int) -> npt.NDArray[np.float32]:
    """Embeddings to enrol: float32 ``(n, d)``, every row of unit L2 norm (cosine scores)."""
    x = check_matrix(x, name, d=d)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    bad = np.abs(norms - 1.0) > NORM_TOLERANCE
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name}: expected L2-normalised rows (norm 1 +- {NORM_TOLERANCE:g}; scores are "
            f"cosine similarities), row {i} has norm {norms[i]:.6g}; pass "
            "x / np.linalg.norm(x, axis=1, keepdims=True)"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


def queries(q: Any, name: str, d: int) -> npt.NDArray[np.float32]:
    """Query embeddings as float32 ``(nq, d)`` unit rows (normalised here; zero rows refused)."""
    x = np.array(as_queries(q, name, d=d), dtype=np.float32, copy=True)
    norms = np.linalg.norm(x, axis=1)
    if (norms == 0).any():
        raise ValueError(f"{name}: row {int(np.flatnonzero(norms == 0)[0])} is all zeros")
    x /= norms[:, None]
    return x
