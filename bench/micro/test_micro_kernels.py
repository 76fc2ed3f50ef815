"""Micro benchmarks of the native merge and the Numba re-rank kernel against NumPy twins.

Run: ``python -m pytest bench/micro --benchmark-columns=median,ops -p no:cacheprovider``
(pytest-benchmark prints each kernel next to its NumPy twin; compare the medians).
"""

from __future__ import annotations

import numpy as np
import pytest

from fastface._native import merge_topk
from fastface.kernels.rerank import rerank_f32

NQ, K, S = 1000, 100, 8


@pytest.fixture(scope="module")
def lists():
    rng = np.random.default_rng(0)
    D = -np.sort(-rng.standard_normal((S, NQ, K)).astype(np.float32), axis=2)
    I = rng.permutation(S * NQ * K).reshape(S, NQ, K).astype(np.int64)
    return np.ascontiguousarray(D), I


def numpy_merge(D, I, k):
    Dc = D.transpose(1, 0, 2).reshape(NQ, -1)
    Ic = I.transpose(1, 0, 2).reshape(NQ, -1)
    order = np.argsort(-Dc, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(Dc, order, 1), np.take_along_axis(Ic, order, 1)


def test_merge_native(benchmark, lists):
    D, I = lists
    out = benchmark(merge_topk, D, I, K, larger_is_better=True)
    np.testing.assert_array_equal(out[1], numpy_merge(D, I, K)[1])


def test_merge_numpy(benchmark, lists):
    D, I = lists
    benchmark(numpy_merge, D, I, K)


@pytest.fixture(scope="module")
def rerank_data():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((200_000, 512)).astype(np.float32)
    q = rng.standard_normal((200, 512)).astype(np.float32)
    rows = rng.integers(0, base.shape[0], (200, 320)).astype(np.int64)
    return q, base, rows


def test_rerank_numba(benchmark, rerank_data):
    q, base, rows = rerank_data

    def run():
        D = np.full((q.shape[0], 10), -np.inf, np.float32)
        I = np.full((q.shape[0], 10), -1, np.int64)
        rerank_f32(q, base, rows, rows, False, D, I)
        return D, I

    benchmark(run)


def test_rerank_numpy(benchmark, rerank_data):
    q, base, rows = rerank_data

    def run():
        s = np.einsum("qd,qcd->qc", q, base[rows])
        return np.argsort(-s, axis=1)[:, :10]

    benchmark(run)
