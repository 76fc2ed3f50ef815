"""``--ray [ADDRESS]``: the option ``build``, ``embed`` and ``bench ann`` share.

Without ADDRESS a local Ray is started in this process (no dashboard); with
one (``auto``, ``ray://host:10001``, ``host:6379``) the command joins that
cluster. Files must then be on storage every node sees at the same path.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_ray_option", "embed_with_ray", "start"]


def add_ray_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help=f"{what} on a Ray cluster: join ADDRESS, or start a local Ray when none is given "
        "(needs the distributed extra: pip install 'fastface[distributed]')",
    )


def start(address: str) -> None:
    """Join the cluster at ``address`` (or start a local one); Ray's own logs kept to warnings."""
    import logging

    from ..distributed import init

    try:
        init(address or None, logging_level=logging.WARNING, log_to_driver=False)
    except ImportError as e:
        from ._common import UsageError

        raise UsageError(str(e)) from e
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def embed_with_ray(args: argparse.Namespace, out: Path, paths: list[str], progress: bool) -> int:
    """``fastface embed --ray``: the same summary and exit status as the local command."""
    from ..distributed import embed_images
    from ._common import UsageError

    if out.suffix.lower() not in (".parquet", ".pq"):
        raise UsageError(f"-o/--output: --ray writes a .parquet file, got {out.name!r}")
    start(args.ray)
    rep = embed_images(
        paths,
        out,
        model=args.model,
        template=args.template,
        threshold=args.threshold,
        providers=args.providers,
        faces=args.faces,
        min_face_size=args.min_face_size,
        batch_size=args.batch_size,
        actors=args.actors,
        force=args.force,
        progress=progress,
    )
    for e in rep.errors:
        print(f"fastface embed: {e['path']}: {e['kind']}: {e['reason']}", file=sys.stderr)
    unreadable = [e for e in rep.errors if e["kind"] in ("decode", "failed")]
    summary: dict[str, Any] = {
        "output": [str(rep.output)],
        "images": rep.images,
        "faces": rep.faces,
        "images_with_faces": rep.images_with_faces,
        "no_face": [e["path"] for e in rep.errors if e["kind"] in ("no_face", "too_small")],
        "errors": [{k: e[k] for k in ("path", "kind", "reason")} for e in unreadable],
        "model": {k: rep.model[k] for k in ("name", "version", "d", "threshold")},
    }
    print(json.dumps(summary, indent=2))
    return 1 if unreadable else 0
