"""Codecs for large N (HNSW coarse quantizer, OPQ, two-level k-means), index specs,
auto_spec, streaming builds, shard skipping and routed re-ranking; tiny sizes throughout."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pytest

import fastface
from fastface import FlatParams, IVFPQIndex, IVFPQParams, ShardedIndex, auto_spec, parse_spec
from fastface.datasets import SyntheticFaces
from fastface.errors import CorruptIndexError
from fastface.eval import assert_results_agree, ground_truth, recall_at_k
from fastface.index import Codec, SpecError, faiss_format, train
from fastface.index.params import NEST_PROBE_ADD, NEST_PROBE_MIN, hnsw_ef, nest_probe

SPEC = "OPQ8,IVF32_HNSW8,PQ8,F16"


@pytest.fixture(scope="module")
def codec_hnsw_opq(small_data):
    return Codec.train(parse_spec(SPEC, 32), small_data[0])


# --- specs -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec",
    [
        "Flat",
        "Flat,F16",
        "IVF64,PQ8",
        "IVF64,PQ8,F32",
        "IVF64_HNSW16,PQ16x4fs,F16",
        "OPQ16,IVF1024_HNSW32,PQ16,F16",
        "OPQ8,IVF16,PQ8x4fs",
        "IVF1024_IVF32,PQ16,F16",
        "OPQ8,IVF64_IVF8,PQ8x4fs",
    ],
)
def test_spec_round_trips(spec) -> None:
    p = parse_spec(spec, 32)
    assert p.spec == spec
    assert type(p).from_dict(json.loads(json.dumps(p.to_dict()))) == p
    # the manifest's reader dispatches on the record alone
    from fastface.index.params import params_from_dict

    assert params_from_dict(p.to_dict()) == p


def test_spec_spellings_and_defaults() -> None:
    assert parse_spec("IVF64,PQ8x8", 32).spec == "IVF64,PQ8"
    p = parse_spec(" IVF64 , PQ8 , F16 ", 32, metric="l2")
    assert p.metric == "l2" and p.store_vectors == "float16"
    assert parse_spec("Flat", 32).store_vectors == "float32"
    assert IVFPQParams(32, 64, 8, coarse_hnsw=16, opq=8).spec == "OPQ8,IVF64_HNSW16,PQ8,F16"
    # records written before the new fields still read, and plain params write none of them
    old = {"d": 32, "nlist": 8, "M": 8, "nbits": 8, "metric": "ip", "store_vectors": None}
    assert IVFPQParams.from_dict(old).plain
    assert "opq" not in IVFPQParams(32, 8, 8).to_dict()


@pytest.mark.parametrize(
    ("spec", "token", "why"),
    [
        ("", "", "is empty"),
        ("IVF64,,PQ8", "", "is empty"),
        ("IVF64", "", "is missing: the codes"),
        ("OPQ8", "", "is missing: a coarse quantizer"),
        ("IVF64,PQ7", "PQ7", "7 sub-quantizers, which must divide the dimension 32"),
        ("OPQ5,IVF64,PQ8", "OPQ5", "must divide"),
        ("OPQ8_64,IVF64,PQ8", "OPQ8_64", "not supported"),
        ("IVF64_HNSW,PQ8", "IVF64_HNSW", "coarse quantizer"),
        ("IVF64_HNSW2,PQ8", "IVF64_HNSW2", "HNSW links per node"),
        ("IVF64_IVF64,PQ8", "IVF64_IVF64", "top level of 64 lists"),
        ("IVF64_IVF1,PQ8", "IVF64_IVF1", "it must have 2..63"),
        ("IVF64_HNSW8_IVF8,PQ8", "IVF64_HNSW8_IVF8", "coarse quantizer"),
        ("IVF0,PQ8", "IVF0", "lists"),
        ("IVF64,PQ8x4", "PQ8x4", "write PQ<M>x4fs"),
        ("IVF64,PQ8fs", "PQ8fs", "4 bits"),
        ("IVF64,PQ8x6", "PQ8x6", "6 bits per code"),
        ("IVF64,PQ8,F8", "F8", "not a storage token"),
        ("IVF64,PQ8,F16,F16", "F16", "unexpected"),
        ("Flat,F16,IVF8", "IVF8", "nothing may come after"),
        ("HNSW32", "HNSW32", "coarse quantizer"),
        ("ivf64,pq8", ["ivf64", "pq8"][0], "coarse quantizer"),
    ],
)
def test_bad_specs_name_the_token(spec, token, why) -> None:
    with pytest.raises(SpecError, match=why) as err:
        parse_spec(spec, 32)
    assert err.value.token == token
    assert isinstance(err.value, ValueError) and repr(spec) in str(err.value)


def test_two_level_params_are_checked() -> None:
    with pytest.raises(ValueError, match="not both"):
        IVFPQParams(32, 64, 8, coarse_hnsw=8, coarse_ivf=8)
    with pytest.raises(ValueError, match=r"2\.\.nlist-1"):
        IVFPQParams(32, 64, 8, coarse_ivf=64)
    with pytest.raises(TypeError, match="coarse_ivf"):
        IVFPQParams.from_dict({"d": 32, "nlist": 64, "M": 8, "coarse_ivf": "8"})
    p = IVFPQParams(32, 64, 8, coarse_ivf=8)
    assert not p.plain and not p.coarse_flat and p.spec == "IVF64_IVF8,PQ8,F16"
    # a query searches enough top lists for about 4 nprobe candidate lists, >= 16, <= top
    assert nest_probe(8, 262144, 4096) == NEST_PROBE_MIN
    assert nest_probe(512, 262144, 4096) == 32
    assert nest_probe(64, 128, 8) == 8


def test_spec_type_errors() -> None:
    with pytest.raises(TypeError, match="spec"):
        parse_spec(64, 32)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="Flat"):
        IVFPQParams.from_spec("Flat", 32)
    with pytest.raises(ValueError, match="d: pass the dimension"):
        IVFPQIndex("Flat")


# --- the HNSW + OPQ codec --------------------------------------------------------------------
def test_rotation_and_assignment_have_slow_twins(codec_hnsw_opq, small_data) -> None:
    xq = small_data[2]
    c = codec_hnsw_opq
    R = c.rotation
    assert R is not None and R.shape == (32, 32)
    np.testing.assert_allclose(R @ R.T, np.eye(32), atol=1e-4)  # a rotation: scores unchanged
    np.testing.assert_allclose(c.rotate(xq), xq @ R.T, rtol=1e-5, atol=1e-6)
    # with a deep enough search, HNSW finds what a brute-force scan of the centroids finds
    D, I = c.assign(xq, 5, ef_search=64)
    S = c.rotate(xq) @ c.centroids.T
    want = np.argsort(-S, axis=1, kind="stable")[:, :5]
    assert (want == I).mean() > 0.99
    np.testing.assert_allclose(D, np.take_along_axis(S, I, 1), rtol=1e-5, atol=1e-5)
    assert hnsw_ef(4) == 32 and hnsw_ef(64) == 128


@pytest.mark.parametrize("nbits", [8, 4])
def test_hnsw_opq_shard_agrees_with_faiss(small_data, codec_hnsw_opq, nbits) -> None:
    """fastface's scan over OPQ+HNSW codes against FAISS's own index with the same codec."""
    xb, _, xq, _ = small_data
    codec = (
        codec_hnsw_opq
        if nbits == 8
        else Codec.train(parse_spec("OPQ8,IVF32_HNSW8,PQ8x4fs,F16", 32), xb)
    )
    index = IVFPQIndex(codec)
    index.add(xb)
    ref = index.to_faiss()
    assert (
        isinstance(faiss.downcast_index(ref), faiss.IndexPreTransform) and ref.ntotal == xb.shape[0]
    )
    ivf = faiss.extract_index_ivf(ref)
    assert isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSWFlat)
    for nprobe in (1, 8):
        qp = faiss.SearchParametersHNSW()
        qp.efSearch = hnsw_ef(nprobe)
        sp = faiss.SearchParametersPreTransform()
        ivfp = faiss.SearchParametersIVF(nprobe=nprobe, quantizer_params=qp)
        sp.index_params = ivfp
        Df, If = ref.search(xq, 10, params=sp)
        D, I = index.search(xq, 10, nprobe=nprobe)
        assert_results_agree((D, I), (Df, If), atol=1e-4)
    _, gt = ground_truth(xb, xq, 10)
    assert recall_at_k(index.search(xq, 10, nprobe=32, rerank=8)[1], gt, 10) >= 0.95


def test_hnsw_opq_sharded_equals_unsharded_and_reopens(tmp_path, small_data, codec_hnsw_opq):
    xb, _, xq, _ = small_data
    one = IVFPQIndex(codec_hnsw_opq)
    one.add(xb)
    with ShardedIndex.create(tmp_path / "i", codec_hnsw_opq, shard_size=900) as index:
        index.add(xb)
        for strategy in ("stacked", "fanout"):
            got = index.search(xq, 10, nprobe=8, strategy=strategy)
            np.testing.assert_array_equal(got[1], one.search(xq, 10, nprobe=8)[1])
        want = index.search(xq, 10, nprobe=8, rerank=4)
    man = json.loads((tmp_path / "i" / "manifest.json").read_text())
    assert man["spec"] == SPEC
    for mmap in (False, True):
        with ShardedIndex.open(tmp_path / "i", mmap=mmap) as again:
            assert again.codec == codec_hnsw_opq
            got = again.search(xq, 10, nprobe=8, rerank=4)
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[0], want[0])
    # shard files are plain IVF-PQ files (flat quantizer, no rotation): FAISS reads them
    shard = tmp_path / "i" / man["shards"][0]["files"]["index"]["file"]
    plain = faiss.read_index(str(shard))
    assert isinstance(faiss.downcast_index(plain.quantizer), faiss.IndexFlat)
    np.testing.assert_array_equal(
        faiss.downcast_index(plain.quantizer).reconstruct_n(0, 32).ravel(),
        codec_hnsw_opq.centroids.ravel(),
    )
    # a single shard saves its codec beside it
    one.save(tmp_path / "one.faiss")
    back = IVFPQIndex.load(tmp_path / "one.faiss")
    np.testing.assert_array_equal(back.search(xq, 10, nprobe=8)[1], one.search(xq, 10, nprobe=8)[1])


def test_from_faiss_index_with_rotation_and_hnsw(small_data, codec_hnsw_opq) -> None:
    xb, _, xq, _ = small_data
    ref = codec_hnsw_opq.faiss_index()  # what index_factory(32, SPEC without F16) builds
    assert isinstance(faiss.downcast_index(ref), faiss.IndexPreTransform)
    ref.add(xb)
    params = parse_spec("OPQ8,IVF32_HNSW8,PQ8", 32)
    index = IVFPQIndex.from_faiss(params, ref)
    assert index.ntotal == xb.shape[0] and index.codec.rotation is not None
    ivf = faiss.extract_index_ivf(ref)
    qp = faiss.SearchParametersHNSW()
    qp.efSearch = hnsw_ef(8)
    sp = faiss.SearchParametersPreTransform()
    sp.index_params = faiss.SearchParametersIVF(nprobe=8, quantizer_params=qp)
    assert_results_agree(index.search(xq, 5, nprobe=8), ref.search(xq, 5, params=sp), atol=1e-4)
    assert ivf.ntotal == index.ntotal
    with pytest.raises(TypeError, match="IndexPreTransform"):
        IVFPQIndex.from_faiss(parse_spec("IVF32_HNSW8,PQ8", 32), ref)
    with pytest.raises(TypeError, match="OPQ rotation"):
        IVFPQIndex.from_faiss(params, ivf)


# --- training --------------------------------------------------------------------------------
def test_two_level_kmeans(monkeypatch, small_data) -> None:
    xb = small_data[0]
    counts = train._split_counts(np.array([100, 0, 5, 40, 1]), 20)
    assert (
        counts.sum() == 20
        and counts[1] == 0
        and counts[4] == 1
        and (counts <= [100, 0, 5, 40, 1]).all()
    )
    one = train.kmeans(xb, 64, spherical=True, seed=0)
    two = train.two_level_kmeans(xb, 64, spherical=True, seed=0)
    assert two.shape == (64, 32) and np.isfinite(two).all()

    def loss(c):
        return float((1 - (xb @ c.T).max(axis=1)).mean())

    # two levels lose a little against one k-means over all lists, not much
    assert loss(two) < 1.15 * loss(one)
    monkeypatch.setattr(train, "TWO_LEVEL_FROM", 16)
    codec = Codec.train(IVFPQParams(32, 64, 8), xb)
    assert codec.centroids.shape == (64, 32)


def test_faiss_warning_collapsed_into_one_log_line(capfd, caplog, small_data) -> None:
    xb = small_data[0][:1000]
    caplog.set_level(logging.INFO, logger="fastface")
    Codec.train(IVFPQParams(32, 8, 16), xb)  # 1000 points for 256 PQ centroids, 16 times
    out, err = capfd.readouterr()
    assert out == "" and "WARNING clustering" not in err, err
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "PQ: 1000 points for 256 centroids" in warnings[0].getMessage()
    stages = [r.getMessage() for r in caplog.records if "done in" in r.getMessage()]
    assert any("coarse k-means" in m for m in stages) and any("PQ codebooks" in m for m in stages)
    # lowering FAISS's threshold changes nothing but the message: same codebooks either way
    sub = np.ascontiguousarray(xb[:, :8])
    a = faiss.ProductQuantizer(8, 2, 8)
    b = faiss.ProductQuantizer(8, 2, 8)
    b.cp.min_points_per_centroid = 1
    a.train(sub)
    b.train(sub)
    np.testing.assert_array_equal(
        faiss.vector_to_array(a.centroids), faiss.vector_to_array(b.centroids)
    )
    capfd.readouterr()


# --- auto_spec -------------------------------------------------------------------------------
def test_auto_spec_choices() -> None:
    assert auto_spec(1000, 512).spec == "Flat"
    small = auto_spec(100_000, 128, memory_budget="10M")
    assert small.spec == "Flat,F16" and "float16" in small.reason
    mid = auto_spec(1_000_000, 128)
    assert mid.spec == "IVF8192,PQ32,F16" and "flat coarse quantizer" in mid.reason
    ten = auto_spec(10_000_000, 128, memory_budget="8G")
    assert ten.params.coarse_hnsw == 32 and ten.params.nlist == 32768 and "HNSW32" in ten.reason
    big = auto_spec(100_000_000, 128, memory_budget="8G")
    assert big.spec == "IVF262144_IVF4096,PQ32,F16" and big.ram_bytes < 8 << 30
    assert "two-level" in big.reason and (big.nprobe, big.rerank) == (128, 4)
    tight = auto_spec(100_000_000, 128, memory_budget="2.5G")
    assert tight.params.code_size + 16 <= 2.5 * 2**30 / 1e8 and tight.params.M < 32
    tiny = auto_spec(100_000_000, 128, memory_budget="1.9G")
    assert tiny.params.nbits == 4 and tiny.params.opq is not None
    with pytest.raises(ValueError, match="cannot hold"):
        auto_spec(100_000_000, 128, memory_budget="1G")
    with pytest.raises(ValueError, match="memory_budget"):
        auto_spec(10**6, 128, memory_budget="eight gigs")
    with pytest.raises(ValueError, match="target_recall"):
        auto_spec(10**6, 128, target_recall=1.5)
    assert fastface.auto_spec is auto_spec


# --- streaming builds ------------------------------------------------------------------------
GEN = dict(n_identities=300, per_identity=10, d=32, seed=3, n_groups=10)

BUILD_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from fastface import ShardedIndex
    from fastface.datasets import SyntheticFaces
    from fastface.index import sharded

    n = {"commits": 0}
    orig = sharded.ShardedIndex._commit_state
    def hooked(self, st, **kw):
        orig(self, st, **kw)
        n["commits"] += 1
        if n["commits"] == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
    sharded.ShardedIndex._commit_state = hooked
    gen = SyntheticFaces(**eval(sys.argv[3]))
    ShardedIndex.build(gen, sys.argv[1], "IVF16,PQ8,F16", shard_size=1000, chunk_size=300,
                       commit_every=600)
    """
)


