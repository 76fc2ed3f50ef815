"""Near-duplicate groups of an index, the work split over Ray actors.

:func:`fastface.dedup` in the steps of :class:`fastface.DedupPlan`, run
apart: each actor opens the index directory (memory-mapped, shared
storage) and builds the same plan; the actors find the nearest lists of
the vectors shard by shard, the driver gathers them, the actors then find
the candidate pairs of ranges of inverted lists (each list's residents
against its residents and visitors, exactly scored) and the driver joins
the pairs of all ranges, in list order, into groups. The blocks scored are
those of the local run, so the groups, pairs and scores are the ones
``fastface.dedup(ShardedIndex.open(path), ...)`` finds.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ._ray import init, ray_failure_types, require_ray

__all__ = ["dedup"]

log = logging.getLogger("fastface.distributed")


class DedupWorker:
    """A Ray actor: the index opened memory-mapped and its dedup plan."""

    def __init__(
        self, path: str, threshold: float, nprobe: int, chunk_size: int, generation: int
    ) -> None:
        from .._dedup import DedupPlan
        from ..index import ShardedIndex

        index = ShardedIndex.open(path, mmap=True)
        if index.generation != generation:
            raise RuntimeError(
                f"{path}: at generation {index.generation}, the driver planned "
                f"{generation}: the index changed; run dedup again"
            )
        self.plan = DedupPlan(index, threshold, nprobe=nprobe, chunk_size=chunk_size)

    def probes(self, parts: list[int]) -> list[tuple[Any, Any]]:
        return self.plan.probes(parts)

    def pairs(self, probes: npt.NDArray[np.int64], lo: int, hi: int) -> tuple[Any, Any, Any]:
        return self.plan.pairs(probes, range(lo, hi))


def _ranges(load: npt.NDArray[np.int64], pieces: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges of lists with about equal ``load`` each (non-empty ranges)."""
    nlist = load.size
    total = int(load.sum())
    cum = np.cumsum(load)
    cuts = {0, nlist}
    for j in range(1, pieces):
        cuts.add(int(np.searchsorted(cum, total * j / pieces, side="left")) + 1)
    edges = sorted(c for c in cuts if 0 <= c <= nlist)
    return [(a, b) for a, b in itertools.pairwise(edges) if b > a]


def dedup(
    index: Any,
    threshold: float,
    *,
    nprobe: int = 8,
    chunk_size: int = 4096,
    workers: int | None = None,
    num_cpus_per_worker: float = 1,
    retries: int = 2,
    progress: bool = False,
    address: str | None = None,
) -> Any:
    """Near-duplicate groups of an index directory, computed by Ray actors.

    Parameters
    ----------
    index : path or ShardedIndex
        The index directory (storage every node sees at this path); a
        ShardedIndex stands for its directory.
    threshold, nprobe, chunk_size
        As :func:`fastface.dedup`; the result is the one it gives.
    workers : int, optional
        Actors (default: as many as the cluster's CPUs allow at
        ``num_cpus_per_worker``).
    retries : int
        Times a piece of work is sent again after its actor died (Ray
        restarts actors) before the job fails.
    progress : bool
        Log each step's progress at INFO level.

    Returns
    -------
    DedupResult
    """
    from .._dedup import DedupPlan
    from .._validation import check_positive_int
    from ..index import ShardedIndex

    t0 = time.perf_counter()
    if not isinstance(index, (ShardedIndex, str, os.PathLike)):
        raise TypeError(f"index: expected a path or a ShardedIndex, got {type(index).__name__}")
    path = Path(index.path if isinstance(index, ShardedIndex) else index).absolute()
    local = ShardedIndex.open(path, mmap=True)
    plan = DedupPlan(local, threshold, nprobe=nprobe, chunk_size=chunk_size)  # checks arguments
    generation = local.generation
    ray = require_ray()
    init(address)
    if workers is None:
        cpus = float(ray.cluster_resources().get("CPU", 1))
        workers = max(1, int(cpus // num_cpus_per_worker)) if num_cpus_per_worker else 2
    workers = check_positive_int(workers, "workers")
    actor_cls = ray.remote(DedupWorker).options(
        num_cpus=num_cpus_per_worker, max_restarts=retries, max_task_retries=0
    )
    actors = [
        actor_cls.remote(str(path), plan.threshold, nprobe, plan.chunk_size, generation)
        for _ in range(workers)
    ]
    try:
        # step 1: probes, shard by shard, balanced by size
        sizes = plan.part_sizes()
        groups: list[list[int]] = [[] for _ in range(min(workers, plan.nparts))]
        load = [0] * len(groups)
        for i in sorted(range(plan.nparts), key=lambda i: -sizes[i]):
            g = load.index(min(load))
            groups[g].append(i)
            load[g] += sizes[i]
        units1 = [("probes", (sorted(g),)) for g in groups if g]
        got1 = _run_units(ray, actors, units1, retries, progress, "dedup probes")
        probes = plan.assemble([piece for out in got1 for piece in out])
        # step 2: pairs, by ranges of lists of about equal residents
        ref = ray.put(probes)
        residents = np.bincount(probes[:, 0], minlength=plan.nlist)
        units2 = [("pairs", (ref, a, b)) for a, b in _ranges(residents, 4 * workers)]
        got2 = _run_units(ray, actors, units2, retries, progress, "dedup pairs")
        result = plan.result(got2)
    finally:
        for a in actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)
    log.info("dedup on %d Ray workers: %.2f s", workers, time.perf_counter() - t0)
    return result


def _run_units(
    ray: Any,
    actors: list[Any],
    units: list[tuple[str, tuple[Any, ...]]],
    retries: int,
    progress: bool,
    what: str,
) -> list[Any]:
    """Run ``units`` (method, args) on the actors, one at a time each; results in unit order.

    A unit whose actor dies is sent again (to the next free actor; Ray
    restarts the dead one) at most ``retries`` times.
    """
    failures = ray_failure_types()
    todo = list(range(len(units)))
    attempts = [0] * len(units)
    out: list[Any] = [None] * len(units)
    busy: dict[Any, tuple[int, int]] = {}  # ref -> (unit, actor)
    idle = list(range(len(actors)))
    done = 0
    while todo or busy:
        while todo and idle:
            u, a = todo.pop(0), idle.pop(0)
            method, args = units[u]
            busy[getattr(actors[a], method).remote(*args)] = (u, a)
        ready, _ = ray.wait(list(busy), num_returns=1)
        u, a = busy.pop(ready[0])
        idle.append(a)
        try:
            out[u] = ray.get(ready[0])
        except failures as e:
            attempts[u] += 1
            if attempts[u] > retries:
                raise RuntimeError(
                    f"{what}: piece {u} failed {attempts[u]} times; last: {type(e).__name__}: "
                    f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                ) from e
            log.warning("%s: piece %d failed (%s); sending it again", what, u, type(e).__name__)
            todo.append(u)
            continue
        except ray.exceptions.RayTaskError as e:
            raise e.as_instanceof_cause() from None
        done += 1
        if progress:
            log.info("%s: %d/%d", what, done, len(units))
    return out
