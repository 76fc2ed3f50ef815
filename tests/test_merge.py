"""The one top-k merge against a NumPy reference: better score, then lower id."""

from __future__ import annotations

import numpy as np
import pytest

from fastface._native import merge_topk


def merge_reference(
    D: np.ndarray, I: np.ndarray, k: int, larger: bool
) -> tuple[np.ndarray, np.ndarray]:
    _S, nq, _kin = D.shape
    out_D = np.full((nq, k), -np.inf if larger else np.inf, np.float32)
    out_I = np.full((nq, k), -1, np.int64)
    for q in range(nq):
        d = D[:, q, :].reshape(-1)
        i = I[:, q, :].reshape(-1)
        keep = i >= 0
        d, i = d[keep], i[keep]
        order = np.lexsort((i, -d if larger else d))[:k]
        out_D[q, : order.size] = d[order]
        out_I[q, : order.size] = i[order]
    return out_D, out_I


def make_lists(rng: np.random.Generator, S: int, nq: int, kin: int, larger: bool, ties: bool):
    if ties:
        D = rng.integers(0, 4, size=(S, nq, kin)).astype(np.float32)
    else:
        D = rng.standard_normal((S, nq, kin)).astype(np.float32)
    D = -np.sort(-D, axis=2) if larger else np.sort(D, axis=2)
    I = rng.permutation(S * nq * kin).reshape(S, nq, kin).astype(np.int64)
    # padding at the tail of some lists, as a shard with fewer than k results gives
    npad = rng.integers(0, kin + 1, size=(S, nq))
    for s in range(S):
        for q in range(nq):
            if npad[s, q]:
                I[s, q, kin - npad[s, q] :] = -1
                D[s, q, kin - npad[s, q] :] = -np.inf if larger else np.inf
    return np.ascontiguousarray(D), np.ascontiguousarray(I)


@pytest.mark.parametrize("larger", [True, False])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(("S", "kin", "k"), [(1, 5, 5), (3, 7, 5), (4, 10, 10), (8, 3, 20)])
def test_merge_matches_numpy(larger: bool, ties: bool, S: int, kin: int, k: int) -> None:
    rng = np.random.default_rng(S * 100 + kin + k + int(ties))
    D, I = make_lists(rng, S, 50, kin, larger, ties)
    got_D, got_I = merge_topk(D, I, k, larger_is_better=larger)
    ref_D, ref_I = merge_reference(D, I, k, larger)
    np.testing.assert_array_equal(got_I, ref_I)
    np.testing.assert_array_equal(got_D, ref_D)


def test_merge_ties_by_lower_id_whatever_the_order() -> None:
    D = np.array([[[1.0, 0.5]], [[1.0, 0.5]]], np.float32)
    I = np.array([[[20, 11]], [[10, 21]]], np.int64)
    for parts in ([0, 1], [1, 0]):
        got_D, got_I = merge_topk(D[parts], I[parts], 4, larger_is_better=True)
        assert got_I.tolist() == [[10, 20, 11, 21]]
        assert got_D.tolist() == [[1.0, 1.0, 0.5, 0.5]]


def test_merge_takes_unsorted_lists_and_any_part_order() -> None:
    rng = np.random.default_rng(9)
    D = rng.integers(0, 3, (5, 30, 8)).astype(np.float32)  # unsorted, many ties
    I = rng.permutation(5 * 30 * 8).reshape(5, 30, 8).astype(np.int64)
    for larger in (True, False):
        want = merge_reference(D, I, 6, larger)
        for perm in (rng.permutation(5) for _ in range(3)):
            got = merge_topk(D[perm], I[perm], 6, larger_is_better=larger)
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[0], want[0])


def test_merge_all_padding() -> None:
    D = np.full((2, 3, 4), np.inf, np.float32)
    I = np.full((2, 3, 4), -1, np.int64)
    got_D, got_I = merge_topk(D, I, 2, larger_is_better=False)
    assert (got_I == -1).all() and np.isposinf(got_D).all()


def test_merge_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="equal shape"):
        merge_topk(
            np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 5), np.int64), 2, larger_is_better=True
        )
    with pytest.raises(ValueError, match="k must be a positive"):
        merge_topk(
            np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 4), np.int64), 0, larger_is_better=True
        )
