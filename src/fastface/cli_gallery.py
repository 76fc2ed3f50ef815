"""``fastface gallery ...``: the gallery's command line (inputs .npy files, outputs JSON).

``cli.py`` wires it in with ``cli_gallery.register(sub)``; every sub-command
sets ``func`` (taking the parsed ``args``, returning an exit code).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["register"]


def _print(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=_jsonable)
    sys.stdout.write("\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _load(path: str, name: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{name}: {p}: no such .npy file")
    arr = np.load(p, allow_pickle=False)
    return arr.reshape(1, -1) if arr.ndim == 1 else arr


def _guarded(fn: Any) -> Any:
    """Run a command, turning the library's clear errors into a message and exit code 1."""

    def run(args: argparse.Namespace) -> int:
        from .errors import FastfaceError

        try:
            return int(fn(args))
        except (
            FastfaceError,
            FileExistsError,
            FileNotFoundError,
            LookupError,
            PermissionError,
            TypeError,
            ValueError,
            NotImplementedError,
            RuntimeError,
        ) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"fastface gallery {args.gallery_command}: error: {msg}", file=sys.stderr)
            return 1

    return run


def _create(args: argparse.Namespace) -> int:
    from . import Gallery, IVFPQParams

    x = _load(args.train, "--train")
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
        _print({"path": str(g.path), "d": g.d, "purpose": g.purpose})
    return 0


def _enroll(args: argparse.Namespace) -> int:
    from . import Gallery

    x = _load(args.embeddings, "--embeddings")
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
    _print({"subject_id": args.subject, "record_ids": ids})
    return 0


def _search(args: argparse.Namespace) -> int:
    from . import Gallery

    q = _load(args.queries, "--queries")
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
    _print(m.to_dict())
    return 0


def _export(args: argparse.Namespace) -> int:
    from . import Gallery

    with Gallery.open(args.path) as g:
        exp = g.export_subject(args.subject, requester=args.requester)
    js, npy = exp.write(args.out)
    _print(
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
    from . import Gallery

    if (args.subject is None) == (args.face is None):
        raise ValueError("pass exactly one of --subject ID or --face PHOTO_EMBEDDING.npy")
    with Gallery.open(args.path) as g:
        if args.subject is not None:
            _print(g.erase_subject(args.subject, requester=args.requester).to_dict())
            return 0
        if args.threshold is None:
            raise ValueError("--face needs --threshold (the score a match must reach)")
        plan = g.erase_by_face(
            _load(args.face, "--face"), args.threshold, whole_subjects=not args.matched_only
        )
        if not args.yes:
            _print(
                {
                    "plan": plan.to_dict(),
                    "erased": False,
                    "hint": "re-run with --yes to erase these records",
                }
            )
            return 0
        _print(
            {
                "plan": plan.to_dict(),
                "erased": True,
                "receipt": plan.confirm(requester=args.requester).to_dict(),
            }
        )
    return 0


def _audit(args: argparse.Namespace) -> int:
    from . import Gallery

    with Gallery.open(args.path) as g:
        _print({"head": g.audit_head(), "entries": g.audit_log(since=args.since)})
    return 0


def _compact(args: argparse.Namespace) -> int:
    from . import Gallery

    with Gallery.open(args.path) as g:
        out: dict[str, Any] = {"compact": g.compact()}
        if args.purge_expired:
            r = g.purge_expired()
            out["expired"] = None if r is None else r.to_dict()
    _print(out)
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``gallery`` command (and its sub-commands) to ``subparsers``."""
    p = subparsers.add_parser(
        "gallery",
        help="enrol, search (audited), export, erase and audit a face gallery",
        description="Face gallery with a legal basis per record, audited search, access "
        "export and verified erasure. Inputs are .npy files; outputs are JSON on stdout.",
    )
    sub = p.add_subparsers(dest="gallery_command", required=True)

    def cmd(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("path", help="gallery directory")
        c.set_defaults(func=_guarded(fn))
        return c

    c = cmd("create", _create, "create a gallery and train its index on a sample")
    c.add_argument("--train", required=True, help="float32 (n, d) .npy training sample")
    c.add_argument("--purpose", required=True)
    c.add_argument("--embedder-id", required=True)
    c.add_argument("--embedder-version")
    c.add_argument("--nlist", type=int, default=1024)
    c.add_argument("--M", type=int, default=64)
    c.add_argument("--nbits", type=int, default=8, choices=(4, 8))
    c.add_argument("--metric", default="ip", choices=("ip", "l2"))
    c.add_argument("--shard-size", type=int, default=250_000)

    c = cmd("enroll", _enroll, "enrol a subject's embeddings under a legal basis")
    c.add_argument("--subject", required=True)
    c.add_argument("--embeddings", required=True, help="float32 (n, d) .npy")
    c.add_argument("--legal-basis", required=True)
    c.add_argument("--consent-ref")
    c.add_argument("--source")
    c.add_argument("--retain-until", help="ISO date after which the records are erased")
    c.add_argument("--requester")

    c = cmd("search", _search, "search for the gallery's purpose (audited)")
    c.add_argument("--queries", required=True, help="float32 (nq, d) .npy")
    c.add_argument("-k", type=int, default=10)
    c.add_argument("--requester", required=True)
    c.add_argument("--purpose", required=True)
    c.add_argument("--threshold", type=float)
    c.add_argument("--nprobe", type=int)
    c.add_argument("--rerank", type=int, help="exact re-ranking depth (needs stored vectors)")

    c = cmd("export", _export, "export everything held about a subject (art. 15)")
    c.add_argument("--subject", required=True)
    c.add_argument("--out", required=True, help="directory for subject.json + embeddings.npy")
    c.add_argument("--requester")

    c = cmd("erase", _erase, "erase a subject, or the records matching a photo (art. 17)")
    c.add_argument("--subject")
    c.add_argument("--face", help="float32 (n, d) .npy of the requester's own photo(s)")
    c.add_argument("--threshold", type=float)
    c.add_argument(
        "--matched-only",
        action="store_true",
        help="with --face: erase only matched records, not whole subjects",
    )
    c.add_argument("--yes", action="store_true", help="with --face: erase (else print the plan)")
    c.add_argument("--requester")

    c = cmd("audit", _audit, "print the audit log after verifying its hash chain")
    c.add_argument("--since", help="ISO time; entries at or after it")

    c = cmd("compact", _compact, "complete deferred erasures and fold pending removals in")
    c.add_argument(
        "--purge-expired", action="store_true", help="also erase records past their retention date"
    )
    return p
