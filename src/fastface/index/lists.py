"""Inverted lists of 8-bit PQ codes, held in place and scanned natively.

A :class:`ListRun` is one run of inverted lists: for each list, a range of
codes and ids inside two byte buffers. The buffers can be NumPy arrays in
memory (codes laid out list after list: "CSR"), a memory map of a shard
file (FAISS's layout, lists one after the other, codes then ids), or a part
of a bigger run (a shard's share of lists merged with other shards). Runs
never change once built; adding builds a new run, removing builds a
filtered copy. Entries of one list may be spread over several runs: the
scan (:func:`scan`) visits every run's part of each probed list, so shards
are searched in one pass, in place, with one coarse assignment and one
look-up table per query.

Results follow one total order, whatever the runs and their order: better
score first, equal scores by lower id. Scanning shards one by one and
merging (:func:`fastface._native.merge_topk`) gives the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _native
from .faiss_format import IVFPQLayout
from .params import Codec

__all__ = ["ListRun", "concat", "from_encoded", "list_ids", "pack", "scan"]

_EMPTY_IDS = np.empty(0, np.int64)


class ListRun:
    """Entries of inverted lists in place: ``count[l]`` codes of list ``l`` in ``codes``
    from byte ``codes_off[l]``, their ids (int64) in ``ids`` from byte ``ids_off[l]``.

    Immutable. ``native`` is the handle the C++ scan takes; it keeps the
    buffers alive.
    """

    __slots__ = ("code_size", "codes", "codes_off", "count", "ids", "ids_off", "n", "native")

    def __init__(
        self,
        codes: npt.NDArray[np.uint8],
        ids: npt.NDArray[np.uint8],
        codes_off: npt.NDArray[np.int64],
        ids_off: npt.NDArray[np.int64],
        count: npt.NDArray[np.int64],
        code_size: int,
    ) -> None:
        self.codes = codes
        self.ids = ids
        self.codes_off = _frozen(codes_off)
        self.ids_off = _frozen(ids_off)
        self.count = _frozen(count)
        self.code_size = int(code_size)
        self.n = int(self.count.sum())
        # the constructor checks every list against the buffer sizes
        self.native = _native.ListRun(
            codes, ids, self.codes_off, self.ids_off, self.count, self.code_size
        )

    @property
    def nlist(self) -> int:
        return int(self.count.size)

    @classmethod
    def empty(cls, nlist: int, code_size: int) -> ListRun:
        z = np.zeros(nlist, np.int64)
        return cls(np.empty(0, np.uint8), np.empty(0, np.uint8), z, z, z, code_size)

    @classmethod
    def csr(
        cls, codes: npt.NDArray[np.uint8], ids: npt.NDArray[np.int64], count: npt.NDArray[np.int64]
    ) -> ListRun:
        """Run over ``codes`` (n, code_size) and ``ids`` (n,) sorted by list; ``count`` per list."""
        count = np.ascontiguousarray(count, np.int64)
        start = np.cumsum(count) - count
        cs = codes.shape[1]
        return cls(
            np.ascontiguousarray(codes).reshape(-1),
            np.ascontiguousarray(ids, np.int64).view(np.uint8),
            start * cs,
            start * 8,
            count,
            cs,
        )

    @classmethod
    def from_layout(cls, buf: npt.NDArray[np.uint8], layout: IVFPQLayout) -> ListRun:
        """The lists of a parsed 8-bit FAISS file held in ``buf`` (in memory or mapped)."""
        return cls(buf, buf, layout.codes_off, layout.ids_off, layout.sizes, layout.code_size)

    def list_ids(self) -> npt.NDArray[np.int64]:
        """Every id of the run, list after list (a copy)."""
        out = np.empty(self.n, np.int64)
        if self.n:
            dst = np.cumsum(self.count) - self.count
            _native.copy_segments(
                self.ids, out.view(np.uint8), self.ids_off, dst * 8, self.count * 8
            )
        return out

    def to_csr(self) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
        """``(codes (n, code_size), ids (n,))`` list after list, in memory (a copy)."""
        return _gather([self], self.count)[:2]

    def __repr__(self) -> str:
        return f"ListRun(n={self.n}, nlist={self.nlist}, code_size={self.code_size})"


def _frozen(a: Any) -> npt.NDArray[np.int64]:
    out = np.array(a, dtype=np.int64, copy=True).reshape(-1)
    out.flags.writeable = False
    return out


def _gather(
    runs: Sequence[ListRun], total: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Copy runs into one CSR layout, runs in order within each list.

    Returns ``(codes, ids, prefix)`` where ``prefix[r, l]`` is where run
    ``r``'s entries of list ``l`` start, relative to the list's start.
    """
    cs = runs[0].code_size
    n = int(total.sum())
    codes = np.empty((n, cs), np.uint8)
    ids = np.empty(n, np.int64)
    start = np.cumsum(total) - total
    prefix = np.zeros((len(runs), total.size), np.int64)
    acc = np.zeros(total.size, np.int64)
    flat_codes = codes.reshape(-1)
    flat_ids = ids.view(np.uint8)
    for r, run in enumerate(runs):
        prefix[r] = acc
        dst = start + acc
        _native.copy_segments(run.codes, flat_codes, run.codes_off, dst * cs, run.count * cs)
        _native.copy_segments(run.ids, flat_ids, run.ids_off, dst * 8, run.count * 8)
        acc = acc + run.count
    return codes, ids, prefix


