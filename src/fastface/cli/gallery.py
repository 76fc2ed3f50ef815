"""``fastface gallery ...``: the gallery's command line (inputs .npy files, outputs JSON).

Every sub-command prints one JSON document, except ``audit``, which prints the
log as JSON lines (one entry per line; ``--head`` prints the chain head first).
Erasing a subject of whom nothing is held succeeds (exit 0): erasure is
idempotent.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ._common import Formatter, UsageError, input_file, positive_int, write_json, write_jsonl

__all__ = ["register"]


def _load(path: Path) -> np.ndarray:
    arr = np.load(path, allow_pickle=False)
    return arr.reshape(1, -1) if arr.ndim == 1 else arr


def _create(args: argparse.Namespace) -> int:
    from .. import Gallery, IVFPQParams

    x = _load(args.train)
    params = IVFPQParams(x.shape[1], args.nlist, args.M, nbits=args.nbits, metric=args.metric)
    with Gallery.create(
        args.path,
        d=x.shape[1],
        params=params,
        purpose=args.purpose,
        embedder_id=args.embedder_id,
        embedder_version=args.embedder_version,
        shard_size=args.shard_size,
    ) as g:
        g.train(x)
        write_json({"path": str(g.path), "d": g.d, "purpose": g.purpose})
    return 0


def _enroll(args: argparse.Namespace) -> int:
    from .. import Gallery

    x = _load(args.embeddings)
    with Gallery.open(args.path) as g:
        ids = g.enroll(
            args.subject,
            x,
            legal_basis=args.legal_basis,
            consent_ref=args.consent_ref,
            source=args.source,
            retain_until=args.retain_until,
            requester=args.requester,
        )
    write_json({"subject_id": args.subject, "record_ids": ids})
    return 0


def _search(args: argparse.Namespace) -> int:
    from .. import Gallery

    q = _load(args.queries)
    with Gallery.open(args.path) as g:
        m = g.search(
            q,
            args.k,
            requester=args.requester,
            purpose=args.purpose,
            threshold=args.threshold,
            nprobe=args.nprobe,
            rerank=args.rerank,
        )
    write_json(m.to_dict())
    return 0


def _export(args: argparse.Namespace) -> int:
    from .. import Gallery

    with Gallery.open(args.path) as g:
        exp = g.export_subject(args.subject, requester=args.requester)
    js, npy = exp.write(args.out)
    write_json(
        {
            "subject_id": exp.subject_id,
            "records": len(exp.records),
            "audit_entries": len(exp.audit),
            "json": str(js),
            "embeddings": str(npy),
        }
    )
    return 0


def _erase(args: argparse.Namespace) -> int:
    from .. import Gallery
    from ..errors import UnknownSubjectError

    if (args.subject is None) == (args.face is None):
        raise UsageError("pass exactly one of --subject ID or --face PHOTO_EMBEDDING.npy")
    with Gallery.open(args.path) as g:
        if args.subject is not None:
            try:
                receipt = g.erase_subject(args.subject, requester=args.requester)
            except UnknownSubjectError as e:
                # idempotent: nothing held (or an erasure already pending) is not a failure
                write_json({"subject_id": args.subject, "erased": False, "message": str(e)})
                return 0
            write_json(receipt.to_dict())
            return 0
        if args.threshold is None:
            raise UsageError("--face needs --threshold (the score a match must reach)")
        plan = g.erase_by_face(
            _load(args.face), args.threshold, whole_subjects=not args.matched_only
        )
        if not args.yes:
            write_json(
                {
                    "plan": plan.to_dict(),
                    "erased": False,
                    "hint": "re-run with --yes to erase these records",
                }
            )
            return 0
        write_json(
            {
                "plan": plan.to_dict(),
                "erased": True,
                "receipt": plan.confirm(requester=args.requester).to_dict(),
            }
        )
    return 0


def _audit(args: argparse.Namespace) -> int:
    from .. import Gallery

    with Gallery.open(args.path) as g:
        entries = g.audit_log(since=args.since)  # verifies the chain first
        head = g.audit_head()
    if args.head:
        write_json(head, indent=None)
    write_jsonl(entries)
    return 0


def _compact(args: argparse.Namespace) -> int:
    from .. import Gallery

    with Gallery.open(args.path) as g:
        out: dict[str, Any] = {"compact": g.compact()}
        if args.purge_expired:
            r = g.purge_expired()
            out["expired"] = None if r is None else r.to_dict()
    write_json(out)
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``gallery`` command (and its sub-commands) to ``subparsers``."""
    p = subparsers.add_parser(
        "gallery",
        help="enrol, search (audited), export, erase and audit a face gallery",
        description="Face gallery with a legal basis per record, audited search, access\n"
        "export and verified erasure. Inputs are .npy files; outputs are JSON on stdout.",
        formatter_class=Formatter,
    )
    sub = p.add_subparsers(dest="gallery_command", metavar="COMMAND", required=True)
    npy = input_file((".npy",))

    def cmd(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help, formatter_class=Formatter)
        c.add_argument("path", help="gallery directory")
        c.set_defaults(func=fn)
        return c

    c = cmd("create", _create, "create a gallery and train its index on a sample")
    c.add_argument("--train", type=npy, required=True, help="float32 (n, d) training sample")
    c.add_argument("--purpose", required=True, help="the one purpose searches must state")
    c.add_argument("--embedder-id", required=True, help="model that made the embeddings")
    c.add_argument("--embedder-version", help="its version")
    c.add_argument("--nlist", type=positive_int, default=1024, help="inverted lists")
    c.add_argument("--M", type=positive_int, default=64, help="PQ sub-quantizers")
    c.add_argument("--nbits", type=int, default=8, choices=(4, 8), help="bits per PQ code")
    c.add_argument("--metric", default="ip", choices=("ip", "l2"), help="similarity")
    c.add_argument("--shard-size", type=positive_int, default=250_000, help="vectors per shard")

    c = cmd("enroll", _enroll, "enrol a subject's embeddings under a legal basis")
    c.add_argument("--subject", required=True, help="subject id")
    c.add_argument("--embeddings", type=npy, required=True, help="float32 (n, d)")
    c.add_argument(
        "--legal-basis",
        required=True,
        help="GDPR art. 6 basis: consent, contract, legal_obligation, vital_interests, "
        "public_task or legitimate_interests",
    )
    c.add_argument("--consent-ref", help="reference of the consent record (needed for consent)")
    c.add_argument("--source", help="where the images came from")
    c.add_argument("--retain-until", help="ISO date after which the records are erased")
    c.add_argument("--requester", help="who asked (audited)")

    c = cmd("search", _search, "search for the gallery's purpose (audited)")
    c.add_argument("--queries", type=npy, required=True, help="float32 (nq, d)")
    c.add_argument("-k", type=positive_int, default=10, help="results per query")
    c.add_argument("--requester", required=True, help="who searches (audited)")
    c.add_argument("--purpose", required=True, help="must be the gallery's purpose")
    c.add_argument("--threshold", type=float, help="drop matches scoring below this")
    c.add_argument("--nprobe", type=positive_int, help="lists scanned per query")
    c.add_argument("--rerank", type=positive_int, help="exact re-ranking depth")

    c = cmd("export", _export, "export everything held about a subject (art. 15)")
    c.add_argument("--subject", required=True, help="subject id")
    c.add_argument("--out", required=True, help="directory for subject.json + embeddings.npy")
    c.add_argument("--requester", help="who asked (audited)")

    c = cmd("erase", _erase, "erase a subject, or the records matching a photo (art. 17)")
    c.add_argument("--subject", help="subject id")
    c.add_argument("--face", type=npy, help="float32 (n, d) of the requester's own photo(s)")
    c.add_argument("--threshold", type=float, help="with --face: score a match must reach")
    c.add_argument(
        "--matched-only",
        action="store_true",
        help="with --face: erase only matched records, not whole subjects",
    )
    c.add_argument("--yes", action="store_true", help="with --face: erase (else print the plan)")
    c.add_argument("--requester", help="who asked (audited)")

    c = cmd("audit", _audit, "print the audit log (JSON lines) after verifying its hash chain")
    c.add_argument("--since", help="ISO time; entries at or after it")
    c.add_argument("--head", action="store_true", help="print the chain head first")

    c = cmd("compact", _compact, "complete deferred erasures and fold pending removals in")
    c.add_argument(
        "--purge-expired", action="store_true", help="also erase records past their retention date"
    )
    return p