def test_build_from_generator_killed_resumes(tmp_path) -> None:
    out = tmp_path / "idx"
    proc = subprocess.run(
        [sys.executable, "-c", BUILD_CHILD, str(out), "6", repr(GEN)],
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    with ShardedIndex.open(out) as partial:
        done = partial.build_state["rows_done"]
        assert 0 < done < 3000 and partial.ntotal == done
        assert partial.build_state["source"]["source"].startswith("SyntheticFaces(n_identities=300")
    gen = SyntheticFaces(**GEN)
    index = ShardedIndex.build(
        gen, out, "IVF16,PQ8,F16", shard_size=1000, chunk_size=300, commit_every=600
    )
    with index:
        assert index.build_state["complete"] and index.ntotal == 3000
        assert index.shard_counts == [1000, 1000, 1000]
        xb, _ = gen.vectors()
        np.testing.assert_array_equal(
            index.get_vectors(np.arange(3000)), xb.astype(np.float16).astype(np.float32)
        )
        # the same rows as a build from the array in one go
        ref = ShardedIndex.build(
            xb, tmp_path / "ref", index.codec.params, shard_size=1000, chunk_size=300
        )
        with ref:
            xq, _ = gen.queries(20)
            assert (
                recall_at_k(
                    index.search(xq, 10, nprobe=16)[1], ref.search(xq, 10, nprobe=16)[1], 10
                )
                > 0.6
            )


def test_build_from_chunk_function_resumes_and_iterables_do_not(tmp_path, small_data) -> None:
    xb = small_data[0]
    calls = []

    def chunks(start):
        calls.append(start)
        for lo in range(start, 2000, 250):
            yield xb[lo : lo + 250]

    index = ShardedIndex.build(chunks, tmp_path / "a", "Flat", shard_size=800, chunk_size=250)
    index.set_build_state(dict(index.build_state, rows_done=1000, complete=False))
    index.close()
    # pretend the build stopped at 1000 rows: sealed shard 0 and the open shard are kept...
    with ShardedIndex.open(tmp_path / "a", mode="a") as idx:
        idx.remove(np.arange(1000, 2000))
        idx.compact()
    index = ShardedIndex.build(chunks, tmp_path / "a", "Flat", shard_size=800, chunk_size=250)
    with index:
        assert calls[-1] == 1000 and index.ntotal == 2000
        np.testing.assert_array_equal(np.sort(index.live_ids()), np.arange(2000))
    gen = (xb[lo : lo + 500] for lo in range(0, 2000, 500))
    ShardedIndex.build(gen, tmp_path / "b", "Flat", progress=False).close()
    with pytest.raises(FileExistsError, match="cannot resume"):
        ShardedIndex.build((x for x in [xb]), tmp_path / "b", "Flat")
    with pytest.raises(ValueError, match="size is unknown"):
        ShardedIndex.build((x for x in [xb]), tmp_path / "c")


def test_build_chooses_with_auto_spec_and_library_prints_nothing(tmp_path, capfd, caplog) -> None:
    caplog.set_level(logging.INFO, logger="fastface")
    gen = SyntheticFaces(**GEN)
    with ShardedIndex.build(gen, tmp_path / "auto") as index:
        assert index.params == FlatParams(32)
        assert "n * d" in index.build_state["auto_spec"]
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert any("auto_spec chose Flat" in r.getMessage() for r in caplog.records)


# --- search at scale -------------------------------------------------------------------------
def test_shards_without_probed_lists_are_skipped(tmp_path, small_data, codec32, monkeypatch):
    xb, _, xq, _ = small_data
    lists, _ = codec32.encode(xb)
    order = np.argsort(lists, kind="stable")  # shards then hold disjoint ranges of lists
    with ShardedIndex.create(tmp_path / "s", codec32, shard_size=500) as index:
        index.add(xb[order], order)
        want = index.search(xq, 10, nprobe=2, strategy="stacked")
        calls = []
        orig = IVFPQIndex.scan

        def counting(self, q, k, assignment, **kw):
            calls.append(q.shape[0])
            return orig(self, q, k, assignment, **kw)

        monkeypatch.setattr(IVFPQIndex, "scan", counting)
        got = index.search(xq, 10, nprobe=2, strategy="fanout")
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
        # each query probes 2 of 32 lists: it visits 1-3 of the 8 shards, never all
        assert len(calls) <= index.nshards and sum(calls) < xq.shape[0] * index.nshards / 2


@pytest.mark.parametrize("ids", ["disjoint", "interleaved"])
def test_routed_rescore_equals_every_shard_rescore(tmp_path, small_data, codec32, ids) -> None:
    from fastface._native import merge_topk

    xb, _, xq, _ = small_data
    id_arr = (
        np.arange(xb.shape[0]) * 2
        if ids == "disjoint"
        else np.random.default_rng(1).permutation(xb.shape[0] * 3)[: xb.shape[0]]
    )
    with ShardedIndex.create(tmp_path / "r", codec32, shard_size=700) as index:
        index.add(xb, id_arr)
        index.remove(id_arr[:50])
        cand = np.concatenate(
            [index.scan(xq, 40, index.assign(xq, 8))[1], id_arr[:5][None].repeat(xq.shape[0], 0)],
            axis=1,
        )
        cand[:, 3] = -1
        got = index.rescore(xq, cand, 10)
        live = np.where(np.isin(cand, id_arr[:50]), -1, cand)
        parts = [s.rescore(xq, live, 10) for s in index.shards()]
        want = merge_topk(
            np.stack([p[0] for p in parts]),
            np.stack([p[1] for p in parts]),
            10,
            larger_is_better=True,
        )
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])


