"""The fastface command end to end on a small file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastface.cli import main
from fastface.datasets import SyntheticFaces
from fastface.eval import ground_truth, recall_at_k


def test_build_info_search(tmp_path, capsys) -> None:
    data = SyntheticFaces(300, 10, 32, seed=4)
    xb, _ = data.vectors()
    xq, _ = data.queries(20)
    np.save(tmp_path / "xb.npy", xb)
    np.save(tmp_path / "xq.npy", xq)
    idx = tmp_path / "idx"
    assert (
        main(
            [
                "build",
                str(tmp_path / "xb.npy"),
                str(idx),
                "--nlist",
                "16",
                "--M",
                "8",
                "--shard-size",
                "1000",
                "--quiet",
            ]
        )
        == 0
    )
    built = json.loads(capsys.readouterr().out)
    assert built["ntotal"] == 3000 and built["nshards"] == 3
    assert main(["info", str(idx)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["checksums"] == "verified" and info["shard_counts"] == [1000, 1000, 1000]
    assert main(["search", str(idx), str(tmp_path / "xq.npy"), "-k", "5", "--nprobe", "16"]) == 0
    res = json.loads(capsys.readouterr().out)
    I = np.array(res["I"])
    _, gt = ground_truth(xb, xq, 5)
    assert I.shape == (20, 5) and recall_at_k(I, gt, 5) > 0.7
    out = tmp_path / "res.npz"
    assert (
        main(
            [
                "search",
                str(idx),
                str(tmp_path / "xq.npy"),
                "-k",
                "5",
                "--nprobe",
                "16",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(np.load(out)["I"], I)
    # errors name the flag the user typed, not the Python argument
    q = str(tmp_path / "xq.npy")
    assert main(["search", str(idx), q, "--nprobe", "5000"]) == 2
    err = capsys.readouterr().err
    assert "--nprobe 5000 exceeds --nlist 16" in err
    assert main(["search", str(idx), q, "-k", "0"]) == 2
    assert "-k: expected a positive integer" in capsys.readouterr().err
    assert main(["build", str(tmp_path / "xb.npy"), str(idx), "--nlist", "16", "--M", "7"]) == 2
    assert "--M 7 must divide --d 32" in capsys.readouterr().err


def test_errors_are_reported_not_raised(tmp_path, capsys) -> None:
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "no such index directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["build"])
    capsys.readouterr()


def test_help_texts(capsys) -> None:
    for cmd in (
        ["--help"],
        ["bench", "ann", "--help"],
        ["build", "--help"],
        ["search", "--help"],
        ["info", "--help"],
    ):
        with pytest.raises(SystemExit) as e:
            main(cmd)
        assert e.value.code == 0
        assert "usage: fastface" in capsys.readouterr().out


def test_bench_ann_smoke(tmp_path, capsys) -> None:
    out = tmp_path / "ann.json"
    assert (
        main(
            [
                "bench",
                "ann",
                "--n-identities",
                "300",
                "--per-identity",
                "10",
                "--d",
                "32",
                "--groups",
                "10",
                "--nlist",
                "16",
                "--M",
                "8",
                "--nq",
                "30",
                "--repeat",
                "1",
                "--nprobe",
                "1",
                "16",
                "--shards",
                "1",
                "3",
                "--work-dir",
                str(tmp_path / "w"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "faiss IndexIVFPQ" in text and "fastface 3 shards" in text
    res = json.loads(out.read_text())
    assert res["meta"]["build_info"]["simd"] and res["meta"]["git_sha"] is not None
    methods = {r["method"] for r in res["rows"]}
    assert methods == {
        "faiss IndexIVFPQ",
        "fastface 1 shard",
        "fastface 3 shards",
        "faiss IndexFlatIP (exact)",
    }
    exact = next(r for r in res["rows"] if r["method"].endswith("(exact)"))
    assert exact["R@10"] == 1.0
    # same codec, same vectors: fastface and FAISS find the same neighbours
    for nprobe in (1, 16):
        rec = {r["method"]: r["R@10"] for r in res["rows"] if r["nprobe"] == nprobe}
        assert rec["fastface 1 shard"] == rec["faiss IndexIVFPQ"] == rec["fastface 3 shards"]
    assert out.with_suffix(".png").stat().st_size > 1000
