"""What the gallery hands back: matches, exports, erasure plans and receipts (plain data).

None of these objects holds a reference to the gallery or calls back into
it; an erasure plan is confirmed with :meth:`Gallery.confirm_erasure
<fastface.gallery.Gallery.confirm_erasure>`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from . import files

__all__ = ["ErasurePlan", "ErasureReceipt", "GalleryMatches", "SubjectExport"]


@dataclass(frozen=True)
class GalleryMatches:
    """Result of :meth:`Gallery.search <fastface.gallery.Gallery.search>`.

    ``scores`` and ``record_ids`` are shaped ``(nq, k)``, padded with
    ``-inf`` and ``-1``; ``subject_ids[i]`` lists the subjects of query
    ``i``'s matches, best first (only real matches, after ``threshold``).
    Scores are cosine similarities when ``exact`` is true (the default), PQ
    estimates of them otherwise.
    """

    scores: npt.NDArray[np.float32]
    record_ids: npt.NDArray[np.int64]
    subject_ids: list[list[str]]
    exact: bool = True

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
        return {"exact": self.exact, "matches": out}


@dataclass(frozen=True)
class ErasureReceipt:
    """Proof of an erasure (GDPR art. 17).

    ``invisible_ms``: from the request until no search (in any process) can
    return the records. ``purge_status`` is ``"purged"`` when every byte of
    the records' vectors and codes is gone from the index files and the
    subjects' secrets are shredded (their ids then cannot be decrypted, nor
    their audit entries linked), or ``"pending"`` with ``purge_note`` saying
    what waits (e.g. the database log held by a reader); the gallery
    finishes it later (:meth:`~fastface.gallery.Gallery.finish_purges`,
    :meth:`~fastface.gallery.Gallery.compact`, the next open) and its status
    shows it meanwhile. ``audit_head`` is the audit chain's head after this
    erasure: keep it, and :meth:`~fastface.gallery.Gallery.verify_receipt`
    proves later that the log still holds it (truncation is detected).
    ``digest`` is a keyed MAC of the other fields, so a receipt cannot be
    forged without the gallery key.
    """

    subject_ids: tuple[str, ...]
    reason: str
    records_erased: int
    subjects_shredded: int
    shards_rewritten: int
    requested_at: str
    invisible_at: str
    invisible_ms: float
    purge_status: str
    purged_at: str | None
    purge_ms: float | None
    purge_note: str | None
    index_generation: int
    audit_head: dict[str, Any]
    digest: str

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["subject_ids"] = list(self.subject_ids)
        return d

    @property
    def purged(self) -> bool:
        return self.purge_status == "purged"


@dataclass(frozen=True)
class SubjectExport:
    """Everything a gallery holds about one subject (GDPR art. 15).

    ``records[i]`` is the metadata of the vector ``embeddings[i]`` (read
    from the index's stored vectors: exactly the enrolled float32 values when
    the gallery stores float32, their float16 rounding otherwise, as
    ``stored_as`` says; a record whose vector is missing has a row of NaN
    and ``"vector": "missing"``). ``dedup`` lists the near-duplicate groups
    the records belong to; ``audit`` every audit entry naming the subject's
    pseudonym (each search that returned it, its enrolments, earlier exports).
    """

    subject_id: str
    exported_at: str
    gallery: dict[str, Any]
    records: list[dict[str, Any]]
    embeddings: npt.NDArray[np.float32]
    stored_as: str
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
                "stored_as": self.stored_as,
                "shape": list(self.embeddings.shape),
                "row_order": "records",
            },
            "dedup": self.dedup,
            "audit": self.audit,
        }

    def write(self, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``subject.json`` and ``embeddings.npy`` into ``directory``, owner-only.

        The directory is created ``0o700`` if missing (a symlink in its place
        is refused); each file is written to an unpredictable temporary name
        (``O_EXCL | O_NOFOLLOW``, mode ``0o600``) and renamed, so a file or
        symlink planted at any name is replaced or refused, never followed.
        """
        directory = Path(directory)
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(self.embeddings, np.float32), allow_pickle=False)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"
        fd = files.open_private_dir(directory)
        try:
            files.write_atomic(fd, "embeddings.npy", [buf.getbuffer()])
            files.write_atomic(fd, "subject.json", [text.encode()])
        finally:
            os.close(fd)
        return directory / "subject.json", directory / "embeddings.npy"


@dataclass(frozen=True)
class ErasurePlan:
    """What :meth:`Gallery.erase_by_face <fastface.gallery.Gallery.erase_by_face>` found.

    ``matches`` lists the records whose stored vector scored at least
    ``threshold`` (cosine) against the photo: record id, subject id, score,
    best first. ``record_ids`` is what confirming erases: the matched
    records or, with ``whole_subjects``, every record of the matched
    subjects; ``subjects`` counts them per subject. Nothing changes until
    the plan is passed to :meth:`Gallery.confirm_erasure
    <fastface.gallery.Gallery.confirm_erasure>`.
    """

    matches: list[dict[str, Any]]
    record_ids: npt.NDArray[np.int64]
    subjects: dict[str, int]
    threshold: float
    whole_subjects: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "matches": self.matches,
            "records_to_erase": int(self.record_ids.size),
            "subjects": self.subjects,
            "threshold": self.threshold,
            "whole_subjects": self.whole_subjects,
        }
