"""Search a sharded index with Ray actors: each serves some shards, the driver merges.

The driver (the process that creates :class:`RayShardedIndex`) opens only
the index's codec. Each actor opens a group of the shards from the same
directory (shared storage; memory-mapped by default) with
:meth:`ShardedIndex.open(path, shards=...) <fastface.ShardedIndex.open>`.
A query batch goes through the shard contract's three steps, split across
processes:

1. the driver computes the coarse assignment once (``assign``);
2. every actor scans its shards with that assignment (``scan``; its shards'
   lists in one pass) and returns its top ``k`` (``k * rerank`` when
   re-ranking); the driver merges them with the library's one merge
   (:func:`fastface._native.merge_topk`: better score, then lower id);
3. with ``rerank``, every actor re-scores the merged candidates it holds
   exactly (``rescore``) and the driver merges again.

Because each top-k is exact under one total order, the result is the one
:meth:`ShardedIndex.search <fastface.ShardedIndex.search>` gives on the same
directory, bit for bit.

Faults
------
An actor that dies is restarted by Ray (``max_restarts``) and the call is
sent again, to another replica of its shards first when there is one. A
group of shards none of whose actors answers (after ``retries`` rounds, or
``timeout`` seconds per attempt) raises :class:`ShardUnavailableError`
naming the shards, unless ``allow_partial=True``: then the result comes from
the other shards and its ``missing`` attribute lists the ones left out.
Nothing is ever left out silently.

Removals
--------
:meth:`RayShardedIndex.remove` commits through the directory's one writer
(:class:`~fastface.ShardedIndex` opened for writing, by the driver) and then
sends the removed ids to every actor, which applies them in memory
(:meth:`ShardedIndex.excluding <fastface.ShardedIndex.excluding>`). Every
reply says which generation the actor serves: an actor that missed a
removal is brought up to date before its answer is used, an actor restarted
by Ray reopens the directory at the committed generation, and one that finds
a generation this driver did not write (another writer changed the index)
raises :class:`IndexChangedError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import EmptyIndexError, FastfaceError
from ._ray import init, ray_failure_types, require_ray

__all__ = ["IndexChangedError", "RayShardedIndex", "SearchResult", "ShardUnavailableError"]

log = logging.getLogger("fastface.distributed")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ShardUnavailableError(FastfaceError, RuntimeError):
    """Some shards could not be searched: their actors died and did not come back.

    ``shards`` lists the shard numbers; ``causes`` the last error of each
    group of shards that failed.
    """

    def __init__(self, message: str, shards: Sequence[int], causes: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.shards = list(shards)
        self.causes = list(causes)


class IndexChangedError(FastfaceError, RuntimeError):
    """The index directory was changed by another writer; open a new RayShardedIndex."""


class SearchResult(tuple):
    """``(D, I)``, as :meth:`ShardedIndex.search` returns, and the shards left out.

    Unpacks as ``D, I = result``. ``missing`` is a tuple of the shard numbers
    that did not answer (only ever non-empty with ``allow_partial=True``);
    ``complete`` is ``not missing``.
    """

    missing: tuple[int, ...]

    def __new__(
        cls,
        D: npt.NDArray[np.float32],
        I: npt.NDArray[np.int64],
        missing: Sequence[int] = (),
    ) -> SearchResult:
        obj = super().__new__(cls, (D, I))
        obj.missing = tuple(int(m) for m in missing)
        return obj

    def __getnewargs__(self) -> tuple[Any, ...]:
        return (self[0], self[1], self.missing)

    @property
    def complete(self) -> bool:
        return not self.missing

    def __repr__(self) -> str:
        return f"SearchResult(D{self[0].shape}, I{self[1].shape}, missing={list(self.missing)})"


class ShardServer:
    """A Ray actor's state: a group of an index directory's shards, opened read-only."""

    def __init__(self, path: str, numbers: list[int], mmap: bool) -> None:
        from ..index import ShardedIndex

        self.numbers = list(numbers)
        self.index = ShardedIndex.open(path, mmap=mmap, shards=self.numbers)
        self.generation = self.index.generation  # the committed state this actor serves

    def ready(self) -> dict[str, Any]:
        import ray

        return {
            "generation": self.generation,
            "shards": self.numbers,
            "ntotal": self.index.ntotal,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def scan(
        self,
        q: npt.NDArray[np.float32],
        k: int,
        assignment: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]],
        generation: int,
    ) -> tuple[Any, ...]:
        if generation != self.generation:
            return ("stale", self.generation)
        t0 = time.perf_counter()
        D, I = self.index.scan(q, k, assignment)
        return (self.generation, D, I, time.perf_counter() - t0)

    def rescore(
        self, q: npt.NDArray[np.float32], ids: npt.NDArray[np.int64], k: int, generation: int
    ) -> tuple[Any, ...]:
        if generation != self.generation:
            return ("stale", self.generation)
        t0 = time.perf_counter()
        D, I = self.index.rescore(q, ids, k)
        return (self.generation, D, I, time.perf_counter() - t0)

    def exclude(self, ids: npt.NDArray[np.int64], generation: int) -> int:
        """Apply removals committed up to ``generation`` (from an older generation only)."""
        if generation > self.generation:
            self.index = self.index.excluding(ids)
            self.generation = generation
        return self.generation


class _ReadWriteLock:
    """Many searches at once, or one removal."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._readers:
                self._cond.wait()
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