# --- the two-level coarse quantizer (coarse_ivf) ---------------------------------------------
NEST_SPEC = "IVF128_IVF8,PQ8,F16"


@pytest.fixture(scope="module")
def codec_nested(small_data):
    return Codec.train(parse_spec(NEST_SPEC, 32), small_data[0])


def _nested_twin(codec, x, nprobe, top_probe):
    """The two-level assignment by brute force: each centroid belongs to its nearest top
    centroid; a row's lists are its best ``nprobe`` among the groups of its ``top_probe``
    nearest top centroids (inner product, ties by lower number)."""
    nested = faiss.downcast_index(codec.coarse_quantizer())
    top = nested.quantizer.reconstruct_n(0, nested.nlist)
    C = codec.centroids
    parent = np.argmax(C @ top.T, axis=1)
    groups = np.argsort(-(x @ top.T), axis=1, kind="stable")[:, :top_probe]
    S = x @ C.T
    allowed = (parent[None, :, None] == groups[:, None, :]).any(axis=2)
    S = np.where(allowed, S, -np.inf)
    I = np.argsort(-S, axis=1, kind="stable")[:, :nprobe]
    return np.take_along_axis(S, I, 1), I


def test_two_level_assignment_has_a_slow_twin(codec_nested, small_data) -> None:
    xb, _, xq, _ = small_data
    c = codec_nested
    nested = faiss.downcast_index(c.coarse_quantizer())
    assert isinstance(nested, faiss.IndexIVFFlat) and nested.nlist == 8 and nested.ntotal == 128
    # adds: the nearest centroid among the groups of the NEST_PROBE_ADD nearest top centroids
    lists, _ = c.encode(xb[:500])
    _, want = _nested_twin(c, xb[:500], 1, NEST_PROBE_ADD)
    assert (lists == want[:, 0]).mean() > 0.995
    # queries: the best nprobe among the groups of nest_probe(...) top centroids
    for nprobe in (4, 16):
        D, I = c.assign(xq, nprobe)
        _, want = _nested_twin(c, xq, nprobe, nest_probe(nprobe, 128, 8))
        assert (want == I).mean() > 0.99
        np.testing.assert_allclose(D, np.take_along_axis(xq @ c.centroids.T, I, 1), atol=1e-5)
    # every centroid is stored once under its own number, so nothing is lost by the grouping
    np.testing.assert_array_equal(nested.reconstruct_n(0, 128), c.centroids)


