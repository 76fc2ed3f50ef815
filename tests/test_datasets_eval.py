"""Synthetic generator statistics, loaders, ground truth and recall against slow twins."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastface.datasets import SyntheticFaces
from fastface.eval import (
    assert_results_agree,
    ground_truth,
    identity_accuracy,
    recall_at_k,
    results_agree,
)
from fastface.io import ChunkSource, load_fvecs, load_parquet, open_vectors, write_fvecs


def test_cosine_statistics() -> None:
    data = SyntheticFaces(n_identities=300, per_identity=6, d=512, seed=3)
    x, lab = data.vectors()
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    G = x @ x.T
    same = lab[:, None] == lab[None, :]
    off = ~np.eye(len(x), dtype=bool)
    assert abs(G[same & off].mean() - 0.65) < 0.03
    assert abs(G[~same].mean()) < 0.01


def test_population_structure() -> None:
    data = SyntheticFaces(n_identities=2000, per_identity=2, d=256, seed=1, n_groups=40)
    c = data.centres(np.arange(2000))
    g = data.group_of(np.arange(2000))
    G = c @ c.T
    same = (g[:, None] == g[None, :]) & ~np.eye(2000, dtype=bool)
    assert abs(G[same].mean() - 0.3) < 0.05
    assert abs(G[g[:, None] != g[None, :]].mean()) < 0.02


def test_chunks_are_reproducible_and_independent_of_chunking() -> None:
    data = SyntheticFaces(n_identities=5000, per_identity=3, d=16, seed=9, n_groups=7)
    full, lab = data.rows(0, data.n)
    parts = [x for _, x, _ in data.chunks(4097)]
    np.testing.assert_array_equal(np.concatenate(parts), full)
    np.testing.assert_array_equal(data.rows(12000, 12010)[0], full[12000:12010])
    assert lab.tolist()[:7] == [0, 0, 0, 1, 1, 1, 2]
    other = SyntheticFaces(n_identities=5000, per_identity=3, d=16, seed=10, n_groups=7)
    assert not np.allclose(other.rows(0, 10)[0], full[:10])


def test_queries_are_fresh_samples_of_their_identity() -> None:
    data = SyntheticFaces(n_identities=500, per_identity=5, d=128, seed=2)
    xb, lab = data.vectors()
    q, ql = data.queries(200)
    assert not np.isin(q.view(np.int32), xb.view(np.int32)).all(axis=1).any()
    _, I = ground_truth(xb, q, 1)
    assert identity_accuracy(I, lab, ql) > 0.95


def test_bad_generator_args() -> None:
    with pytest.raises(ValueError, match="n_identities"):
        SyntheticFaces(0, 5, 8)
    with pytest.raises(ValueError, match="intra_cos"):
        SyntheticFaces(5, 5, 8, intra_cos=1.5)


def test_loaders_roundtrip(tmp_path) -> None:
    x = np.random.default_rng(0).standard_normal((123, 7)).astype(np.float32)
    write_fvecs(tmp_path / "a.fvecs", x)
    np.testing.assert_array_equal(load_fvecs(tmp_path / "a.fvecs"), x)
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 7)
    pq.write_table(
        pa.table({"id": np.arange(123), "v": col}), tmp_path / "a.parquet", row_group_size=50
    )
    np.testing.assert_array_equal(load_parquet(tmp_path / "a.parquet", column="v"), x)
    src = open_vectors(tmp_path / "a.parquet", column="v")
    assert (src.n, src.d) == (123, 7)
    got = np.concatenate([c for _, c in src.iter_chunks(40, start=33)])
    np.testing.assert_array_equal(got, x[33:])
    starts = [lo for lo, _ in src.iter_chunks(40, start=33)]
    assert starts == [33, 73, 113]
    s = src.sample(20, seed=1)
    assert s.shape == (20, 7) and np.isin(s[:, 0], x[:, 0]).all()
    (tmp_path / "bad.fvecs").write_bytes(b"\x03\x00\x00\x00" + b"\x00" * 10)
    with pytest.raises(ValueError, match=r"not an \.fvecs"):
        load_fvecs(tmp_path / "bad.fvecs")
    (tmp_path / "bad.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match="unknown vector file type"):
        open_vectors(tmp_path / "bad.txt")
    with pytest.raises(FileNotFoundError):
        open_vectors(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="no column"):
        open_vectors(tmp_path / "a.parquet", column="nope")


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_ground_truth_matches_full_sort(metric) -> None:
    rng = np.random.default_rng(4)
    xb = rng.standard_normal((1000, 8)).astype(np.float32)
    xq = rng.standard_normal((20, 8)).astype(np.float32)
    D, I = ground_truth(xb, xq, 5, metric=metric, chunk_size=97)
    if metric == "ip":
        S = xq @ xb.T
        ref = np.argsort(-S, axis=1, kind="stable")[:, :5]
    else:
        S = ((xq[:, None, :] - xb[None]) ** 2).sum(-1)
        ref = np.argsort(S, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(I, ref)
    np.testing.assert_allclose(D, np.take_along_axis(S, ref, 1), rtol=1e-4, atol=1e-4)


def test_ground_truth_pads_and_breaks_ties_by_id() -> None:
    xb = np.ones((3, 4), np.float32)
    D, I = ground_truth(xb, xb[:1], 5, chunk_size=2)
    assert I.tolist() == [[0, 1, 2, -1, -1]]
    assert np.isneginf(D[0, 3:]).all()


def test_recall_definitions() -> None:
    gt = np.array([[1, 2, 3], [4, 5, 6]])
    I = np.array([[3, 9, 1], [4, -1, -1]])
    assert recall_at_k(I, gt, 3) == pytest.approx(3 / 6)
    assert recall_at_k(I, gt, 1) == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="exceeds"):
        recall_at_k(I, gt, 4)
    assert identity_accuracy(np.array([[0], [1], [-1]]), np.array([7, 8]), np.array([7, 7, 7])) == (
        pytest.approx(1 / 3)
    )


def test_chunk_source_streams_once() -> None:
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal((n, 4)).astype(np.float64) for n in (3, 0, 5, 2)]
    src = open_vectors(iter(parts))
    assert isinstance(src, ChunkSource) and src.d == 4 and src.n is None
    head = src.sample(4)  # the first rows, kept for the pass below
    np.testing.assert_array_equal(head, np.concatenate(parts)[:4].astype(np.float32))
    got = list(src.iter_chunks(4))
    assert [lo for lo, _ in got] == [0, 3, 7, 8]  # a chunk of 5 splits at chunk_size 4
    want = np.concatenate(parts).astype(np.float32)
    np.testing.assert_array_equal(np.concatenate([x for _, x in got]), want)
    assert src.n == 10
    with pytest.raises(RuntimeError, match="only once"):
        list(src.iter_chunks(4))
    with pytest.raises(ValueError, match="different d"):
        list(open_vectors([np.ones((2, 4)), np.ones((2, 5))]).iter_chunks(8))
    with pytest.raises(TypeError, match="iterable"):
        open_vectors(3.5)


def test_results_agree_is_tie_aware() -> None:
    D = np.array([[0.9, 0.5, 0.5, 0.2], [0.9, 0.8, 0.7, 0.7]], np.float32)
    I = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert results_agree((D, I), (D, I))
    swapped = I.copy()
    swapped[0, [1, 2]] = swapped[0, [2, 1]]  # a tie inside the list, in the other order
    assert results_agree((D, I), (D, swapped))
    cut = I.copy()
    cut[1, 3] = 99  # a tie with the k-th score cut at another id
    assert results_agree((D, I), (D, cut))
    wrong = I.copy()
    wrong[0, 0] = 42  # not a tie: a different answer
    assert not results_agree((D, I), (D, wrong))
    with pytest.raises(AssertionError, match="query 0"):
        assert_results_agree((D, I), (D, wrong))
    assert not results_agree((D, I), (D + 1e-3, I))
    assert results_agree((D, I), (D + 1e-4, I), atol=1e-3)
    short = (np.array([[0.9, -np.inf]]), np.array([[1, -1]]))
    assert not results_agree(short, (np.array([[0.9, 0.1]]), np.array([[1, 2]])))
