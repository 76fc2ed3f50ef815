"""``fastface embed IMAGES... -o OUT``: faces of image files to an embedding file.

The output feeds the other commands directly:

* ``.parquet``: one row per face, the ``embedding`` column first (so
  ``fastface build faces.parquet idx ...`` reads it without ``--column``),
  then ``path``, ``image``, ``face``, ``box``, ``score``, ``landmarks``; the
  model's name, version, threshold and alignment are in the file's metadata.
* ``.npy``: the ``(F, d)`` float32 embeddings alone (what ``fastface gallery
  enroll --embeddings`` and ``gallery create --train`` read), with the
  per-row details beside it in ``OUT.json``.
* ``.npz``: arrays ``embeddings``, ``image``, ``face``, ``boxes``,
  ``scores``, ``landmarks``, ``paths`` and ``model`` (JSON).

Files are written owner-only (0600) under a temporary name and renamed into
place. Unreadable images are reported on stderr and skipped; the summary on
stdout (JSON) lists them. Exit status: 0 when every image was read, 1 when
some could not be (the output holds the rest), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ._common import Formatter, UsageError, positive_int
from ._ray import add_ray_option

__all__ = ["IMAGE_SUFFIXES", "register"]

#: File name endings taken from a directory argument.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jp2", ".pgm", ".ppm")


def _image_files(args: list[str], recursive: bool) -> list[str]:
    """Files named on the command line, and the image files of named directories (sorted;
    symbolic links inside a directory are not followed out of it, so they are skipped)."""
    out: list[str] = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            walk = p.rglob("*") if recursive else p.iterdir()
            found = sorted(
                str(q)
                for q in walk
                if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file() and not q.is_symlink()
            )
            out += found
        elif p.exists():
            out.append(str(p))
        else:
            raise UsageError(f"{a}: no such file or directory")
    return out


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` owner-only (0600): a new, unpredictable temporary name
    (O_EXCL | O_NOFOLLOW), fsync, rename over ``path``, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _rows(res: Any, paths: list[str]) -> dict[str, Any]:
    return {
        "embeddings": res.embeddings,
        "image": res.image,
        "face": np.asarray([f.face for f in res.faces], np.int32),
        "boxes": res.boxes,
        "scores": res.scores,
        "landmarks": np.asarray(res.landmarks, np.float32),
        "paths": [paths[i] for i in res.image.tolist()],
    }


def _encode(out: Path, rows: dict[str, Any], model: dict[str, Any]) -> dict[Path, bytes]:
    """File contents to write for output ``out`` (by suffix)."""
    suffix = out.suffix.lower()
    F, d = rows["embeddings"].shape
    if suffix in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        def fixed(x: np.ndarray, width: int) -> Any:
            flat = pa.array(np.ascontiguousarray(x, np.float32).reshape(-1), pa.float32())
            return pa.FixedSizeListArray.from_arrays(flat, width)

        table = pa.table(
            {
                "embedding": fixed(rows["embeddings"], d),
                "path": pa.array(rows["paths"], pa.string()),
                "image": pa.array(rows["image"], pa.int64()),
                "face": pa.array(rows["face"], pa.int32()),
                "box": fixed(rows["boxes"], 4),
                "score": pa.array(rows["scores"], pa.float32()),
                "landmarks": fixed(rows["landmarks"].reshape(F, 10), 10),
            }
        ).replace_schema_metadata({"fastface.model": json.dumps(model)})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return {out: buf.getvalue()}
    if suffix == ".npz":
        buf = io.BytesIO()
        np.savez(
            buf,
            embeddings=rows["embeddings"],
            image=rows["image"],
            face=rows["face"],
            boxes=rows["boxes"],
            scores=rows["scores"],
            landmarks=rows["landmarks"],
            paths=np.asarray(rows["paths"], dtype=str).reshape(F),
            model=np.asarray(json.dumps(model)),
        )
        return {out: buf.getvalue()}
    if suffix == ".npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(rows["embeddings"], np.float32), allow_pickle=False)
        side = {
            "model": model,
            "rows": [
                {
                    "path": p,
                    "image": int(i),
                    "face": int(f),
                    "box": [float(v) for v in b],
                    "score": float(s),
                }
                for p, i, f, b, s in zip(
                    rows["paths"],
                    rows["image"],
                    rows["face"],
                    rows["boxes"],
                    rows["scores"],
                    strict=True,
                )
            ],
        }
        text = json.dumps(side, indent=1) + "\n"
        return {out: buf.getvalue(), out.with_name(out.name + ".json"): text.encode()}
    raise ValueError(f"-o/--output: expected a .parquet, .npz or .npy file, got {out.name!r}")


def _embedder(args: argparse.Namespace) -> Any:
    from .. import faces

    if args.model == "dlib":
        return faces.dlib_onnx_embedder(providers=args.providers)
    if args.model == "dlib-bin":
        return faces.DlibEmbedder()
    path = Path(args.model)
    if not path.is_file():
        raise UsageError(
            f"--model: {args.model}: no such file; use 'dlib', 'dlib-bin' or an ONNX file"
        )
    return faces.Embedder(
        path, providers=args.providers, template=args.template, threshold=args.threshold
    )


def _run(args: argparse.Namespace) -> int:
    from .. import faces

    out = Path(args.output)
    if out.suffix.lower() not in (".parquet", ".pq", ".npz", ".npy"):
        raise UsageError(f"-o/--output: expected a .parquet, .npz or .npy file, got {out.name!r}")
    if not out.parent.is_dir():
        raise UsageError(f"-o/--output: directory {out.parent} does not exist")
    if out.exists() and not args.force:
        raise UsageError(f"-o/--output: {out} exists; pass --force to replace it")
    paths = _image_files(args.images, args.recursive)
    if not paths:
        raise UsageError("IMAGES: no image files found (named files, or image files in folders)")
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    if args.ray is not None:
        from ._ray import embed_with_ray

        return embed_with_ray(args, out, paths, progress)
    emb = _embedder(args)
    res = faces.analyze(
        paths,
        embedder=emb,
        min_face_size=args.min_face_size,
        batch_size=args.batch_size,
        progress=progress,
    )
    if args.faces == "largest":
        res = _largest(res)
    unreadable = [e for e in res.errors if e.kind in ("decode", "failed")]
    for e in res.errors:
        print(f"fastface embed: {e.source}: {e.kind}: {e.reason}", file=sys.stderr)
    model = res.spec.record()
    files = _encode(out, _rows(res, paths), model)
    for path, data in files.items():
        _write_private(path, data)
    summary = {
        "output": [str(p) for p in files],
        "images": len(paths),
        "faces": len(res),
        "images_with_faces": len({f.image for f in res.faces}),
        "no_face": [e.source for e in res.errors if e.kind in ("no_face", "too_small")],
        "errors": [{"path": e.source, "kind": e.kind, "reason": e.reason} for e in unreadable],
        "model": {k: model[k] for k in ("name", "version", "d", "threshold")},
    }
    print(json.dumps(summary, indent=2))
    return 1 if unreadable else 0


def _largest(res: Any) -> Any:
    """The largest face of each image (by box area, as ``FacePipeline.index_images``)."""
    from ..faces import Analysis

    best: dict[int, Any] = {}
    for f in res.faces:
        area = float((f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
        if f.image not in best or area > best[f.image][0]:
            best[f.image] = (area, f)
    faces = [best[i][1] for i in sorted(best)]
    return Analysis(faces, res.errors, res.spec, res.n_images)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``embed`` command to ``subparsers``."""
    p = subparsers.add_parser(
        "embed",
        help="detect, align and embed the faces of image files (-o .parquet, .npz or .npy)",
        description=__doc__,
        formatter_class=Formatter,
    )
    p.add_argument(
        "images",
        nargs="+",
        metavar="IMAGES",
        help="image files, or folders (their image files by suffix; symlinks skipped)",
    )
    p.add_argument("-o", "--output", required=True, help="output file: .parquet, .npz or .npy")
    p.add_argument(
        "--faces",
        choices=("all", "largest"),
        default="all",
        help="every face of each image, or its largest (one vector per image, e.g. to enrol)",
    )
    p.add_argument(
        "--model",
        default="dlib",
        help="'dlib' (dlib's ResNet in ONNX Runtime, default), 'dlib-bin' (run by dlib) or "
        "an ONNX model file",
    )
    p.add_argument(
        "--template",
        choices=("arcface", "dlib"),
        default="arcface",
        help="alignment an ONNX --model was trained with",
    )
    p.add_argument(
        "--threshold", type=float, help="same-person cosine threshold of an ONNX --model"
    )
    p.add_argument("--providers", default="auto", help="ONNX Runtime: auto, cpu, cuda, tensorrt")
    p.add_argument("--min-face-size", type=float, default=20, help="smallest face, in pixels")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch")
    p.add_argument("-r", "--recursive", action="store_true", help="walk folders recursively")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    add_ray_option(p, "detect, align and embed with actors holding the models (.parquet output)")
    p.add_argument("--actors", type=positive_int, help="with --ray: actors (default: CPUs or GPUs)")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )
    bar.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_run)
    return p