def test_two_level_sharded_search_recall_and_files(tmp_path, small_data, codec_nested) -> None:
    xb, _, xq, _ = small_data
    one = IVFPQIndex(codec_nested)
    one.add(xb)
    _, gt = ground_truth(xb, xq, 10)
    assert recall_at_k(one.search(xq, 10, nprobe=32, rerank=8)[1], gt, 10) >= 0.95
    with ShardedIndex.create(tmp_path / "i", codec_nested, shard_size=900) as index:
        index.add(xb)
        got = index.search(xq, 10, nprobe=8, rerank=4)
    np.testing.assert_array_equal(got[1], one.search(xq, 10, nprobe=8, rerank=4)[1])
    man = json.loads((tmp_path / "i" / "manifest.json").read_text())
    assert man["spec"] == NEST_SPEC
    for mmap in (False, True):
        with ShardedIndex.open(tmp_path / "i", mmap=mmap) as again:
            assert again.codec == codec_nested
            np.testing.assert_array_equal(again.search(xq, 10, nprobe=8, rerank=4)[1], got[1])
    # shard files are plain IVF-PQ files; the codec file is FAISS's own nested quantizer
    shard = tmp_path / "i" / man["shards"][0]["files"]["index"]["file"]
    assert isinstance(faiss.downcast_index(faiss.read_index(str(shard)).quantizer), faiss.IndexFlat)
    full = faiss.read_index(str(tmp_path / "i" / man["codec"]["file"]))
    assert isinstance(faiss.downcast_index(full.quantizer), faiss.IndexIVFFlat)
    one.save(tmp_path / "one.faiss")
    back = IVFPQIndex.load(tmp_path / "one.faiss", mmap=True)
    np.testing.assert_array_equal(back.search(xq, 10, nprobe=8)[1], one.search(xq, 10, nprobe=8)[1])


