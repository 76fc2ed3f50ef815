"""Reading the gallery for a person: audited search, the art. 15 export, finding a face to erase.

Every result goes through the database: an index id becomes a match only if
it is a record now (rows verified with their keyed checks), so a search in
another process whose index is a few commits old still never returns an
erased record. Scores are cosine similarities (unit vectors, inner product):
exact by default (stored vectors), PQ estimates only on request.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from ..kernels.exact import scores as exact_scores
from . import policy
from .context import Context, Subject
from .results import ErasurePlan, GalleryMatches, SubjectExport

__all__ = ["export", "plan_by_face", "search"]


def search(
    ctx: Context,
    q: npt.NDArray[np.float32],
    k: int,
    *,
    requester: str,
    purpose: str,
    threshold: float | None,
    exact: bool,
    nprobe: int | None,
    rerank: int | None,
) -> GalleryMatches:
    if threshold is not None and not exact:
        raise ValueError(
            "threshold: needs exact scores (cosine similarities); PQ estimates (exact=False) "
            "are not cosine similarities. Drop threshold or search with exact=True"
        )
    D, I = ctx.store.search(q, k, exact=exact, nprobe=nprobe, rerank=rerank)
    id2gid = ctx.db.resolve(I)
    subj = ctx.subjects_of_gids(list(id2gid.values()))
    keep = np.zeros(I.shape, bool)
    if id2gid:
        known = np.fromiter(id2gid.keys(), np.int64, len(id2gid))
        keep = np.isin(I, known)
    if threshold is not None:
        keep &= threshold <= D
    scores = np.full_like(D, -np.inf)
    rids = np.full_like(I, -1)
    names: list[list[str]] = []
    returned: set[str] = set()
    for r in range(I.shape[0]):
        cols = np.flatnonzero(keep[r])
        scores[r, : cols.size] = D[r, cols]
        rids[r, : cols.size] = I[r, cols]
        row = [subj[id2gid[int(i)]] for i in I[r, cols]]
        names.append([s.subject_id for s in row])
        returned.update(s.pseudonym for s in row)
    with ctx.db.txn() as conn:
        ctx.audit.append(
            conn,
            "search",
            requester=requester,
            purpose=purpose,
            subjects=returned,
            detail={
                "nq": int(q.shape[0]),
                "k": int(k),
                "results": int(sum(len(row) for row in names)),
                "threshold": threshold,
                "exact": bool(exact or ctx.store.kind == "flat"),
            },
        )
    return GalleryMatches(scores, rids, names, exact=bool(exact or ctx.store.kind == "flat"))


def _records_of(ctx: Context, subj: Subject) -> tuple[list[dict[str, Any]], npt.NDArray[np.int64]]:
    grants = ctx.db.grants_of(subj.sid)
    rows = ctx.db.records_of_grants([int(g[0]) for g in grants])
    by_gid: dict[int, list[int]] = {}
    for rid, gid in rows:
        by_gid.setdefault(gid, []).append(rid)
    records: list[dict[str, Any]] = []
    for g in grants:
        gid, _sid, basis, consent, source, emb_id, emb_ver, enrolled, retain = g
        for rid in sorted(by_gid.get(int(gid), [])):
            records.append(
                {
                    "id": rid,
                    "legal_basis": basis,
                    "consent_ref": ctx.decrypt_field(subj, gid, "consent_ref", consent),
                    "source": ctx.decrypt_field(subj, gid, "source", source),
                    "embedder_id": emb_id,
                    "embedder_version": emb_ver,
                    "enrolled_at": enrolled,
                    "retain_until": retain,
                }
            )
    return records, np.array([r["id"] for r in records], np.int64)


def dedup_groups(
    ctx: Context, ids: npt.NDArray[np.int64], x: npt.NDArray[np.float32], threshold: float
) -> dict[str, Any]:
    """Near-duplicate groups (cosine >= ``threshold``) around the subject's records.

    Exact: every stored vector is compared with each of the subject's. Two
    records are linked when they score at least ``threshold``; a group is a
    connected set of the subject's records and the records they are linked
    to (one hop). Groups list the subject's own record ids and only the
    number of other members, never other subjects' ids.
    """
    have = ~np.isnan(x).any(axis=1)
    own_ids, own_x = ids[have], x[have]
    parent = list(range(own_ids.size))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    others: dict[int, set[int]] = {}  # other record id -> own records linked to it
    pos = {int(r): j for j, r in enumerate(own_ids.tolist())}
    if own_ids.size:
        for bids, bx in ctx.store.blocks():
            S = exact_scores(own_x, bx)
            hit_r, hit_c = np.nonzero(threshold <= S)
            for j, c in zip(hit_r.tolist(), hit_c.tolist(), strict=True):
                other = int(bids[c])
                if other in pos:
                    a, b = root(j), root(pos[other])
                    if a != b:
                        parent[a] = b
                else:
                    others.setdefault(other, set()).add(j)
    for linked in others.values():
        first = next(iter(linked))
        for j in linked:
            a, b = root(j), root(first)
            if a != b:
                parent[a] = b
    members: dict[int, list[int]] = {}
    for j in range(own_ids.size):
        members.setdefault(root(j), []).append(int(own_ids[j]))
    outside: dict[int, int] = {}
    for linked in others.values():
        r = root(next(iter(linked)))
        outside[r] = outside.get(r, 0) + 1
    found = sorted(
        (sorted(m), outside.get(r, 0))
        for r, m in members.items()
        if len(m) + outside.get(r, 0) >= 2
    )
    groups = [{"records": m, "other_members": n} for m, n in found]
    return {"available": True, "threshold": float(threshold), "groups": groups}


def export(
    ctx: Context, subj: Subject, *, requester: str | None, dedup_threshold: float
) -> SubjectExport:
    records, ids = _records_of(ctx, subj)
    emb = np.full((ids.size, ctx.d), np.nan, np.float32)
    present = ctx.store.contains(ids) if ids.size else np.zeros(0, bool)
    if present.any():
        emb[present] = ctx.store.get_vectors(ids[present])
    for r, ok in zip(records, present.tolist(), strict=True):
        if not ok:
            r["vector"] = "missing"
    audit = ctx.audit.verify(subject=subj.pseudonym)
    dedup = dedup_groups(ctx, ids, emb, dedup_threshold)
    now = policy.iso(policy.now())
    with ctx.db.txn() as conn:
        ctx.audit.append(
            conn,
            "export",
            requester=requester,
            purpose=None,
            subjects=[subj.pseudonym],
            detail={"records": len(records), "audit_entries": len(audit)},
        )
    cfg = ctx.config
    gallery = {k: cfg[k] for k in ("purpose", "embedder_id", "embedder_version")}
    gallery["path"] = str(ctx.path)
    return SubjectExport(
        subj.subject_id,
        now,
        gallery,
        records,
        emb,
        str(ctx.store.store_vectors),
        dedup,
        audit,
    )


def plan_by_face(
    ctx: Context,
    q: npt.NDArray[np.float32],
    threshold: float,
    *,
    whole_subjects: bool,
    requester: str | None,
) -> ErasurePlan:
    """Every record whose stored vector scores at least ``threshold`` against ``q`` (exact)."""
    hits: list[tuple[int, float]] = []
    for ids, x in ctx.store.blocks():
        s = exact_scores(q, x).max(axis=0)
        for j in np.flatnonzero(s >= threshold):
            hits.append((int(ids[j]), float(s[j])))
    id2gid = ctx.db.resolve(np.array([h[0] for h in hits], np.int64)) if hits else {}
    subj = ctx.subjects_of_gids(list(id2gid.values()))
    found = sorted(
        ((-score, rid) for rid, score in hits if rid in id2gid), key=lambda t: (t[0], t[1])
    )
    matches: list[dict[str, Any]] = [
        {"record_id": rid, "subject_id": subj[id2gid[rid]].subject_id, "score": -neg}
        for neg, rid in found
    ]
    chosen: dict[int, Subject] = {}
    if whole_subjects:
        wanted = {subj[id2gid[rid]].sid: subj[id2gid[rid]] for _, rid in found}
        for s in wanted.values():
            gids = [int(g[0]) for g in ctx.db.grants_of(s.sid)]
            for rid, _gid in ctx.db.records_of_grants(gids):
                chosen[rid] = s
    else:
        for _, rid in found:
            chosen[rid] = subj[id2gid[rid]]
    counts: dict[str, int] = {}
    for s in chosen.values():
        counts[s.subject_id] = counts.get(s.subject_id, 0) + 1
    with ctx.db.txn() as conn:
        ctx.audit.append(
            conn,
            "erase_plan",
            requester=requester,
            purpose=None,
            subjects={s.pseudonym for s in chosen.values()},
            detail={"matches": len(matches), "records": len(chosen), "threshold": threshold},
        )
    return ErasurePlan(
        matches,
        np.array(sorted(chosen), np.int64),
        dict(sorted(counts.items())),
        float(threshold),
        bool(whole_subjects),
    )
