"""Near-duplicate detection: kernels against NumPy, groups against planted truth and all pairs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fastface import DedupResult, IVFPQIndex, IVFPQParams, ShardedIndex, dedup, dedup_vectors
from fastface.datasets import SyntheticFaces, plant_duplicates
from fastface.errors import EmptyIndexError, NotTrainedError
from fastface.kernels.dedup import collect_pairs, group_labels, union_find

THR = 0.93


@pytest.fixture(scope="module")
def planted() -> tuple[np.ndarray, np.ndarray]:
    x, _ = SyntheticFaces(400, 6, 32, seed=11, n_groups=8).vectors()
    return plant_duplicates(x, 0.05, seed=2)


def _all_pairs(x: np.ndarray, thr: float) -> set[tuple[int, int]]:
    """Slow twin: every pair with cosine >= thr, by NumPy brute force."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    S = u @ u.T
    a, b = np.nonzero(np.triu(np.float32(thr) <= S, 1))
    return set(zip(a.tolist(), b.tolist(), strict=True))


def _components(n: int, pairs: set[tuple[int, int]]) -> np.ndarray:
    """Slow twin of union-find: the smallest member of each vertex's component, by search."""
    adj: dict[int, list[int]] = {}
    for a, b in pairs:
        adj.setdefault(a, []).append(b)
        adj.setdefault(b, []).append(a)
    root = np.full(n, -1, np.int64)
    for v in range(n):
        if root[v] >= 0:
            continue
        stack, seen = [v], {v}
        while stack:
            u = stack.pop()
            for w in adj.get(u, []):
                if w not in seen:
                    seen.add(w)
                    stack.append(w)
        root[list(seen)] = min(seen)
    return root