def test_two_level_shard_agrees_with_faiss(small_data, codec_nested) -> None:
    """fastface's scan against FAISS's own index with the same nested quantizer."""
    xb, _, xq, _ = small_data
    index = IVFPQIndex(codec_nested)
    index.add(xb)
    ref = index.to_faiss()
    assert isinstance(faiss.downcast_index(ref.quantizer), faiss.IndexIVFFlat)
    for nprobe in (1, 8):
        qp = faiss.SearchParametersIVF(nprobe=nest_probe(nprobe, 128, 8))
        Df, If = ref.search(
            xq, 10, params=faiss.SearchParametersIVF(nprobe=nprobe, quantizer_params=qp)
        )
        assert_results_agree(index.search(xq, 10, nprobe=nprobe), (Df, If), atol=1e-4)
    back = IVFPQIndex.from_faiss(parse_spec("IVF128_IVF8,PQ8", 32), ref)
    np.testing.assert_array_equal(back.search(xq, 5, nprobe=8)[1], index.search(xq, 5, nprobe=8)[1])


def test_two_level_fast_scan_adds_where_the_codec_assigns(small_data) -> None:
    """4-bit codes are added by FAISS through the codec's quantizer: each vector must land in
    the list ``Codec.encode`` names (the same 4 top-level groups), so searches agree."""
    xb, _, xq, _ = small_data
    codec = Codec.train(parse_spec("IVF128_IVF8,PQ8x4fs,F16", 32), xb)
    index = IVFPQIndex(codec)
    index.add(xb)
    ref = index.to_faiss()  # keep the owner alive while its IVF part is read
    ivf = faiss.extract_index_ivf(ref)
    got = np.full(xb.shape[0], -1, np.int64)
    for lst in range(ivf.nlist):
        size = ivf.invlists.list_size(lst)
        if size:
            got[faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), size).copy()] = lst
    np.testing.assert_array_equal(got, codec.encode(xb)[0])
    _, gt = ground_truth(xb, xq, 10)
    assert recall_at_k(index.search(xq, 10, nprobe=32, rerank=8)[1], gt, 10) >= 0.9


