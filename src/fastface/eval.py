"""Exact ground truth and accuracy measures, shared by the tests and ``bench/``."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = ["ground_truth", "identity_accuracy", "recall_at_k"]


def ground_truth(
    xb: Any,
    xq: npt.NDArray[np.float32],
    k: int,
    *,
    metric: Literal["ip", "l2"] = "ip",
    chunk_size: int = 65536,
    ids: npt.NDArray[np.int64] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Exact top-``k`` by chunked brute force (NumPy), ``(D, I)`` shaped ``(nq, k)``.

    ``xb`` may be a memory map or any object with ``iter_chunks`` (a
    :class:`fastface.datasets.VectorSource`); it is read ``chunk_size`` rows at a
    time, so its size is not bounded by memory. Ties are broken by lower id.
    Row numbers are the ids unless ``ids`` maps rows to ids.
    """
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    nq = xq.shape[0]
    sign = 1.0 if metric == "ip" else -1.0
    best_s = np.full((nq, 0), -np.inf, np.float32)
    best_i = np.empty((nq, 0), np.int64)
    q_sq = (xq**2).sum(1, keepdims=True) if metric == "l2" else None
    if hasattr(xb, "iter_chunks"):
        chunks = xb.iter_chunks(chunk_size)
    else:
        chunks = (
            (lo, np.asarray(xb[lo : lo + chunk_size], dtype=np.float32))
            for lo in range(0, xb.shape[0], chunk_size)
        )
    for lo, xc in chunks:
        s = xq @ xc.T
        if metric == "l2":
            assert q_sq is not None
            s = -(q_sq - 2 * s + (xc**2).sum(1)[None, :])
        cand_i = np.broadcast_to(np.arange(lo, lo + xc.shape[0], dtype=np.int64), s.shape)
        all_s = np.concatenate([best_s, s.astype(np.float32)], axis=1)
        all_i = np.concatenate([best_i, cand_i], axis=1)
        kk = min(k, all_s.shape[1])
        # sort by score desc, then id asc: lexsort's last key is primary
        order = np.lexsort((all_i, -all_s), axis=1)[:, :kk]
        best_s = np.take_along_axis(all_s, order, 1)
        best_i = np.take_along_axis(all_i, order, 1)
    if best_s.shape[1] < k:
        pad = k - best_s.shape[1]
        best_s = np.pad(best_s, ((0, 0), (0, pad)), constant_values=-np.inf)
        best_i = np.pad(best_i, ((0, 0), (0, pad)), constant_values=-1)
    D = (sign * best_s).astype(np.float32)
    if ids is not None:
        best_i = np.where(best_i >= 0, np.asarray(ids)[np.maximum(best_i, 0)], -1)
    return D, best_i


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
