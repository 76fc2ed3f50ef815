"""The one top-k merge, and the row selection of coarse assignment, against NumPy references:
better score, then lower id."""

from __future__ import annotations

import numpy as np
import pytest

from fastface._native import coarse_topk, merge_topk, select_topk


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


def select_reference(S: np.ndarray, k: int, larger: bool) -> tuple[np.ndarray, np.ndarray]:
    nq, n = S.shape
    out_D = np.full((nq, k), -np.inf if larger else np.inf, np.float32)
    out_I = np.full((nq, k), -1, np.int64)
    for q in range(nq):
        order = np.lexsort((np.arange(n), -S[q] if larger else S[q]))[:k]
        out_D[q, : order.size] = S[q, order]
        out_I[q, : order.size] = order
    return out_D, out_I


@pytest.mark.parametrize("larger", [True, False])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(("n", "k"), [(1, 1), (7, 3), (64, 8), (64, 64), (40, 50), (300, 120)])
def test_select_matches_numpy(larger: bool, ties: bool, n: int, k: int) -> None:
    """Both branches (bounded heap for k <= n / 8, partition otherwise), ties, -0 == +0,
    rows shorter than k (padded)."""
    rng = np.random.default_rng([n, k, ties])
    if ties:
        S = rng.integers(-2, 3, size=(40, n)).astype(np.float32)
        S[S == 0] = np.where(rng.random(int((S == 0).sum())) < 0.5, -0.0, 0.0)
    else:
        S = rng.standard_normal((40, n)).astype(np.float32)
    got = select_topk(S, k, larger_is_better=larger)
    want = select_reference(S, k, larger)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