def list_ids(runs: Sequence[ListRun], nlist: int) -> npt.NDArray[np.int64]:
    """Every id of ``runs`` in the order a merged run (or a written file) holds them:
    list by list, runs in order within a list. Copies ids only."""
    if not runs:
        return np.empty(0, np.int64)
    total = np.sum([r.count for r in runs], axis=0).astype(np.int64)
    out = np.empty(int(total.sum()), np.int64)
    start = np.cumsum(total) - total
    acc = np.zeros(nlist, np.int64)
    for run in runs:
        dst = (start + acc) * 8
        _native.copy_segments(run.ids, out.view(np.uint8), run.ids_off, dst, run.count * 8)
        acc = acc + run.count
    return out


def concat(runs: Sequence[ListRun], nlist: int, code_size: int) -> ListRun:
    """One in-memory run holding every entry of ``runs`` (list by list, runs in order)."""
    if not runs:
        return ListRun.empty(nlist, code_size)
    total = np.sum([r.count for r in runs], axis=0).astype(np.int64)
    codes, ids, _ = _gather(runs, total)
    return ListRun.csr(codes, ids, total)


def pack(
    groups: Sequence[Sequence[ListRun]], nlist: int, code_size: int
) -> tuple[ListRun, list[ListRun]]:
    """Merge several groups of runs (one group per shard) into one in-memory run.

    Returns the merged run, which a search scans instead of the groups, and
    one view per group: a run over the merged buffers holding exactly that
    group's entries (what the shard scans when it is searched alone). No
    entry is stored twice.
    """
    flat = [run for g in groups for run in g]
    if not flat:
        empty = ListRun.empty(nlist, code_size)
        return empty, [empty for _ in groups]
    total = np.sum([r.count for r in flat], axis=0).astype(np.int64)
    codes, ids, prefix = _gather(flat, total)
    merged = ListRun.csr(codes, ids, total)
    start = np.cumsum(total) - total
    views = []
    r = 0
    for g in groups:
        count = (
            np.sum([run.count for run in g], axis=0).astype(np.int64)
            if g
            else np.zeros(nlist, np.int64)
        )
        first = start + (prefix[r] if g else 0)
        views.append(
            ListRun(merged.codes, merged.ids, first * code_size, first * 8, count, code_size)
        )
        r += len(g)
    return merged, views


def from_encoded(
    lists: npt.NDArray[np.int64],
    codes: npt.NDArray[np.uint8],
    ids: npt.NDArray[np.int64],
    nlist: int,
) -> ListRun:
    """A run from encoded vectors (list numbers, codes, ids); add order is kept within a list."""
    order = np.argsort(lists, kind="stable")
    count = np.bincount(lists, minlength=nlist).astype(np.int64)
    return ListRun.csr(codes[order], ids[order], count)


def filtered(run: ListRun, drop: npt.NDArray[np.int64]) -> ListRun:
    """A copy of ``run`` without the entries whose id is in ``drop`` (sorted)."""
    codes, ids = run.to_csr()
    keep = ~np.isin(ids, drop, assume_unique=False)
    lists = np.repeat(np.arange(run.nlist, dtype=np.int64), run.count)
    count = np.bincount(lists[keep], minlength=run.nlist).astype(np.int64)
    return ListRun.csr(codes[keep], ids[keep], count)


def scan(
    codec: Codec,
    q: npt.NDArray[np.float32],
    k: int,
    assignment: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]],
    runs: Sequence[ListRun],
    exclude: npt.NDArray[np.int64] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Top-``k`` of the codes of ``runs`` in each query's assigned lists (validated inputs).

    ``exclude``: sorted int64 ids never returned. Exact under (better score,
    lower id), so the runs' split and order never change the result. With
    spilled assignment (``codec.params.soar_lambda``) an id has two entries;
    it is returned once, with the better score. With an OPQ codec the
    queries are rotated first (the lists hold rotated codes).
    """
    Dq, Iq = assignment
    ex = _EMPTY_IDS if exclude is None else exclude
    return _native.ivfpq8_search(
        codec.rotate(q),
        codec.pq_transposed,
        codec.centroids,
        codec.params.larger_is_better,
        Dq,
        Iq,
        [r.native for r in runs],
        ex,
        k,
        codec.params.max_copies,
    )
