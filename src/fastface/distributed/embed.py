"""Batch embedding as a Ray Data job: image files to a parquet of face embeddings.

The images are cut into batches of ``batch_size`` in input order, the
batches a local :class:`~fastface.faces.FacePipeline` makes. A Ray Data
map reads each batch's files (tasks: the I/O spreads over the cluster), a
pool of actors holding the models (detector and embedder, made once per
actor; ``num_gpus`` each when the cluster has GPUs) detects, aligns and
embeds them, and the driver writes the rows in input order. The parquet is
the one ``fastface embed -o faces.parquet`` writes (same columns, same
model metadata), plus the per-image errors in its metadata
(``fastface.errors``: path, image, kind, reason), so the file says what it
lacks. :func:`fastface.distributed.build` (or ``fastface build``) reads it
directly: the ``embedding`` column comes first.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._ray import init, require_ray

__all__ = ["EmbedReport", "embed_images"]

log = logging.getLogger("fastface.distributed")


@dataclass
class EmbedReport:
    """What :func:`embed_images` wrote.

    ``errors`` holds one dict per image that gave no face (``path``,
    ``image``, ``kind``, ``reason``; kinds as :class:`fastface.faces.ImageError`).
    """

    output: Path
    images: int
    faces: int
    images_with_faces: int
    errors: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def make_embedder(
    model: str,
    *,
    providers: str = "auto",
    template: str = "arcface",
    threshold: float | None = None,
    threads: int | None = None,
) -> Any:
    """``"dlib"`` (dlib's ResNet in ONNX Runtime), ``"dlib-bin"`` (run by dlib) or an ONNX file."""
    from .. import faces

    if model == "dlib":
        kw: dict[str, Any] = {"providers": providers}
        if threads:
            kw["threads"] = threads
        return faces.dlib_onnx_embedder(**kw)
    if model == "dlib-bin":
        return faces.DlibEmbedder()
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"model: {model}: no such file; use 'dlib', 'dlib-bin' or ONNX")
    return faces.Embedder(
        path, providers=providers, template=template, threshold=threshold, threads=threads
    )


def _read_batch(row: dict[str, Any]) -> dict[str, Any]:
    """Ray Data task: the bytes of a batch's files (an error text where one cannot be read)."""
    data, errors = [], []
    for p in row["paths"]:
        try:
            data.append(Path(p).read_bytes())
            errors.append("")
        except OSError as e:  # what the local pipeline reports for it
            data.append(b"")
            errors.append(f"{type(e).__name__}: {e}")
    return {"start": row["start"], "paths": row["paths"], "data": data, "errors": errors}