def test_plant_duplicates(planted) -> None:
    x, origin = planted
    n0 = 2400
    assert x.shape == (origin.size, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(origin[:n0], np.arange(n0))
    copies = np.arange(n0, x.shape[0])
    assert (origin[copies] < n0).all()
    assert np.unique(origin[copies]).size == 120  # 5% of the rows got copies
    per = np.bincount(origin[copies])
    assert set(per[per > 0].tolist()) <= {1, 2, 3}
    c = (x[copies] * x[origin[copies]]).sum(1)
    assert (c >= 0.95 - 1e-4).all() and (c <= 0.99 + 1e-4).all()
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_collect_pairs_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    S = rng.uniform(-1, 1, (30, 40)).astype(np.float32)
    S[3, 4] = np.float32(0.5)  # exactly at the threshold: counts
    qpos = rng.permutation(100)[:30].astype(np.int64)
    rpos = rng.permutation(100)[:40].astype(np.int64)
    rpos[7] = qpos[2]  # the same vector on both sides: never a pair
    S[2, 7] = 1.0
    for ordered in (False, True):
        ref = {
            (min(qpos[i], rpos[j]), max(qpos[i], rpos[j]), S[i, j])
            for i, j in zip(*np.nonzero(np.float32(0.5) <= S), strict=True)
            if qpos[i] != rpos[j] and (not ordered or qpos[i] < rpos[j])
        }
        for cap in (1, 1000):  # too small: returns the count, writes what fits
            a, b = np.empty(cap, np.int64), np.empty(cap, np.int64)
            s = np.empty(cap, np.float32)
            m = collect_pairs(S, np.float32(0.5), qpos, rpos, ordered, a, b, s)
            assert m == len(ref)
        got = set(zip(a[:m].tolist(), b[:m].tolist(), s[:m].tolist(), strict=True))
        assert got == {(int(p), int(q), float(v)) for p, q, v in ref}


def test_union_find_matches_components() -> None:
    rng = np.random.default_rng(4)
    n = 300
    edges = {tuple(sorted(e)) for e in rng.integers(0, n, (200, 2)).tolist() if e[0] != e[1]}
    a = np.array([e[0] for e in edges], np.int64)
    b = np.array([e[1] for e in edges], np.int64)
    parent = np.arange(n, dtype=np.int64)
    union_find(a, b, parent)
    np.testing.assert_array_equal(parent, _components(n, edges))
    labels = np.empty(n, np.int64)
    sizes = np.zeros(n, np.int64)
    g = group_labels(parent, labels, sizes)
    assert g == np.unique(parent).size
    assert sizes[:g].sum() == n
    np.testing.assert_array_equal(labels, np.unique(parent, return_inverse=True)[1])


def _check_against_truth(r: DedupResult, x: np.ndarray, origin: np.ndarray) -> None:
    # every planted group lies inside one found group
    assert (r.labels == r.labels[origin]).all()
    # and the found pairs are exactly the all-pairs brute force
    truth = _all_pairs(x, THR)
    assert set(map(tuple, r.pairs.tolist())) == truth
    np.testing.assert_array_equal(
        r.labels, np.unique(_components(x.shape[0], truth), return_inverse=True)[1]
    )


def test_dedup_vectors_exact_finds_planted_groups(planted) -> None:
    x, origin = planted
    r = dedup_vectors(x, THR, progress=False)
    _check_against_truth(r, x, origin)
    assert r.sizes.sum() == x.shape[0] and r.n_groups == r.representatives.size
    for grp in r.groups():
        assert grp[0] == grp.min() == r.representatives[r.labels[grp[0]]]
    assert r.duplicates().size == x.shape[0] - r.n_groups
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(r.scores, (u[r.pairs[:, 0]] * u[r.pairs[:, 1]]).sum(1), atol=1e-5)


def test_dedup_vectors_ivf_finds_planted_groups(planted) -> None:
    x, origin = planted
    r = dedup_vectors(x, THR, exact_below=100, nlist=16, nprobe=4, progress=False)
    _check_against_truth(r, x, origin)


def test_chain_is_one_group() -> None:
    # a~b and b~c but a !~ c: transitivity puts all three in one group
    t = np.deg2rad(15.0)
    x = np.zeros((5, 4), np.float32)
    for i, ang in enumerate((0.0, t, 2 * t)):
        x[i, :2] = np.cos(ang), np.sin(ang)
    x[3, 2] = x[4, 3] = 1.0
    assert x[0] @ x[1] > 0.95 > x[0] @ x[2]
    r = dedup_vectors(x, 0.95, ids=[30, 10, 20, 40, 50], progress=False)
    np.testing.assert_array_equal(r.ids, [10, 20, 30, 40, 50])
    assert r.pairs.tolist() == [[10, 20], [10, 30]]  # (b, c) and (a, b), as ids
    assert r.labels.tolist() == [0, 0, 0, 1, 2]
    assert r.representatives.tolist() == [10, 40, 50]
    assert r.sizes.tolist() == [3, 1, 1]
    assert [g.tolist() for g in r.groups()] == [[10, 20, 30]]


@pytest.mark.parametrize("store", ["float32", "float16"])
def test_dedup_index_equals_dedup_vectors(tmp_path, planted, store: str) -> None:
    x, origin = planted
    params = IVFPQParams(32, 16, 8, nbits=4, store_vectors=store)
    gone = np.array([3, 500, x.shape[0] - 1])
    with ShardedIndex.create(tmp_path / "i", params, shard_size=1000) as index:
        index.train(x)
        index.add(x)
        index.remove(gone)
        r_idx = dedup(index, THR, nprobe=16, chunk_size=300, progress=False)  # every list
        r_ivf = dedup(index, THR, nprobe=3, progress=False)
    keep = np.setdiff1d(np.arange(x.shape[0]), gone)
    r_mem = dedup_vectors(x[keep], THR, ids=keep, progress=False)
    if store == "float32":
        np.testing.assert_array_equal(r_idx.pairs, r_mem.pairs)
        np.testing.assert_array_equal(r_idx.labels, r_mem.labels)
    else:  # float16 rounding may only move pairs lying right at the threshold
        diff = set(map(tuple, r_idx.pairs.tolist())) ^ set(map(tuple, r_mem.pairs.tolist()))
        for i, j in diff:
            assert abs(float(x[i] @ x[j]) - THR) < 2e-3
    np.testing.assert_array_equal(r_idx.ids, keep)
    for r in (r_idx, r_ivf):
        planted_keep = np.isin(origin[keep], keep)
        lab = dict(zip(r.ids.tolist(), r.labels.tolist(), strict=True))
        for i in keep[planted_keep]:
            assert lab[int(i)] == lab[int(origin[i])]


def test_dedup_single_ivfpq_index(planted) -> None:
    x, origin = planted
    index = IVFPQIndex(IVFPQParams(32, 8, 8, nbits=4, store_vectors="float32"))
    index.train(x)
    index.add(x)
    r = dedup(index, THR, nprobe=8, progress=False)
    _check_against_truth(r, x, origin)


def test_dedup_walks_an_hnsw_quantizer_as_deep_as_the_add(planted, monkeypatch) -> None:
    """With an HNSW coarse quantizer, dedup assigns every vector at least as deep as the
    add did (EF_ADD), and finds the planted groups."""
    from fastface.index import params as params_mod

    x, origin = planted
    index = IVFPQIndex(IVFPQParams(32, 16, 8, coarse_hnsw=8, store_vectors="float32"))
    index.train(x)
    index.add(x)
    depths: list[int | None] = []
    real = params_mod.Codec.assign

    def spy(self, xx, nprobe, *, ef_search=None):
        depths.append(ef_search)
        return real(self, xx, nprobe, ef_search=ef_search)

    monkeypatch.setattr(params_mod.Codec, "assign", spy)
    res = dedup(index, THR, nprobe=2)
    assert depths and all(e is not None and e >= params_mod.EF_ADD for e in depths)
    assert (res.labels == res.labels[origin]).all()


def test_bad_input(tmp_path, planted) -> None:
    x, _ = planted
    for bad in (1.5, -1.0, float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            dedup_vectors(x, bad, progress=False)
    with pytest.raises(TypeError, match="threshold"):
        dedup_vectors(x, "0.9", progress=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="float32"):
        dedup_vectors(x.astype(np.int32), 0.9, progress=False)
    r64 = dedup_vectors(x.astype(np.float64), 0.9, progress=False)  # cast, as FAISS does
    np.testing.assert_array_equal(r64.pairs, dedup_vectors(x, 0.9, progress=False).pairs)
    bad_x = x.copy()
    bad_x[100, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        dedup_vectors(bad_x, 0.9, progress=False)
    with pytest.raises(ValueError, match="at least one row"):
        dedup_vectors(np.empty((0, 32), np.float32), 0.9, progress=False)
    with pytest.raises(TypeError, match="dedup_vectors"):
        dedup(x, 0.9)  # type: ignore[arg-type]
    no_vec = IVFPQIndex(IVFPQParams(32, 8, 4, nbits=4, store_vectors=None))
    with pytest.raises(NotTrainedError):
        dedup(no_vec, 0.9, progress=False)
    no_vec.train(x)
    no_vec.add(x)
    with pytest.raises(ValueError, match="store_vectors=None"):
        dedup(no_vec, 0.9, progress=False)
    empty = IVFPQIndex(IVFPQParams(32, 8, 4, nbits=4))
    empty.train(x)
    with pytest.raises(EmptyIndexError):
        dedup(empty, 0.9, progress=False)
    with ShardedIndex.create(tmp_path / "e", IVFPQParams(32, 8, 4, nbits=4)) as sharded:
        sharded.train(x)
        with pytest.raises(EmptyIndexError):
            dedup(sharded, 0.9, progress=False)


def test_kernels_without_jit() -> None:
    code = textwrap.dedent(
        """
        import numpy as np
        from fastface.kernels.dedup import collect_pairs, group_labels, union_find
        assert not hasattr(union_find, "signatures")  # plain Python under NUMBA_DISABLE_JIT
        S = np.array([[0.99, 0.2], [0.96, 0.97]], np.float32)
        a, b = np.empty(8, np.int64), np.empty(8, np.int64)
        s = np.empty(8, np.float32)
        m = collect_pairs(S, np.float32(0.95), np.array([0, 1]), np.array([2, 0]), False, a, b, s)
        assert m == 3 and sorted(zip(a[:m].tolist(), b[:m].tolist())) == [(0, 1), (0, 2), (1, 2)]
        parent = np.arange(6, dtype=np.int64)
        union_find(np.array([4, 2, 5]), np.array([2, 1, 3]), parent)
        assert parent.tolist() == [0, 1, 1, 3, 1, 3], parent
        labels, sizes = np.empty(6, np.int64), np.zeros(6, np.int64)
        assert group_labels(parent, labels, sizes) == 3
        assert labels.tolist() == [0, 1, 1, 2, 1, 2] and sizes[:3].tolist() == [1, 3, 2]
        print("ok")
        """
    )
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