def test_two_level_fourcc_fields_are_checked(codec_nested) -> None:
    raw = codec_nested.to_bytes()
    layout = faiss_format.parse(raw, "c")
    layout.check(codec_nested.params, ntotal=0, buf=raw)
    assert layout.nested["top"] == 8 and layout.hnsw is None
    with pytest.raises(CorruptIndexError, match=r"quantizer\.ivf"):
        layout.check(IVFPQParams(32, 128, 8), ntotal=0)
    with pytest.raises(CorruptIndexError, match=r"quantizer\.ivf\.nlist"):
        layout.check(IVFPQParams(32, 128, 8, coarse_ivf=16), ntotal=0)
    dmap_at = layout.nested["direct_map_off"]
    assert int.from_bytes(raw[dmap_at : dmap_at + 8], "little") == int(
        faiss.downcast_index(codec_nested.coarse_quantizer()).direct_map.array.at(0)
    )

    def broken(off: int, value: bytes) -> bytes:
        data = bytearray(raw)
        data[off : off + len(value)] = value
        return bytes(data)

    # the direct map points where FAISS reads a centroid: a crafted entry is refused
    with pytest.raises(CorruptIndexError, match="direct_map"):
        faiss_format.parse(broken(dmap_at, (7 << 32 | 10**6).to_bytes(8, "little")), "c")
    # a centroid stored twice (another's number) is refused
    ids_at = int(layout.nested["codes_off"][0] + layout.nested["sizes"][0] * 4 * 32)
    other = int.from_bytes(raw[ids_at + 8 : ids_at + 16], "little")
    with pytest.raises(CorruptIndexError, match=r"lists\.ids"):
        faiss_format.parse(broken(ids_at, other.to_bytes(8, "little")), "c")
    # a non-finite centroid in the lists is refused by the value check
    bad = broken(int(layout.nested["codes_off"][1]), np.float32(np.nan).tobytes())
    with pytest.raises(CorruptIndexError, match="centroids"):
        faiss_format.parse(bad, "c").check(codec_nested.params, ntotal=0, buf=bad)


