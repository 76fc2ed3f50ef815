"""Exact ground truth, accuracy measures and result comparison, shared by tests and ``bench/``."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .kernels.exact import scores, topk

__all__ = [
    "assert_results_agree",
    "ground_truth",
    "identity_accuracy",
    "recall_at_k",
    "results_agree",
]


def ground_truth(
    xb: Any,
    xq: npt.NDArray[np.float32],
    k: int,
    *,
    metric: Literal["ip", "l2"] = "ip",
    chunk_size: int = 65536,
    ids: npt.NDArray[np.int64] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Exact top-``k`` by chunked brute force, ``(D, I)`` shaped ``(nq, k)``.

    Scores come from the library's exact scorer
    (:func:`fastface.kernels.exact.scores`). ``xb`` may be a memory map or
    any object with ``iter_chunks`` (a :class:`fastface.io.VectorSource`); it
    is read ``chunk_size`` rows at a time, so its size is not bounded by
    memory. Equal scores are ordered by lower id. Row numbers are the ids
    unless ``ids`` maps rows to ids.

    Examples
    --------
    >>> import numpy as np
    >>> xb = np.eye(3, dtype=np.float32)
    >>> D, I = ground_truth(xb, xb[:1] + xb[2:3], 3)
    >>> I.tolist(), D.tolist()
    ([[0, 2, 1]], [[1.0, 1.0, 0.0]])
    """
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    nq = xq.shape[0]
    larger = metric == "ip"
    pad = -np.inf if larger else np.inf
    best_D = np.full((nq, 0), pad, np.float32)
    best_I = np.empty((nq, 0), np.int64)
    id_map = None if ids is None else np.asarray(ids, dtype=np.int64)
    if hasattr(xb, "iter_chunks"):
        chunks = xb.iter_chunks(chunk_size)
    else:
        chunks = (
            (lo, np.asarray(xb[lo : lo + chunk_size], dtype=np.float32))
            for lo in range(0, xb.shape[0], chunk_size)
        )
    for lo, xc in chunks:
        S = scores(xq, xc, metric)
        rows = np.arange(lo, lo + xc.shape[0], dtype=np.int64)
        cid = rows if id_map is None else id_map[rows]
        all_D = np.concatenate([best_D, S], axis=1)
        all_I = np.concatenate([best_I, np.broadcast_to(cid, S.shape)], axis=1)
        best_D, best_I = topk(all_D, all_I, min(k, all_D.shape[1]), larger_is_better=larger)
    if best_D.shape[1] < k:
        best_D, best_I = topk(best_D, best_I, k, larger_is_better=larger)
    return best_D, best_I


def recall_at_k(I: npt.NDArray[np.int64], gt: npt.NDArray[np.int64], k: int) -> float:
    """k-recall@k: mean fraction of the true top-``k`` found in the returned top-``k``.

    ``R@1`` is ``recall_at_k(I, gt, 1)``: how often the exact nearest neighbour
    comes first. Padding ids (-1) never count.
    """
    if I.shape[0] != gt.shape[0]:
        raise ValueError(f"I has {I.shape[0]} rows, gt has {gt.shape[0]}")
    if I.shape[1] < k or gt.shape[1] < k:
        raise ValueError(f"k={k} exceeds the result width {I.shape[1]} or gt width {gt.shape[1]}")
    found = 0
    for row, truth in zip(I[:, :k], gt[:, :k], strict=True):
        t = truth[truth >= 0]
        found += np.intersect1d(row[row >= 0], t).size
    denom = sum(int((t >= 0).sum()) for t in gt[:, :k])
    return found / max(denom, 1)


def identity_accuracy(
    I: npt.NDArray[np.int64], labels_b: npt.NDArray[np.int64], labels_q: npt.NDArray[np.int64]
) -> float:
    """Top-1 identity accuracy: share of queries whose first result has their identity."""
    top = I[:, 0]
    ok = (top >= 0) & (labels_b[np.maximum(top, 0)] == labels_q)
    return float(ok.mean())


def _disagreement(
    a: tuple[npt.NDArray[Any], npt.NDArray[Any]],
    b: tuple[npt.NDArray[Any], npt.NDArray[Any]],
    atol: float,
) -> str | None:
    Da, Ia = (np.asarray(v) for v in a)
    Db, Ib = (np.asarray(v) for v in b)
    if Da.shape != Db.shape or Ia.shape != Ib.shape or Da.shape != Ia.shape:
        return f"shapes differ: {Da.shape}/{Ia.shape} and {Db.shape}/{Ib.shape}"
    pad_a, pad_b = Ia < 0, Ib < 0
    if not np.array_equal(pad_a, pad_b):
        q = int(np.flatnonzero((pad_a != pad_b).any(axis=1))[0])
        return f"query {q}: different numbers of results"
    live = ~pad_a
    if not np.allclose(Da[live], Db[live], rtol=0.0, atol=atol):
        q = int(np.flatnonzero((~np.isclose(Da, Db, rtol=0.0, atol=atol) & live).any(axis=1))[0])
        return f"query {q}: scores differ: {Da[q].tolist()} vs {Db[q].tolist()}"
    for q in range(Da.shape[0]):
        d = Da[q][live[q]]
        ia, ib = Ia[q][live[q]], Ib[q][live[q]]
        if d.size == 0:
            continue
        # groups of scores within atol of each other; the last group may be cut at k
        cuts = np.flatnonzero(np.abs(np.diff(d)) > atol) + 1
        groups = np.split(np.arange(d.size), cuts)
        for g_i, g in enumerate(groups):
            if g_i == len(groups) - 1 and d.size == Da.shape[1]:
                continue  # a tie with the k-th score may be cut differently
            if sorted(ia[g].tolist()) != sorted(ib[g].tolist()):
                return f"query {q}: ids of score {float(d[g[0]])} differ: {ia[g]} vs {ib[g]}"
    return None


def results_agree(
    a: tuple[npt.NDArray[Any], npt.NDArray[Any]],
    b: tuple[npt.NDArray[Any], npt.NDArray[Any]],
    *,
    atol: float = 0.0,
) -> bool:
    """Whether two search results ``(D, I)`` agree up to the order of tied scores.

    Scores must match rank by rank (within ``atol``); ids must match as sets
    within each group of tied scores; the last group of a full row (a tie
    with the ``k``-th score) may hold different ids, since either cut is
    right. fastface orders ties by lower id, so its own strategies agree bit
    for bit; this compares with other engines (FAISS orders ties by scan
    order) or across precisions (``atol``).

    Examples
    --------
    >>> import numpy as np
    >>> a = (np.array([[1.0, 0.5, 0.5]]), np.array([[7, 3, 4]]))
    >>> b = (np.array([[1.0, 0.5, 0.5]]), np.array([[7, 4, 9]]))
    >>> results_agree(a, b), results_agree(a, (a[0], np.array([[3, 7, 4]])))
    (True, False)
    """
    return _disagreement(a, b, atol) is None


def assert_results_agree(
    a: tuple[npt.NDArray[Any], npt.NDArray[Any]],
    b: tuple[npt.NDArray[Any], npt.NDArray[Any]],
    *,
    atol: float = 0.0,
) -> None:
    """Raise ``AssertionError`` saying where two results disagree (see :func:`results_agree`)."""
    why = _disagreement(a, b, atol)
    if why is not None:
        raise AssertionError(f"results disagree: {why}")