class _FaceWorker:
    """Ray Data actor: the models, made once; detect, align and embed one batch per call."""

    def __init__(self, opts: dict[str, Any]) -> None:
        from ..faces import FacePipeline

        self.opts = opts
        emb = make_embedder(
            opts["model"],
            providers=opts["providers"],
            template=opts["template"],
            threshold=opts["threshold"],
            threads=opts["threads"],
        )
        self.pipe = FacePipeline(
            None,
            emb,
            batch_size=opts["batch_size"],
            min_face_size=opts["min_face_size"],
            progress=False,
        )
        self.model = self.pipe.spec.record()

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from ..faces import Face, ImageError

        start, paths = int(row["start"]), list(row["paths"])
        read_errors = list(row["errors"])
        readable = [i for i, e in enumerate(read_errors) if not e]
        errors: dict[int, dict[str, Any]] = {}
        for i, e in enumerate(read_errors):
            if e:
                errors[i] = {"path": paths[i], "image": start + i, "kind": "decode", "reason": e}
        found: list[Any] = []
        if readable:
            items = [bytes(row["data"][i]) for i in readable]
            for item in self.pipe.run(items):
                j = readable[item.image]
                if isinstance(item, Face):
                    found.append((j, item))
                elif isinstance(item, ImageError):
                    errors[j] = {
                        "path": paths[j],
                        "image": start + j,
                        "kind": item.kind,
                        "reason": item.reason,
                    }
        if self.opts["faces"] == "largest":
            best: dict[int, tuple[float, Any]] = {}
            for j, f in found:
                area = float((f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
                if j not in best or area > best[j][0]:
                    best[j] = (area, f)
            found = [(j, best[j][1]) for j in sorted(best)]
        table = _faces_table(
            [f for _, f in found],
            [paths[j] for j, _ in found],
            [start + j for j, _ in found],
            int(self.model["d"]),
        )
        return {
            "start": start,
            "table": _ipc_bytes(table),
            "errors": json.dumps([errors[i] for i in sorted(errors)]),
            "model": json.dumps(self.model),
        }


def _faces_table(faces: list[Any], paths: list[str], image: list[int], d: int) -> Any:
    """Rows in the columns of ``fastface embed``'s parquet."""
    import pyarrow as pa

    F = len(faces)

    def fixed(x: np.ndarray, width: int) -> Any:
        flat = pa.array(np.ascontiguousarray(x, np.float32).reshape(-1), pa.float32())
        return pa.FixedSizeListArray.from_arrays(flat, width)

    emb = np.stack([f.embedding for f in faces]) if F else np.zeros((0, d), np.float32)
    return pa.table(
        {
            "embedding": fixed(emb, d),
            "path": pa.array(paths, pa.string()),
            "image": pa.array(np.asarray(image, np.int64), pa.int64()),
            "face": pa.array(np.asarray([f.face for f in faces], np.int32), pa.int32()),
            "box": fixed(np.asarray([f.box for f in faces], np.float32).reshape(F, 4), 4),
            "score": pa.array(np.asarray([f.score for f in faces], np.float32), pa.float32()),
            "landmarks": fixed(
                np.asarray([f.landmarks for f in faces], np.float32).reshape(F, 10), 10
            ),
        }
    )


def _ipc_bytes(table: Any) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _from_ipc(data: bytes) -> Any:
    import pyarrow as pa

    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def embed_images(
    paths: Any,
    out: str | os.PathLike[str],
    *,
    model: str = "dlib",
    template: str = "arcface",
    threshold: float | None = None,
    providers: str = "auto",
    faces: str = "all",
    min_face_size: float = 20,
    batch_size: int = 8,
    actors: int | None = None,
    num_cpus_per_actor: float = 1,
    num_gpus_per_actor: float | None = None,
    force: bool = False,
    progress: bool = False,
    address: str | None = None,
) -> EmbedReport:
    """Detect, align and embed the faces of image files on a Ray cluster; write a parquet.

    Parameters
    ----------
    paths : list of paths
        Image files every node can read (shared storage), in the order the
        ``image`` column numbers them.
    out : path
        The ``.parquet`` file to write (owner-only, written under a temporary
        name and renamed into place).
    model, template, threshold, providers
        The embedder: ``"dlib"`` (dlib's ResNet in ONNX Runtime),
        ``"dlib-bin"`` or an ONNX file (with the ``template`` it was trained
        with and its same-person ``threshold``), as ``fastface embed``.
    faces : {"all", "largest"}
        Every face, or the largest of each image.
    min_face_size, batch_size
        As :class:`~fastface.faces.FacePipeline`; batches of ``batch_size``
        images are the unit of work.
    actors : int, optional
        Actors holding the models (default: as many as the cluster's CPUs
        allow at ``num_cpus_per_actor``, or its GPUs at ``num_gpus_per_actor``).
    num_gpus_per_actor : float, optional
        Default: 1 when the cluster has GPUs (ONNX Runtime's CUDA provider is
        then chosen by ``providers="auto"``), else 0.

    Returns
    -------
    EmbedReport
    """
    from .._validation import check_positive_int

    t0 = time.perf_counter()
    out = Path(out).absolute()
    if out.suffix.lower() not in (".parquet", ".pq"):
        raise ValueError(f"out: expected a .parquet file, got {out.name!r}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"out: directory {out.parent} does not exist")
    if os.path.lexists(out) and not force:
        raise FileExistsError(f"out: {out} exists; pass force=True to replace it")
    if faces not in ("all", "largest"):
        raise ValueError(f"faces: expected 'all' or 'largest', got {faces!r}")
    batch_size = check_positive_int(batch_size, "batch_size")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = [str(Path(p).absolute()) for p in paths]
    if model not in ("dlib", "dlib-bin") and not Path(model).is_file():
        raise FileNotFoundError(f"model: {model}: no such file; use 'dlib', 'dlib-bin' or ONNX")
    require_ray()
    init(address)
    import ray
    import ray.data

    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    batches = [
        {"start": s, "paths": files[s : s + batch_size]} for s in range(0, len(files), batch_size)
    ]
    if actors is None:
        res = ray.cluster_resources()
        cpus = res.get("CPU", 1)
        by_cpu = int(cpus // num_cpus_per_actor) if num_cpus_per_actor else len(batches)
        by_gpu = int(res.get("GPU", 0) // num_gpus_per_actor) if num_gpus_per_actor else by_cpu
        actors = max(1, min(by_cpu, by_gpu))
    actors = max(1, min(check_positive_int(actors, "actors"), max(1, len(batches))))
    opts = {
        "model": model if model in ("dlib", "dlib-bin") else str(Path(model).absolute()),
        "providers": providers,
        "template": template,
        "threshold": threshold,
        "threads": max(1, int(num_cpus_per_actor)) if num_cpus_per_actor else None,
        "batch_size": batch_size,
        "min_face_size": float(min_face_size),
        "faces": faces,
    }
    pending: dict[int, dict[str, Any]] = {}
    next_start = 0
    nfaces = 0
    with_faces: set[int] = set()
    errors: list[dict[str, Any]] = []
    model_meta: dict[str, Any] = {}
    writer = _Writer(out)
    ctx = ray.data.DataContext.get_current()
    bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = bool(progress)
    try:
        if batches:
            ds = (
                ray.data.from_items(batches, override_num_blocks=len(batches))
                .map(_read_batch, num_cpus=0)  # I/O: it must not wait for the actors' CPUs
                .map(
                    _FaceWorker,  # type: ignore[arg-type]  # a class: Ray Data runs it in actors
                    fn_constructor_kwargs={"opts": opts},
                    compute=ray.data.ActorPoolStrategy(size=actors),
                    num_cpus=num_cpus_per_actor,
                    num_gpus=num_gpus_per_actor,
                )
            )
            for row in ds.iter_rows():
                pending[int(row["start"])] = row
                while next_start in pending:  # input order, whatever order batches finish in
                    r = pending.pop(next_start)
                    table = _from_ipc(r["table"])
                    model_meta = model_meta or json.loads(r["model"])
                    writer.write(table, model_meta)
                    nfaces += table.num_rows
                    with_faces.update(table.column("image").to_pylist())
                    errors += json.loads(r["errors"])
                    next_start += batch_size
        if not model_meta:  # no image at all: the model's record all the same
            model_meta = make_embedder(**_embedder_kw(opts)).spec.record()
            writer.write(_faces_table([], [], [], int(model_meta["d"])), model_meta)
        writer.commit({"fastface.errors": json.dumps(errors)})
    except BaseException:
        writer.abort()
        raise
    finally:
        ctx.enable_progress_bars = bars
    return EmbedReport(
        output=out,
        images=len(files),
        faces=nfaces,
        images_with_faces=len(with_faces),
        errors=errors,
        model=model_meta,
        seconds=time.perf_counter() - t0,
    )


def _embedder_kw(opts: dict[str, Any]) -> dict[str, Any]:
    return {k: opts[k] for k in ("model", "providers", "template", "threshold", "threads")}


class _Writer:
    """A parquet written owner-only under a temporary name, renamed over ``out`` on commit."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.tmp = out.with_name(f".{out.name}.{secrets.token_hex(8)}.tmp")
        self.file: Any = None
        self.writer: Any = None

    def write(self, table: Any, model: dict[str, Any]) -> None:
        import pyarrow.parquet as pq

        table = table.replace_schema_metadata({"fastface.model": json.dumps(model)})
        if self.writer is None:
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            self.file = os.fdopen(fd, "wb")
            self.writer = pq.ParquetWriter(self.file, table.schema)
        self.writer.write_table(table)

    def commit(self, metadata: dict[str, str]) -> None:
        self.writer.add_key_value_metadata(metadata)
        self.writer.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.out)
        dfd = os.open(self.out.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def abort(self) -> None:
        import contextlib

        with contextlib.suppress(Exception):
            if self.writer is not None:
                self.writer.close()
        with contextlib.suppress(Exception):
            if self.file is not None:
                self.file.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()