def test_two_level_codec_fuzz_never_kills_the_process(tmp_path, small_data, codec_nested) -> None:
    path, raw = _fuzz_index(tmp_path, small_data[0], codec_nested)
    at = raw.find(b"IwFl")
    rng = np.random.default_rng(9)
    offsets = [int(o) for o in rng.integers(at, at + 1200, 120)]  # headers, top, map
    offsets += [int(o) for o in rng.integers(at, len(raw), 80)]  # the lists
    _assert_fuzz_survives(path, [(o, int(rng.integers(256))) for o in offsets])


# --- file format: the new kinds are checked before FAISS reads them ---------------------------
def test_crafted_hnsw_and_rotation_fields_are_refused(tmp_path, codec_hnsw_opq) -> None:
    raw = np.frombuffer(codec_hnsw_opq.to_bytes(), np.uint8)
    layout = faiss_format.parse(raw, "c")
    layout.check(codec_hnsw_opq.params, ntotal=0, buf=raw)
    assert layout.hnsw["M"] == 8 and layout.transform["d_in"] == 32
    with pytest.raises(CorruptIndexError, match="opq"):
        layout.check(IVFPQParams(32, 32, 8, coarse_hnsw=8), ntotal=0)
    with pytest.raises(CorruptIndexError, match="hnsw"):
        layout.check(IVFPQParams(32, 32, 8, opq=8), ntotal=0)
    # a neighbour pointing outside the graph: FAISS's search would read out of bounds
    data = bytearray(raw.tobytes())
    nb_at = data.find(b"IHNf")
    assert nb_at > 0
    ref = faiss_format.parse(bytes(data), "c")
    idx = _neighbors_offset(bytes(data), nb_at)
    data[idx : idx + 4] = (10**6).to_bytes(4, "little")
    with pytest.raises(CorruptIndexError, match="neighbour"):
        faiss_format.parse(bytes(data), "c")
    assert ref.hnsw is not None


def _neighbors_offset(raw: bytes, at: int) -> int:
    """Byte offset of the first HNSW neighbour entry after the IHNf fourcc at ``at``."""
    pos = at + 4 + 4 + 8 + 16 + 1 + 4  # fourcc, d, ntotal, 2 x reserved, is_trained, metric
    for item in (8, 4, 4, 8):  # assign_probas, cum_nneighbor_per_level, levels, offsets
        n = int.from_bytes(raw[pos : pos + 8], "little")
        pos += 8 + n * item
    return pos + 8  # past the neighbours' count


