"""``fastface gallery ...``: the gallery's command line (inputs .npy files, outputs JSON).

Every sub-command prints one JSON document, except ``audit``, which prints the
log as JSON lines (one entry per line; ``--head`` prints the chain head first).
Scores and thresholds are cosine similarities. ``search``, ``export``,
``audit``, ``status`` and ``verify`` open the gallery read-only, so they work
while another process writes to it. Erasing a subject of whom nothing is held
succeeds (exit 0): erasure is idempotent.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from ._common import Formatter, UsageError, input_file, positive_int, write_json, write_jsonl

__all__ = ["register"]


def _load(path: Path) -> np.ndarray:
    arr = np.load(path, allow_pickle=False)
    return arr.reshape(1, -1) if arr.ndim == 1 else arr


def _open(args: argparse.Namespace, mode: str = "a") -> Any:
    from .. import Gallery

    return Gallery.open(args.path, mode=mode, key_file=args.key_file)  # type: ignore[arg-type]


def _params(args: argparse.Namespace, d: int) -> Any:
    from .. import IVFPQParams

    if args.nlist is None and args.M is None:
        return None
    if args.nlist is None or args.M is None:
        raise UsageError("--nlist and --M go together (the IVF-PQ codec); give both or neither")
    return IVFPQParams(d, args.nlist, args.M, nbits=args.nbits)


def _create(args: argparse.Namespace) -> int:
    from .. import Gallery

    x = None if args.train is None else _load(args.train)
    if x is not None and args.d is not None and x.shape[1] != args.d:
        raise UsageError(f"--d {args.d} but --train holds vectors of dimension {x.shape[1]}")
    d = args.d if args.d is not None else (None if x is None else int(x.shape[1]))
    if d is None:
        raise UsageError("pass --d (the embedding dimension) or --train SAMPLE.npy")
    with Gallery.create(
        args.path,
        d=d,
        params=_params(args, d),
        purpose=args.purpose,
        embedder_id=args.embedder_id,
        embedder_version=args.embedder_version,
        store_vectors=args.store,
        flat_limit=None if args.flat_limit == 0 else args.flat_limit,
        shard_size=args.shard_size,
        key_file=args.key_file,
    ) as g:
        if x is not None:
            g.train(x)
        write_json({"path": str(g.path), "d": g.d, "purpose": g.purpose, "kind": g.kind})
    return 0


def _train(args: argparse.Namespace) -> int:
    with _open(args) as g:
        x = None if args.train is None else _load(args.train)
        g.train(x, params=_params(args, g.d))
        write_json({"path": str(g.path), "kind": g.kind, "ntotal": g.ntotal})
    return 0


def _enroll(args: argparse.Namespace) -> int:
    x = _load(args.embeddings)
    with _open(args) as g:
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
    q = _load(args.queries)
    with _open(args, "r") as g:
        m = g.search(
            q,
            args.k,
            requester=args.requester,
            purpose=args.purpose,
            threshold=args.threshold,
            exact=not args.pq_scores,
            nprobe=args.nprobe,
            rerank=args.rerank,
        )
    write_json(m.to_dict())
    return 0


def _export(args: argparse.Namespace) -> int:
    with _open(args, "r") as g:
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
    from ..errors import UnknownSubjectError

    if (args.subject is None) == (args.face is None):
        raise UsageError("pass exactly one of --subject ID or --face PHOTO_EMBEDDING.npy")
    if args.face is not None and args.threshold is None:
        raise UsageError("--face needs --threshold (the cosine similarity a match must reach)")
    with _open(args) as g:
        if args.subject is not None:
            try:
                receipt = g.erase_subject(args.subject, requester=args.requester)
            except UnknownSubjectError as e:
                # idempotent: nothing held is not a failure
                write_json({"subject_id": args.subject, "erased": False, "message": str(e)})
                return 0
            write_json(receipt.to_dict())
            return 0
        plan = g.erase_by_face(
            _load(args.face),
            args.threshold,
            whole_subjects=not args.matched_only,
            requester=args.requester,
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
        if plan.record_ids.size == 0:
            write_json({"plan": plan.to_dict(), "erased": False, "message": "nothing matched"})
            return 0
        receipt = g.confirm_erasure(plan, requester=args.requester)
        write_json({"plan": plan.to_dict(), "erased": True, "receipt": receipt.to_dict()})
    return 0


def _audit(args: argparse.Namespace) -> int:
    anchors = []
    for a in args.anchor or ():
        try:
            obj = json.loads(a)
            anchors.append({"seq": int(obj["seq"]), "mac": str(obj["mac"])})
        except (ValueError, KeyError, TypeError):
            raise UsageError(
                f'--anchor {a!r}: expected JSON like {{"seq": 12, "mac": "..."}}'
            ) from None
    with _open(args, "r") as g:
        entries = g.audit_log(since=args.since, anchors=anchors)  # verifies the chain first
        head = g.audit_head()
    if args.head:
        write_json(head, indent=None)
    write_jsonl(entries)
    return 0


def _status(args: argparse.Namespace) -> int:
    with _open(args, "r") as g:
        write_json(g.status())
    return 0


def _verify(args: argparse.Namespace) -> int:
    with _open(args, "r") as g:
        out: dict[str, Any] = {"verified": g.verify()}
        if args.receipt is not None:
            out["receipt"] = g.verify_receipt(json.loads(args.receipt.read_text()))
    write_json(out)
    return 0


def _compact(args: argparse.Namespace) -> int:
    with _open(args) as g:
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
        description="Face gallery with a legal basis per record, audited exact search, access\n"
        "export and verified erasure. Inputs are .npy files of L2-normalised embeddings;\n"
        "outputs are JSON on stdout; scores and thresholds are cosine similarities.",
        formatter_class=Formatter,
    )
    sub = p.add_subparsers(dest="gallery_command", metavar="COMMAND", required=True)
    npy = input_file((".npy",))

    def cmd(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help, formatter_class=Formatter)
        c.add_argument("path", help="gallery directory")
        c.add_argument(
            "--key-file",
            help="the gallery key file, when it is kept outside the gallery (default: "
            "PATH/gallery.key)",
        )
        c.set_defaults(func=fn)
        return c

    def codec(c: argparse.ArgumentParser) -> None:
        c.add_argument("--nlist", type=positive_int, help="IVF-PQ lists (default: from the size)")
        c.add_argument("--M", type=positive_int, help="PQ sub-quantizers (with --nlist)")
        c.add_argument("--nbits", type=int, default=8, choices=(4, 8), help="bits per PQ code")

    c = cmd("create", _create, "create a gallery (exact search from the first enrolment)")
    c.add_argument("--purpose", required=True, help="the one purpose searches must state")
    c.add_argument("--embedder-id", required=True, help="model that made the embeddings")
    c.add_argument("--embedder-version", help="its version")
    c.add_argument("--d", type=positive_int, help="embedding dimension (or give --train)")
    c.add_argument("--train", type=npy, help="train IVF-PQ now on this (n, d) sample")
    codec(c)
    c.add_argument(
        "--store",
        default="float16",
        choices=("float16", "float32"),
        help="stored vector precision (float32: bit-exact exports)",
    )
    c.add_argument(
        "--flat-limit",
        type=int,
        default=50_000,
        help="move to IVF-PQ past this many vectors (0: only on `gallery train`)",
    )
    c.add_argument("--shard-size", type=positive_int, default=50_000, help="vectors per shard")

    c = cmd("train", _train, "move the gallery to IVF-PQ now (re-encodes the stored vectors)")
    c.add_argument("--train", type=npy, help="training sample (default: the stored vectors)")
    codec(c)

    c = cmd("enroll", _enroll, "enrol a subject's embeddings under a legal basis")
    c.add_argument("--subject", required=True, help="subject id")
    c.add_argument("--embeddings", type=npy, required=True, help="float32 (n, d), unit rows")
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

    c = cmd("search", _search, "search for the gallery's purpose (audited, exact scores)")
    c.add_argument("--queries", type=npy, required=True, help="float32 (nq, d)")
    c.add_argument("-k", type=positive_int, default=10, help="results per query")
    c.add_argument("--requester", required=True, help="who searches (audited)")
    c.add_argument("--purpose", required=True, help="must be the gallery's purpose")
    c.add_argument("--threshold", type=float, help="drop matches below this cosine similarity")
    c.add_argument(
        "--pq-scores", action="store_true", help="IVF-PQ estimates instead of exact scores"
    )
    c.add_argument("--nprobe", type=positive_int, help="lists scanned per query (IVF-PQ)")
    c.add_argument("--rerank", type=positive_int, help="exact candidates per result (IVF-PQ)")

    c = cmd("export", _export, "export everything held about a subject (art. 15)")
    c.add_argument("--subject", required=True, help="subject id")
    c.add_argument("--out", required=True, help="directory for subject.json + embeddings.npy")
    c.add_argument("--requester", help="who asked (audited)")

    c = cmd("erase", _erase, "erase a subject, or the records matching a photo (art. 17)")
    c.add_argument("--subject", help="subject id")
    c.add_argument("--face", type=npy, help="float32 (n, d) of the requester's own photo(s)")
    c.add_argument("--threshold", type=float, help="with --face: cosine a match must reach")
    c.add_argument(
        "--matched-only",
        action="store_true",
        help="with --face: erase only matched records, not whole subjects",
    )
    c.add_argument("--yes", action="store_true", help="with --face: erase (else print the plan)")
    c.add_argument("--requester", help="who asked (audited)")

    c = cmd("audit", _audit, "print the audit log (JSON lines) after verifying its keyed chain")
    c.add_argument("--since", help="ISO time; entries at or after it")
    c.add_argument("--head", action="store_true", help="print the chain head first")
    c.add_argument(
        "--anchor",
        action="append",
        help='a head published earlier ({"seq": N, "mac": "..."}); must still be in the log',
    )

    cmd("status", _status, "kind, sizes, pending purges, reconciliation report")

    c = cmd("verify", _verify, "check every row, secret and audit entry (and a receipt)")
    c.add_argument("--receipt", type=input_file((".json",)), help="an erasure receipt to verify")

    c = cmd("compact", _compact, "finish pending erasures, fold removals in, rewrite the database")
    c.add_argument(
        "--purge-expired", action="store_true", help="also erase records past their retention date"
    )
    return p