def test_select_squared_l2_from_inner_products() -> None:
    """With norms the scores are max(|x|^2 + |c|^2 - 2 x.c, 0), as FAISS's flat search
    computes them; the selection then equals NumPy's on those scores."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 16)).astype(np.float32)
    c = np.concatenate([rng.standard_normal((99, 16)), x[:1]]).astype(np.float32)  # 0 distance
    ip = x @ c.T
    xn, cn = (x * x).sum(1), (c * c).sum(1)
    dis = np.maximum((xn[:, None] + cn[None, :]) - np.float32(2) * ip, np.float32(0))
    D, I = select_topk(ip, 10, larger_is_better=False, l2_norms=(xn, cn))
    wD, wI = select_reference(dis, 10, False)
    np.testing.assert_array_equal(I, wI)
    np.testing.assert_array_equal(D, wD)
    assert I[0, 0] == 99 and 0.0 <= D[0, 0] < 1e-4
    import faiss

    flat = faiss.IndexFlatL2(16)
    flat.add(c)
    fD, fI = flat.search(x, 10)
    np.testing.assert_allclose(D, fD, rtol=1e-5, atol=1e-4)
    assert (fI == I).mean() > 0.99


def test_select_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        select_topk(np.zeros(4, np.float32), 2, larger_is_better=True)
    with pytest.raises(ValueError, match="k must be a positive"):
        select_topk(np.zeros((2, 4), np.float32), 0, larger_is_better=True)
    with pytest.raises(ValueError, match="norms"):
        select_topk(
            np.zeros((2, 4), np.float32),
            1,
            larger_is_better=False,
            l2_norms=(np.zeros(2), np.zeros(3)),
        )


def coarse_reference(q: np.ndarray, c: np.ndarray, k: int, l2: bool) -> tuple:
    """The coarse kernel's arithmetic in NumPy: float32 products added in order of the
    dimension (no fused multiply-add), then the L2 form and the selection."""
    dot = np.zeros((q.shape[0], c.shape[0]), np.float32)
    qn = np.zeros(q.shape[0], np.float32)
    for t in range(q.shape[1]):
        dot = dot + q[:, t, None] * c[None, :, t]
        qn = qn + q[:, t] * q[:, t]
    if not l2:
        return select_reference(dot, k, True)
    cn = (c.astype(np.float64) ** 2).sum(1).astype(np.float32)
    dis = np.maximum((qn[:, None] + cn[None, :]) - np.float32(2) * dot, np.float32(0))
    return select_reference(dis, k, False)


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize(("nq", "d", "n", "k"), [(1, 8, 5, 8), (7, 16, 64, 8), (9, 33, 130, 100)])
def test_coarse_assignment_equals_numpy_twin(l2: bool, nq: int, d: int, n: int, k: int) -> None:
    """Exhaustive coarse scoring to the bit (full and partial blocks of centroids and of
    queries), duplicated centroids tied by lower number, k > n padded."""
    rng = np.random.default_rng([nq, d, n])
    q = rng.standard_normal((nq, d)).astype(np.float32)
    c = rng.standard_normal((n, d)).astype(np.float32)
    c[n // 2] = c[0]  # a tie
    norms = (c.astype(np.float64) ** 2).sum(1).astype(np.float32) if l2 else None
    got = coarse_topk(q, np.ascontiguousarray(c.T), k, centroid_norms=norms)
    want = coarse_reference(q, c, k, l2)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


def test_flat_codec_assignment_agrees_with_faiss() -> None:
    """Codec.assign of a flat coarse quantizer (fastface's kernel) against FAISS's own
    quantizer search: the same lists up to float32 rounding at near-ties."""
    import faiss

    from fastface import IVFPQIndex, IVFPQParams

    rng = np.random.default_rng(5)
    xb = rng.standard_normal((3000, 32)).astype(np.float32)
    xq = rng.standard_normal((200, 32)).astype(np.float32)
    for metric in ("l2", "ip"):
        index = IVFPQIndex(IVFPQParams(32, 64, 8, metric=metric, store_vectors=None))
        index.train(xb)
        Dq, Iq = index.codec.assign(xq, 20)
        fD, fI = index.codec.coarse_quantizer().search(xq, 20)
        assert (Iq == fI).mean() > 0.99
        np.testing.assert_allclose(Dq, fD, rtol=1e-5, atol=1e-4)
        assert isinstance(faiss.downcast_index(index.codec.coarse_quantizer()), faiss.IndexFlat)


@pytest.mark.parametrize("own", [True, False])
def test_flat_assignment_routes_to_the_path_the_rule_picks(monkeypatch, own: bool) -> None:
    """Codec.assign runs fastface's kernel where own_coarse_kernel_pays says so (exactly
    its result), else FAISS's flat search (exactly FAISS's); the rule itself: small d
    always, larger d once nprobe >= 2 d and nprobe >= nlist / 8."""
    from fastface import IVFPQIndex, IVFPQParams
    from fastface.index import params as params_mod

    assert params_mod.own_coarse_kernel_pays(48, 4096, 1)
    assert params_mod.own_coarse_kernel_pays(128, 2048, 512)
    assert not params_mod.own_coarse_kernel_pays(128, 2048, 32)
    assert not params_mod.own_coarse_kernel_pays(128, 8192, 512)
    assert not params_mod.own_coarse_kernel_pays(512, 2048, 512)
    rng = np.random.default_rng(6)
    xb = rng.standard_normal((3000, 32)).astype(np.float32)
    xq = rng.standard_normal((50, 32)).astype(np.float32)
    index = IVFPQIndex(IVFPQParams(32, 64, 8, metric="l2", store_vectors=None))
    index.train(xb)
    codec = index.codec
    monkeypatch.setattr(params_mod, "own_coarse_kernel_pays", lambda d, nlist, nprobe: own)
    Dq, Iq = codec.assign(xq, 10)
    if own:
        cn = (codec.centroids.astype(np.float64) ** 2).sum(1).astype(np.float32)
        want = coarse_topk(xq, np.ascontiguousarray(codec.centroids.T), 10, centroid_norms=cn)
    else:
        want = codec.coarse_quantizer().search(xq, 10)
    np.testing.assert_array_equal(Iq, want[1])
    np.testing.assert_array_equal(Dq, want[0])


def test_coarse_rejects_bad_input() -> None:
    q = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="do not match"):
        coarse_topk(q, np.zeros((5, 3), np.float32), 1)
    with pytest.raises(ValueError, match="k must be a positive"):
        coarse_topk(q, np.zeros((4, 3), np.float32), 0)