FUZZ_CHILD = textwrap.dedent(
    """
    import hashlib, json, sys
    from pathlib import Path
    import numpy as np
    from fastface import ShardedIndex
    from fastface.errors import CorruptIndexError
    from fastface.index import storage

    path, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    man0 = json.loads((path / "manifest.json").read_text())
    name = man0["codec"]["file"]
    raw = (path / name).read_bytes()
    q = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    for off, val in cases:
        data = bytearray(raw)
        data[off] = val
        (path / name).write_bytes(bytes(data))
        man = json.loads(json.dumps(man0))
        man.pop("checksum")
        man["codec"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
        (path / "manifest.json").write_text(json.dumps(storage.seal(man)))
        try:
            with ShardedIndex.open(path) as index:
                index.search(q, 5, nprobe=4)
            print("opened", flush=True)
        except CorruptIndexError:
            print("corrupt", flush=True)
        except Exception as e:
            print("other", type(e).__name__, e, flush=True)
    """
)


def _fuzz_index(tmp_path: Path, xb: np.ndarray, codec: Codec) -> tuple[Path, bytes]:
    """A small sharded index of ``codec`` to fuzz: its directory and its codec file's bytes."""
    path = tmp_path / "z"
    with ShardedIndex.create(path, codec, shard_size=500) as index:
        index.add(xb[:600])
    man = json.loads((path / "manifest.json").read_text())
    return path, (path / man["codec"]["file"]).read_bytes()


def _assert_fuzz_survives(path: Path, cases: list[tuple[int, int]]) -> None:
    """Each (offset, byte) written into the codec file in turn, in a child process: it must
    open the index (and search) or raise CorruptIndexError, never die; most must be caught."""
    proc = subprocess.run(
        [sys.executable, "-c", FUZZ_CHILD, str(path), json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    status = proc.stdout.split("\n")[:-1]
    assert proc.returncode == 0, (
        f"child died at case {len(status)}: {cases[len(status)]}: {proc.stderr[-2000:]}"
    )
    assert len(status) == len(cases)
    assert not [s for s in status if s not in ("opened", "corrupt")], status
    assert status.count("corrupt") > 50


def test_codec_file_fuzz_never_kills_the_process(tmp_path, small_data, codec_hnsw_opq) -> None:
    path, raw = _fuzz_index(tmp_path, small_data[0], codec_hnsw_opq)
    rng = np.random.default_rng(5)
    at = raw.find(b"IHNf")
    header = [int(o) for o in rng.integers(0, at + 400, 150)]  # rotation, IVF and graph headers
    anywhere = [int(o) for o in rng.integers(0, len(raw), 100)]
    _assert_fuzz_survives(path, [(o, int(rng.integers(256))) for o in header + anywhere])


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc smaps")
def test_rerank_vectors_are_mapped_for_random_reads(tmp_path) -> None:
    """Re-rank rows are read one by one: their mapping must not read around each fault
    (at 100M, read-around made every 256-byte candidate cost 128 KiB of disk reads)."""
    src = SyntheticFaces(n_identities=300, per_identity=10, d=32, seed=0, n_groups=10)
    ShardedIndex.build(src, tmp_path / "idx", "IVF16,PQ8,F16", shard_size=1000).close()

    def flags() -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        name = ""
        for line in Path("/proc/self/smaps").read_text().splitlines():
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:
                name = head[-1] if len(head) >= 6 else ""
            elif line.startswith("VmFlags:") and str(tmp_path) in name:
                out[Path(name).name] = head[1:]
        return out

    with ShardedIndex.open(tmp_path / "idx", mmap=True) as index:
        _, I = index.search(src.queries(3)[0], 5, nprobe=4, rerank=2)
        mapped = flags()
        vec = {k: v for k, v in mapped.items() if k.endswith(".f16.npy")}
        codes = {k: v for k, v in mapped.items() if k.endswith(".faiss") and "shard" in k}
        assert len(vec) == 3 and codes, mapped
        assert all("rr" in v for v in vec.values()), vec
        # the code lists are scanned front to back: read-around stays on for them
        assert not any("rr" in v for v in codes.values()), codes
        # shards adopted from staging (a distributed build) are mapped the same way
        path = tmp_path / "adopted"
        with ShardedIndex.create(path, index.codec, shard_size=1000) as w:
            recs = [ShardedIndex.stage_shard(path, i, s) for i, s in enumerate(index.shards())]
            assert w.adopt(recs) == [0, 1, 2]
            adopted = {
                k: v
                for k, v in flags().items()
                if k.endswith(".f16.npy") and k in {f.name for f in path.glob("*.f16.npy")}
            }
            assert len(adopted) == 3 and all("rr" in v for v in adopted.values()), adopted
    assert (I >= 0).all()