def split_shards(numbers: Sequence[int], counts: Sequence[int], groups: int) -> list[list[int]]:
    """Shard numbers in ``groups`` non-empty groups of about equal vector counts.

    Largest shard first to the group holding the fewest vectors (ties: the
    lower group); each group's numbers ascending.
    """
    groups = max(1, min(groups, len(numbers)))
    load = [0] * groups
    out: list[list[int]] = [[] for _ in range(groups)]
    order = sorted(range(len(numbers)), key=lambda i: (-counts[i], numbers[i]))
    for i in order:
        g = min(range(groups), key=lambda j: (load[j], len(out[j]), j))
        out[g].append(int(numbers[i]))
        load[g] += int(counts[i])
    return [sorted(g) for g in out if g]


class RayShardedIndex:
    """A sharded index served by Ray actors: the verbs and results of :class:`ShardedIndex`.

    Parameters
    ----------
    path : path
        An index directory (:class:`~fastface.ShardedIndex`) on storage
        every node of the cluster sees at the same path.
    actors : int, optional
        Groups of shards, each served by its own actor(s). Default: one
        group per shard, at most as many as the cluster's CPUs allow
        (``CPUs // (num_cpus_per_actor * replicas)``).
    replicas : int
        Actors per group. A query goes to one of them (in turn); when it
        fails, to the next.
    num_cpus_per_actor, num_gpus_per_actor : float
        Ray resources each actor reserves. The scan runs on the CPU threads
        Ray gives the actor (``OMP_NUM_THREADS``); GPUs are only reserved.
    mmap : bool
        Actors memory-map their shards (default) or load them in memory.
    allow_partial : bool
        Default for :meth:`search`: return what the available shards give
        (and say which are missing) instead of raising.
    timeout : float
        Seconds one attempt of one group may take before the next replica
        (or a retry) is tried.
    retries : int
        Rounds over a group's replicas before its shards count as
        unavailable. A round lasts up to ``timeout``: an actor that Ray is
        restarting (it answers "unavailable" at once) is asked again, with a
        growing pause up to 1 s, until the round's time is up.
    max_restarts : int
        How often Ray restarts a dead actor (``-1``: always).
    address : str, optional
        Ray cluster to join when this process is not connected yet; a local
        cluster is started when empty (see :func:`fastface.distributed.init`).

    Examples
    --------
    A sketch (Ray must be running; ``index_dir`` on shared storage)::

        with RayShardedIndex(index_dir, actors=4, replicas=2) as index:
            D, I = index.search(xq, 10, nprobe=32, rerank=4)
            index.remove([12, 40])      # committed, then applied by every actor
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        actors: int | None = None,
        replicas: int = 1,
        num_cpus_per_actor: float = 1,
        num_gpus_per_actor: float = 0,
        mmap: bool = True,
        allow_partial: bool = False,
        timeout: float = 120.0,
        retries: int = 2,
        max_restarts: int = 3,
        address: str | None = None,
    ) -> None:
        from .._validation import check_positive_int
        from ..index import ShardedIndex

        ray = require_ray()
        self._closed = True  # until every actor is up
        self._actors: list[list[Any]] = []
        replicas = check_positive_int(replicas, "replicas")
        if actors is not None:
            actors = check_positive_int(actors, "actors")
        retries = check_positive_int(retries + 1, "retries + 1") - 1
        for name, v in (
            ("num_cpus_per_actor", num_cpus_per_actor),
            ("num_gpus_per_actor", num_gpus_per_actor),
            ("timeout", timeout),
        ):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {v!r}")
        if timeout <= 0:
            raise ValueError(f"timeout: expected seconds > 0, got {timeout!r}")
        self.path = Path(path).resolve()
        info = ShardedIndex.inspect(self.path)  # raises for a missing or damaged directory
        init(address)
        for _ in range(5):  # the manifest and the codec of one generation
            head = ShardedIndex.open(self.path, shards=())
            if head.generation == info["generation"]:
                break
            info = ShardedIndex.inspect(self.path)
        else:  # pragma: no cover - a writer committing non-stop
            raise IndexChangedError(f"{self.path}: the index kept changing while opening")
        self._head = head
        self.params = info["params"]
        self.shard_size: int = info["shard_size"]
        self._generation: int = info["generation"]
        self._ntotal: int = info["ntotal"]
        self._shard_info = info["shards"]
        self._removals: list[tuple[int, npt.NDArray[np.int64]]] = []
        self._writer: Any = None
        self._lock = _ReadWriteLock()
        self._turn = 0
        self.last_timing: dict[str, float] = {}
        self.allow_partial = bool(allow_partial)
        self.timeout = float(timeout)
        self.retries = retries
        numbers = [s["number"] for s in info["shards"]]
        counts = [s["count"] for s in info["shards"]]
        if actors is None:
            cpus = float(ray.cluster_resources().get("CPU", 1))
            per = num_cpus_per_actor * replicas
            actors = len(numbers) if per == 0 else max(1, int(cpus // per))
        self.groups: list[list[int]] = split_shards(numbers, counts, actors) if numbers else []
        total = ray.cluster_resources()
        n_actors = len(self.groups) * replicas
        for res, per in (("CPU", num_cpus_per_actor), ("GPU", num_gpus_per_actor)):
            if per * n_actors > total.get(res, 0) + 1e-9:
                raise ValueError(
                    f"{n_actors} actors x {per:g} {res}s = {per * n_actors:g} {res}s, the Ray "
                    f"cluster has {total.get(res, 0):g}; lower actors, replicas or "
                    f"num_{res.lower()}s_per_actor (fractions are allowed)"
                )
        self.replicas = replicas
        self.resources = {"num_cpus": num_cpus_per_actor, "num_gpus": num_gpus_per_actor}
        actor_cls = ray.remote(ShardServer)
        opts = {
            "num_cpus": num_cpus_per_actor,
            "num_gpus": num_gpus_per_actor,
            "max_restarts": max_restarts,
            "max_task_retries": 0,
        }
        bundle = {k: v for k, v in (("CPU", num_cpus_per_actor), ("GPU", num_gpus_per_actor)) if v}
        self._groups_pg: list[Any] = []
        self._actors = []
        for g in self.groups:
            if replicas > 1 and bundle:
                # a group's replicas on different nodes where there are enough of them
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                pg = ray.util.placement_group([bundle] * replicas, strategy="SPREAD")
                self._groups_pg.append(pg)
                strategies: list[Any] = [
                    PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r)
                    for r in range(replicas)
                ]
            else:
                strategies = ["SPREAD"] * replicas
            self._actors.append(
                [
                    actor_cls.options(**opts, scheduling_strategy=st).remote(
                        str(self.path), g, bool(mmap)
                    )
                    for st in strategies
                ]
            )
        self._suspect: list[dict[int, float]] = [{} for _ in self.groups]
        self._closed = False
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    # --- state --------------------------------------------------------------------------------
    @property
    def d(self) -> int:
        return int(self.params.d)

    @property
    def ntotal(self) -> int:
        """Searchable vectors (removed ones excluded)."""
        return self._ntotal

    @property
    def nshards(self) -> int:
        return len(self._shard_info)

    @property
    def generation(self) -> int:
        """Generation of the index state the actors serve (the last commit this driver knows)."""
        return self._generation

    @property
    def codec(self) -> Any:
        return self._head.codec

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return (
            f"RayShardedIndex({str(self.path)!r}, nshards={self.nshards}, ntotal={self.ntotal}, "
            f"groups={len(self.groups)}, replicas={self.replicas})"
        )

    def _wait_ready(self) -> None:
        ray = require_ray()
        refs = {
            a.ready.remote(): (g, r)
            for g, reps in enumerate(self._actors)
            for r, a in enumerate(reps)
        }
        failed: dict[int, list[str]] = {}
        up: dict[int, int] = {}
        deadline = time.monotonic() + self.timeout
        pending = list(refs)
        while pending:
            done, pending = ray.wait(
                pending, num_returns=len(pending), timeout=max(0.0, deadline - time.monotonic())
            )
            for ref in done:
                g, _ = refs[ref]
                try:
                    ans = ray.get(ref)
                except Exception as e:
                    failed.setdefault(g, []).append(_brief(e))
                    continue
                if ans["generation"] != self._generation:
                    raise IndexChangedError(
                        f"{self.path}: an actor opened generation {ans['generation']}, the driver "
                        f"{self._generation}; another writer is changing the index, try again"
                    )
                up[g] = up.get(g, 0) + 1
            if not done:
                for ref in pending:
                    failed.setdefault(refs[ref][0], []).append(
                        f"not ready after {self.timeout:g} s (too few free CPUs or GPUs in the "
                        f"cluster for {self.resources}?)"
                    )
                break
        down = [g for g in range(len(self._actors)) if g not in up]
        if down:
            shards = sorted(n for g in down for n in self.groups[g])
            causes = [f"shards {self.groups[g]}: {failed.get(g, ['?'])[-1]}" for g in down]
            raise ShardUnavailableError(
                f"{self.path}: shards {shards} could not be opened by any actor: "
                + "; ".join(causes),
                shards,
                causes,
            )

    # --- the fan-out ----------------------------------------------------------------------------
    def _fanout(
        self, method: str, args: tuple[Any, ...], groups: Sequence[int]
    ) -> tuple[dict[int, tuple[Any, Any, float]], dict[int, str]]:
        """Call ``method(*args, generation)`` once per group; retries and failover.

        Returns the answers ``{group: (D, I, seconds)}`` and the groups that
        failed ``{group: last error}``.
        """
        ray = require_ray()
        failures = ray_failure_types()
        gen = self._generation
        nrep = self.replicas
        first = self._turn
        self._turn += 1
        attempts = dict.fromkeys(groups, 0)
        syncs = dict.fromkeys(groups, 0)
        results: dict[int, tuple[Any, Any, float]] = {}
        errors: dict[int, str] = {}
        inflight: dict[Any, tuple[int, float]] = {}

        # replicas in turn, those that failed lately last
        def preference(g: int) -> list[int]:
            return sorted(range(nrep), key=lambda r: (r in self._suspect[g], (r - first) % nrep))

        order = {g: preference(g) for g in groups}

        def replica(g: int) -> int:
            return order[g][attempts[g] % nrep]

        def submit(g: int) -> None:
            actor = self._actors[g][replica(g)]
            method_ref = getattr(actor, method)
            inflight[method_ref.remote(*args, gen)] = (g, time.monotonic() + self.timeout)

        # a round gives each group `timeout` seconds: an actor that Ray is restarting answers
        # "unavailable" at once, so the round's last replica is asked again, with a growing
        # pause, until the round's time is up (instead of spending every retry in an instant)
        round_end = dict.fromkeys(groups, time.monotonic() + self.timeout)
        polls = dict.fromkeys(groups, 0)
        later: list[tuple[float, int]] = []  # (when, group): asked again after a pause

        def failed(g: int, why: str, restarting: bool = False) -> None:
            self._suspect[g][replica(g)] = time.monotonic()
            errors[g] = why
            now = time.monotonic()
            if restarting and attempts[g] % nrep == nrep - 1 and now < round_end[g]:
                polls[g] += 1
                later.append((min(now + min(0.05 * 2 ** polls[g], 1.0), round_end[g]), g))
                return
            attempts[g] += 1
            if attempts[g] < (self.retries + 1) * nrep:
                log.warning(
                    "%s: shards %s: attempt %d failed (%s); trying again",
                    self.path,
                    self.groups[g],
                    attempts[g],
                    why,
                )
                if attempts[g] % nrep == 0:  # every replica failed once: pause, a new round
                    pause = min(0.05 * attempts[g], 1.0)
                    round_end[g] = now + pause + self.timeout
                    polls[g] = 0
                    later.append((now + pause, g))
                else:
                    submit(g)

        for g in groups:
            submit(g)
        while inflight or later:
            now = time.monotonic()
            for item in [x for x in later if x[0] <= now]:
                later.remove(item)
                submit(item[1])
            if not inflight:
                time.sleep(max(0.0, min(t for t, _ in later) - now))
                continue
            wait_s = max(0.0, min(dl for _, dl in inflight.values()) - now)
            if later:
                wait_s = min(wait_s, max(0.0, min(t for t, _ in later) - now))
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=wait_s)
            if not done:
                now = time.monotonic()
                for ref, (g, dl) in list(inflight.items()):
                    if dl <= now:
                        del inflight[ref]
                        failed(g, f"no answer within {self.timeout:g} s")
                continue
            ref = done[0]
            g, _ = inflight.pop(ref)
            try:
                ans = ray.get(ref)
            except failures as e:
                failed(g, _brief(e), isinstance(e, ray.exceptions.ActorUnavailableError))
                continue
            except ray.exceptions.RayTaskError as e:
                raise e.as_instanceof_cause() from None
            if ans[0] == "stale":
                syncs[g] += 1
                if syncs[g] > 2 * nrep:
                    failed(g, f"stays at generation {ans[1]}, expected {gen}")
                    continue
                self._sync(g, replica(g), int(ans[1]))
                submit(g)
                continue
            results[g] = (ans[1], ans[2], float(ans[3]))
            self._suspect[g].pop(replica(g), None)
            errors.pop(g, None)
        return results, {g: e for g, e in errors.items() if g not in results}

    def _sync(self, g: int, r: int, at: int) -> None:
        """Bring replica ``r`` of group ``g``, which serves generation ``at``, up to date."""
        ray = require_ray()
        if at > self._generation:
            raise IndexChangedError(
                f"{self.path}: shards {self.groups[g]} are now at generation {at}, this "
                f"RayShardedIndex serves {self._generation}: another writer changed the index; "
                "open a new RayShardedIndex"
            )
        missed = [ids for gen, ids in self._removals if gen > at]
        ids = np.concatenate(missed) if missed else np.empty(0, np.int64)
        if not missed and at < self._generation:
            raise IndexChangedError(
                f"{self.path}: shards {self.groups[g]} serve generation {at}, older than this "
                f"RayShardedIndex's {self._generation} and not from a removal it made"
            )
        log.info("%s: shards %s: removals after generation %d", self.path, self.groups[g], at)
        # errors surface in the retried call
        with contextlib.suppress(Exception):
            ray.get(self._actors[g][r].exclude.remote(ids, self._generation), timeout=self.timeout)

    def _merge(
        self, parts: dict[int, tuple[Any, Any, float]], nq: int, k: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        from .._native import merge_topk

        if not parts:
            return (
                np.full((nq, k), self.params.pad_score, np.float32),
                np.full((nq, k), -1, np.int64),
            )
        keys = sorted(parts)
        return merge_topk(
            np.stack([parts[g][0] for g in keys]),
            np.stack([parts[g][1] for g in keys]),
            k,
            larger_is_better=self.params.larger_is_better,
        )

    def _unavailable(self, errors: dict[int, str]) -> ShardUnavailableError:
        shards = sorted(n for g in errors for n in self.groups[g])
        causes = [f"shards {self.groups[g]}: {errors[g]}" for g in sorted(errors)]
        return ShardUnavailableError(
            f"{self.path}: shards {shards} are unavailable (every actor serving them failed: "
            + "; ".join(causes)
            + "); pass allow_partial=True to search the others",
            shards,
            causes,
        )

    # --- search -------------------------------------------------------------------------------
    def search(
        self,
        q: npt.NDArray[np.float32],
        k: int,
        *,
        nprobe: int | None = None,
        rerank: int | None = None,
        allow_partial: bool | None = None,
    ) -> SearchResult:
        """Search every shard: ``(D, I)`` shaped ``(nq, k)``, as :meth:`ShardedIndex.search`.

        The same arguments and the same bits as ``ShardedIndex.open(path).search``.
        ``allow_partial`` (default: the constructor's) returns the results of
        the shards that answered when some stay unavailable, with their
        numbers in ``result.missing``; otherwise :class:`ShardUnavailableError`.
        """
        from .._validation import as_queries, check_k
        from ..index.ivfpq import check_nprobe, check_rerank

        ray = require_ray()
        self._check_open()
        partial = self.allow_partial if allow_partial is None else bool(allow_partial)
        k = check_k(k)
        nprobe = check_nprobe(nprobe, self.params.nlist)
        factor = check_rerank(rerank, k, self.params)
        q = as_queries(q, "q", d=self.d)
        stats: dict[str, float] = {}
        with self._lock.read():
            if self._ntotal <= 0:
                raise EmptyIndexError(f"{self.path}: the index is empty; add(x) vectors first")
            t0 = time.perf_counter()
            assignment = self._head.codec.assign(q, nprobe)
            t1 = time.perf_counter()
            q_ref, a_ref = ray.put(q), ray.put(assignment)
            kk = k * factor if factor else k
            groups = list(range(len(self.groups)))
            parts, errors = self._fanout("scan", (q_ref, kk, a_ref), groups)
            t2 = time.perf_counter()
            if errors and not partial:
                raise self._unavailable(errors)
            D, I = self._merge(parts, q.shape[0], kk)
            t3 = time.perf_counter()
            stats["assign_s"] = t1 - t0
            stats["scan_wall_s"] = t2 - t1
            stats["scan_actor_s"] = max((p[2] for p in parts.values()), default=0.0)
            stats["merge_s"] = t3 - t2
            if factor:
                ok = sorted(parts)
                parts2, errors2 = self._fanout("rescore", (q_ref, ray.put(I), k), ok)
                t4 = time.perf_counter()
                if errors2 and not partial:
                    raise self._unavailable(errors2)
                errors.update(errors2)
                D, I = self._merge(parts2, q.shape[0], k)
                stats["rescore_wall_s"] = t4 - t3
                stats["rescore_actor_s"] = max((p[2] for p in parts2.values()), default=0.0)
                stats["merge_s"] += time.perf_counter() - t4
            stats["total_s"] = time.perf_counter() - t0
        self.last_timing = stats
        missing = sorted(n for g in errors for n in self.groups[g])
        if missing:
            log.warning("%s: searched without shards %s (allow_partial)", self.path, missing)
        return SearchResult(D, I, missing)

    # --- remove -------------------------------------------------------------------------------
    def remove(self, ids: npt.ArrayLike) -> int:
        """Make ``ids`` unsearchable: committed to the directory, then applied by every actor.

        The driver opens the directory's writer (``ShardedIndex.open(path,
        mode="a")``: it holds the writer lock until :meth:`close`) and
        removes the ids there (tombstones, or a rewritten open shard); every
        actor then skips them. Returns how many were found, as
        :meth:`ShardedIndex.remove`. When this returns, every later search
        skips them: an actor that missed the message is brought up to date
        before its next answer counts.
        """
        from .._validation import as_id_array
        from ..index import ShardedIndex
        from ..index.ivfpq import sorted_unique

        ray = require_ray()
        self._check_open()
        arr = sorted_unique(as_id_array(ids))
        with self._lock.write():
            if self._writer is None:
                self._writer = ShardedIndex.open(self.path, mode="a")
            w = self._writer
            if w.generation != self._generation:
                raise IndexChangedError(
                    f"{self.path}: at generation {w.generation} on disk, this RayShardedIndex "
                    f"serves {self._generation}: another writer changed the index; open a new "
                    "RayShardedIndex"
                )
            n = w.remove(arr)
            if n == 0:
                return 0
            self._generation = w.generation
            self._ntotal = w.ntotal
            self._removals.append((self._generation, arr))
            refs = [a.exclude.remote(arr, self._generation) for reps in self._actors for a in reps]
            # an actor that does not take it now is synchronised before its next answer counts
            with contextlib.suppress(Exception):
                ray.wait(refs, num_returns=len(refs), timeout=self.timeout)
        return n

    # --- info / lifetime ----------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Parameters, counts, and every actor: its shards, node, process, whether it answers."""
        ray = require_ray()
        self._check_open()
        counts = {s["number"]: s["count"] for s in self._shard_info}
        groups = []
        for g, reps in enumerate(self._actors):
            refs = [a.ready.remote() for a in reps]
            replicas = []
            for ref in refs:
                try:
                    ans = ray.get(ref, timeout=self.timeout)
                    replicas.append(
                        {
                            "alive": True,
                            "node_id": ans["node_id"],
                            "pid": ans["pid"],
                            "generation": ans["generation"],
                        }
                    )
                except Exception as e:
                    replicas.append({"alive": False, "error": _brief(e)})
            groups.append(
                {
                    "shards": self.groups[g],
                    "vectors": sum(counts[n] for n in self.groups[g]),
                    "replicas": replicas,
                }
            )
        return {
            "path": str(self.path),
            "params": self.params.to_dict(),
            "generation": self._generation,
            "ntotal": self._ntotal,
            "shard_size": self.shard_size,
            "nshards": self.nshards,
            "shards": [dict(s) for s in self._shard_info],
            "replicas": self.replicas,
            "resources_per_actor": dict(self.resources),
            "groups": groups,
        }

    def actors(self) -> list[list[Any]]:
        """The actor handles, one list of replicas per group of shards (``self.groups``)."""
        return [list(reps) for reps in self._actors]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.path}: this RayShardedIndex is closed")

    def close(self) -> None:
        """Stop the actors and release the writer lock (if :meth:`remove` took it)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._actors:
            ray = require_ray()
            if ray.is_initialized():
                for reps in self._actors:
                    for a in reps:
                        with contextlib.suppress(Exception):
                            ray.kill(a, no_restart=True)
            self._actors = []
        for pg in getattr(self, "_groups_pg", []):
            with contextlib.suppress(Exception):
                require_ray().util.remove_placement_group(pg)
        self._groups_pg = []
        self._closed = True

    def __enter__(self) -> RayShardedIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _brief(e: BaseException) -> str:
    """One line for an error: its type and first line; for an actor that could not start,
    the error its constructor raised (the last line of Ray's message)."""
    text = [line.strip() for line in _ANSI.sub("", str(e)).splitlines() if line.strip()]
    if not text:
        return type(e).__name__
    if getattr(e, "actor_init_failed", False):
        return f"the actor could not start: {text[-1][:400]}"
    return f"{type(e).__name__}: {text[0][:300]}"
