"""Batch builds as a Ray Data job: train once, encode and write shards in parallel, commit once.

The driver trains the codec on a sample (the rows and seed
:meth:`ShardedIndex.build <fastface.ShardedIndex.build>` samples) and
commits it. A Ray Data job then maps over the shards still to do: each
worker reads its shard's rows from the vector files (shared storage), adds
them to a shard in the chunks a local build adds them in, and stages the
shard's files in the index directory
(:meth:`ShardedIndex.stage_shard <fastface.ShardedIndex.stage_shard>`).
Once every shard is staged, the driver verifies them and commits them in
one manifest (:meth:`ShardedIndex.adopt <fastface.ShardedIndex.adopt>`):
the directory is the one a local build of the same files writes, shard for
shard, byte for byte (only the generation in the file names differs).

Resuming: a job that stops (a worker error, the driver killed) leaves the
codec committed and the finished shards staged; running it again with the
same arguments checks that the source and parameters are the same, keeps
the staged shards that verify, and does only the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptIndexError
from ._ray import init, require_ray
from .sources import FileSet, vector_files

__all__ = ["build"]

log = logging.getLogger("fastface.distributed")

_STAGED_FILE = re.compile(r"shard-(\d{6,12})\.(json|faiss|npy|f16\.npy|f32\.npy)$")


class _ShardWriter:
    """A Ray Data worker: opens the codec once, then encodes and stages shards."""

    def __init__(
        self, path: str, files: list[str], column: str | None, chunk_size: int, tag: str
    ) -> None:
        from ..index import ShardedIndex

        self.path = path
        self.codec = ShardedIndex.open(path, shards=()).codec
        self.fs = FileSet([Path(f) for f in files], column)
        self.chunk_size = chunk_size
        self.tag = tag

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from ..index import IVFPQIndex, ShardedIndex

        number, lo, hi = int(row["number"]), int(row["lo"]), int(row["hi"])
        shard = IVFPQIndex(self.codec)
        c = self.chunk_size
        a = b = lo
        try:
            # the pieces a local build adds: its chunks [i * c, (i + 1) * c) cut at shard bounds
            for c_lo in range(lo - lo % c, hi, c):
                a, b = max(lo, c_lo), min(hi, c_lo + c)
                shard.add(self.fs.read(a, b), np.arange(a, b, dtype=np.int64), batch_size=65536)
            rec = ShardedIndex.stage_shard(self.path, number, shard, tag=self.tag)
        except Exception as e:  # reported by the driver once the other shards are staged
            where = f"shard {number} (rows {lo}..{hi - 1}), reading rows {a}..{b - 1}"
            return {
                "number": number,
                "record": "",
                "error": type(e).__name__,
                "why": f"{where}: {e}",
            }
        return {"number": number, "record": json.dumps(rec), "error": "", "why": ""}


def _params(params: Any, d: int) -> tuple[Any, Any]:
    """``(IVFPQParams, trained Codec or None)`` from params, a spec string or a codec."""
    from ..index import Codec, IVFPQParams, parse_spec

    if isinstance(params, str):
        params = parse_spec(params, d)
    if isinstance(params, IVFPQParams):
        return params, None
    if isinstance(params, Codec) and isinstance(params.params, IVFPQParams):
        return params.params, params
    raise TypeError(
        f"params: expected IVFPQParams, an IVF-PQ spec string or a trained IVF-PQ Codec, got "
        f"{type(params).__name__} (a flat index needs no parallel encoding: build it with "
        "ShardedIndex.build)"
    )


def build(
    source: Any,
    path: str | os.PathLike[str],
    params: Any,
    *,
    shard_size: int = 1_000_000,
    chunk_size: int = 100_000,
    train_size: int | None = None,
    seed: int = 0,
    column: str | None = None,
    workers: int | None = None,
    num_cpus_per_worker: float = 1,
    progress: bool = False,
    address: str | None = None,
) -> Any:
    """Build an index directory from vector files with a Ray Data job; resumable.

    Parameters
    ----------
    source : path, directory or list of paths
        ``.npy``, ``.fvecs`` or parquet files on storage every worker sees
        (a directory: its vector files sorted by name). Rows are numbered
        across the files in order and get their row numbers as ids.
    path : path
        The index directory (created, or resumed when it holds this build).
    params : IVFPQParams, str or Codec
        The codec to train (params or an IVF-PQ spec string such as
        ``"IVF1024,PQ64"``), or a trained one to encode with (no training;
        e.g. another index's ``codec``, so that both encode alike). Flat
        codecs are refused: build those with ``ShardedIndex.build``.
    shard_size, chunk_size, train_size, seed, column
        As :meth:`ShardedIndex.build <fastface.ShardedIndex.build>`; with
        the same values both write the same shards.
    workers : int, optional
        Ray Data workers encoding shards at once (default: as many as the
        cluster's CPUs allow at ``num_cpus_per_worker`` each).
    progress : bool
        Show Ray Data's progress bars.
    address : str, optional
        Ray cluster to join when not connected yet (empty: a local one).

    Returns
    -------
    ShardedIndex
        The index, open for writing (close it, or use ``with``).
    """
    from .._validation import check_positive_int
    from ..index import ShardedIndex
    from ..index.train import default_train_size

    shard_size = check_positive_int(shard_size, "shard_size")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    if workers is not None:
        workers = check_positive_int(workers, "workers")
    if train_size is not None:
        train_size = check_positive_int(train_size, "train_size")
    files = vector_files(source)
    fs = FileSet(files, column)
    params, codec = _params(params, fs.d)
    if fs.d != params.d:
        raise ValueError(f"source has d={fs.d}, params.d={params.d}; they must match")
    path = Path(path).absolute()
    fingerprint = {"files": fs.describe(), "n": fs.n, "column": column, "chunk_size": chunk_size}
    state = {"source": fingerprint, "distributed": True, "complete": False}
    if (path / "manifest.json").exists():
        index = ShardedIndex.open(path, mode="a")
        old = index.build_state or {}
        if (
            old.get("source") != fingerprint
            or not old.get("distributed")
            or index.params != params
            or index.shard_size != shard_size
            or (codec is not None and index.is_trained and index.codec != codec)
        ):
            index.close()
            raise FileExistsError(
                f"{path}: holds another index or a build of another source; pick a new "
                "directory or remove this one"
            )
    else:
        index = ShardedIndex.create(path, codec or params, shard_size=shard_size)
        index.set_build_state(state)
    try:
        if not index.is_trained:
            limit = train_size or default_train_size(params)
            index.train(fs.sample(limit, seed=seed), max_points=limit, seed=seed)
        if not (index.build_state or {}).get("complete"):
            _encode_and_commit(
                index,
                fs,
                files,
                column,
                chunk_size,
                workers,
                num_cpus_per_worker,
                progress,
                address,
            )
            index.set_build_state(dict(state, complete=True))
    except BaseException:
        index.close()
        raise
    return index


def _encode_and_commit(
    index: Any,
    fs: FileSet,
    files: list[Path],
    column: str | None,
    chunk_size: int,
    workers: int | None,
    num_cpus: float,
    progress: bool,
    address: str | None,
) -> None:
    from ..index import ShardedIndex

    path = Path(index.path)
    S = index.shard_size
    nshards = math.ceil(fs.n / S)
    tag = hashlib.sha256(
        json.dumps(
            {
                "source": fs.describe(),
                "column": column,
                "chunk_size": chunk_size,
                "shard_size": S,
                "codec": hashlib.sha256(index.codec.to_bytes()).hexdigest(),
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()
    for attempt in range(2):
        done = set(index.shard_numbers)
        staged = {
            int(r["number"]): r
            for r in ShardedIndex.staged(path)
            if r["tag"] == tag and int(r["number"]) not in done and int(r["number"]) < nshards
        }
        todo = [j for j in range(nshards) if j not in done and j not in staged]
        log.info(
            "%s: %d shards: %d committed, %d staged, %d to encode",
            path,
            nshards,
            len(done),
            len(staged),
            len(todo),
        )
        if todo:
            staged.update(
                _run_job(
                    path,
                    files,
                    column,
                    chunk_size,
                    S,
                    fs.n,
                    todo,
                    workers,
                    num_cpus,
                    progress,
                    address,
                    tag,
                )
            )
        try:
            index.adopt(staged[j] for j in sorted(staged))
            return
        except CorruptIndexError as e:  # a staged file is damaged: stage that shard again
            m = _STAGED_FILE.search(str(e.path or ""))
            if attempt or m is None:
                raise
            log.warning(
                "%s: staged shard %s fails verification (%s); redoing it", path, m.group(1), e
            )
            with contextlib.suppress(FileNotFoundError):
                (path / ".staging" / f"shard-{m.group(1)}.json").unlink()


def _run_job(
    path: Path,
    files: list[Path],
    column: str | None,
    chunk_size: int,
    shard_size: int,
    n: int,
    todo: list[int],
    workers: int | None,
    num_cpus: float,
    progress: bool,
    address: str | None,
    tag: str,
) -> dict[int, dict[str, Any]]:
    """Encode and stage shards ``todo`` with a Ray Data job; their records by number."""
    require_ray()
    init(address)
    import ray
    import ray.data

    if workers is None:
        cpus = float(ray.cluster_resources().get("CPU", 1))
        workers = max(1, int(cpus // num_cpus)) if num_cpus else len(todo)
    workers = min(workers, len(todo))
    items = [{"number": j, "lo": j * shard_size, "hi": min((j + 1) * shard_size, n)} for j in todo]
    ctx = ray.data.DataContext.get_current()
    bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = bool(progress)
    try:
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map(
            _ShardWriter,  # type: ignore[arg-type]  # a class: Ray Data runs it in actors
            fn_constructor_kwargs={
                "path": str(path),
                "files": [str(f) for f in files],
                "column": column,
                "chunk_size": chunk_size,
                "tag": tag,
            },
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=num_cpus,
        )
        out = {}
        failed = []
        for row in ds.iter_rows():
            if row["error"]:
                failed.append((int(row["number"]), row["error"], row["why"]))
            else:
                out[int(row["number"])] = json.loads(row["record"])
    finally:
        ctx.enable_progress_bars = bars
    if failed:
        kind = {"ValueError": ValueError, "TypeError": TypeError, "OSError": OSError}
        _, name, why = min(failed)
        raise kind.get(name, RuntimeError)(
            f"{path}: {len(failed)} shard(s) failed, the {len(out)} others are staged and "
            f"a run with the same arguments resumes from them; {name}: {why}"
        )
    missing = sorted(set(todo) - set(out))
    if missing:  # pragma: no cover - Ray Data raises when a block fails
        raise RuntimeError(f"{path}: the job ended without shards {missing}")
    return out
