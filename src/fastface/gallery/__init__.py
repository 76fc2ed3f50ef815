"""A face gallery held under a recorded legal basis: audited exact search, export, erasure.

A gallery is a directory::

    <path>/gallery.json     purpose, embedder, index kind and directory, key check (sealed)
    <path>/gallery.key      the gallery key (owner-only; absent when the operator keeps it)
    <path>/subjects.keys    per-subject secrets, fixed slots zeroed in place at erasure
    <path>/meta.sqlite      records, grants, encrypted subject ids, journal, audit, receipts
    <path>/index-<n>/       the vectors, once: a ShardedIndex (flat while small, then IVF-PQ)

The facade is :class:`Gallery`; each job has its module: :mod:`.policy`
(what is accepted), :mod:`.keys` (gallery key, subject secrets,
encryption), :mod:`.records` (schema, integrity, rows), :mod:`.audit` (the
keyed chain), :mod:`.journal` and :mod:`.recovery` (multi-step changes,
crash replay, reconciliation), :mod:`.enrolment`, :mod:`.erasure`,
:mod:`.access` (search, export, plans), :mod:`.vectors` (flat or IVF-PQ),
:mod:`.results` (what calls return). ``docs/gallery.md`` explains how
erasure, crypto-shredding, the audit chain and reconciliation work.
"""

from .facade import Gallery
from .policy import LEGAL_BASES
from .results import ErasurePlan, ErasureReceipt, GalleryMatches, SubjectExport

__all__ = [
    "LEGAL_BASES",
    "ErasurePlan",
    "ErasureReceipt",
    "Gallery",
    "GalleryMatches",
    "SubjectExport",
]
