"""The fastface command: Unix conventions (exit codes, errors, pipes, JSON) and every verb."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastface.cli import main
from fastface.datasets import SyntheticFaces
from fastface.eval import ground_truth, recall_at_k


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity, as a strict parser (and other languages) would."""

    def bad(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=bad)


def strict_jsonl(text: str) -> list:
    return [strict_json(line) for line in text.splitlines()]


def cli(*argv: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m fastface ARGV` in a child process (the real entry point, real streams)."""
    return subprocess.run(
        [sys.executable, "-m", "fastface", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    data = SyntheticFaces(300, 10, 32, seed=4)
    xb, _ = data.vectors()
    xq, _ = data.queries(20)
    np.save(tmp / "xb.npy", xb)
    np.save(tmp / "xq.npy", xq)
    return tmp, xb, xq


@pytest.fixture(scope="module")
def built(files):
    tmp = files[0]
    idx = tmp / "idx"
    args = ["build", str(tmp / "xb.npy"), str(idx), "--nlist", "16", "--M", "8"]
    code = main([*args, "--shard-size", "1000", "--no-progress"])
    assert code == 0
    return idx


def test_build_info_search(files, built, capsys) -> None:
    tmp, xb, xq = files
    capsys.readouterr()
    assert main(["info", str(built)]) == 0
    info = strict_json(capsys.readouterr().out)
    assert info["checksums"] == "verified" and info["shard_counts"] == [1000, 1000, 1000]
    assert info["ntotal"] == 3000 and info["nshards"] == 3

    assert main(["search", str(built), str(tmp / "xq.npy"), "-k", "5"]) == 0
    res = strict_json(capsys.readouterr().out)
    # the parameters actually used are echoed, the default nprobe included
    assert res["params"]["nprobe"] == 16 and res["params"]["k"] == 5
    assert res["params"]["rerank"] is None and res["params"]["metric"] == "ip"
    I = np.array([r["ids"] for r in res["results"]])
    _, gt = ground_truth(xb, xq, 5)
    assert I.shape == (20, 5) and recall_at_k(I, gt, 5) > 0.7

    out = tmp / "res.npz"
    assert main(["search", str(built), str(tmp / "xq.npy"), "-k", "5", "-o", str(out)]) == 0
    capsys.readouterr()
    np.testing.assert_array_equal(np.load(out)["I"], I)


def test_search_rerank_gives_exact_scores(files, built, capsys) -> None:
    tmp, xb, xq = files
    capsys.readouterr()
    args = ["search", str(built), str(tmp / "xq.npy"), "-k", "3", "--nprobe", "16"]
    assert main([*args, "--rerank", "20"]) == 0
    res = strict_json(capsys.readouterr().out)
    assert res["params"]["rerank"] == 20 and res["params"]["scores"] == "exact"
    for r in res["results"]:
        exact = xb[r["ids"]] @ xq[r["query"]]
        np.testing.assert_allclose(r["scores"], exact, atol=2e-3)  # float16 storage


def test_json_is_strict_and_padding_is_left_out(files, built, capsys, tmp_path) -> None:
    tmp, _, _ = files
    capsys.readouterr()
    # k above the vectors one probed list holds: padded entries must not become "-inf"
    assert main(["search", str(built), str(tmp / "xq.npy"), "-k", "400", "--nprobe", "1"]) == 0
    res = strict_json(capsys.readouterr().out)
    lengths = {len(r["ids"]) for r in res["results"]}
    assert min(lengths) < 400
    for r in res["results"]:
        assert len(r["ids"]) == len(r["scores"]) and -1 not in r["ids"]
    out = tmp_path / "r.jsonl"
    assert (
        main(
            [
                "search",
                str(built),
                str(tmp / "xq.npy"),
                "-k",
                "400",
                "--nprobe",
                "1",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    lines = strict_jsonl(out.read_text())
    assert [line["query"] for line in lines] == list(range(20))
    assert lines == res["results"]


def test_errors_name_the_flag_the_user_typed(files, built, tmp_path, capsys) -> None:
    tmp, _, _ = files
    q = str(tmp / "xq.npy")
    capsys.readouterr()
    assert main(["search", str(built), q, "--nprobe", "5000"]) == 2
    assert "--nprobe 5000 exceeds --nlist 16" in capsys.readouterr().err
    assert main(["search", str(built), q, "-k", "0"]) == 2
    assert "-k: expected a positive integer" in capsys.readouterr().err
    idx = tmp_path / "i"
    assert main(["build", str(tmp / "xb.npy"), str(idx), "--nlist", "16", "--M", "7"]) == 2
    assert "--M 7 must divide --d 32" in capsys.readouterr().err
    # the library's own message, from deep inside a call, is translated too
    assert main(["search", str(built), q, "-k", "70000"]) == 1
    assert "-k" in capsys.readouterr().err


def test_index_add_remove_compact_dedup(files, tmp_path, capsys) -> None:
    src, xb, _ = files
    idx = tmp_path / "idx"
    build = ["build", str(src / "xb.npy"), str(idx), "--nlist", "16", "--M", "8"]
    assert main([*build, "--shard-size", "1000", "--quiet"]) == 0
    capsys.readouterr()
    extra = xb[:10] * 0.999 + 0.001 * xb[10:20]  # near copies of rows 0..9
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    np.save(tmp_path / "extra.npy", extra.astype(np.float32))
    assert main(["index", "add", str(idx), str(tmp_path / "extra.npy")]) == 0
    added = strict_json(capsys.readouterr().out)
    assert added == {"added": 10, "first_id": 3000, "last_id": 3009, "ntotal": 3010}

    assert main(["dedup", str(idx), "--threshold", "0.99", "--nprobe", "16"]) == 0
    out = capsys.readouterr()
    groups = strict_jsonl(out.out)
    pairs = {tuple(g["ids"]) for g in groups if g["size"] == 2}
    assert {(i, 3000 + i) for i in range(10)} <= pairs
    assert "groups" in out.err

    assert main(["index", "remove", str(idx), "3000", "3001", "12345"]) == 0
    removed = strict_json(capsys.readouterr().out)
    assert removed["removed"] == 2 and removed["ntotal"] == 3008
    np.save(tmp_path / "ids.npy", np.array([0, 1], np.int64))
    assert main(["index", "remove", str(idx), "--ids-file", str(tmp_path / "ids.npy")]) == 0
    assert strict_json(capsys.readouterr().out)["ntotal"] == 3006
    assert main(["index", "compact", str(idx)]) == 0
    compacted = strict_json(capsys.readouterr().out)
    assert compacted["ntotal"] == 3006 and compacted["removed"] == 2  # the sealed shard's
    assert main(["info", str(idx)]) == 0
    assert strict_json(capsys.readouterr().out)["pending_removals"] == 0


def test_exit_codes_and_one_line_errors(files, built, tmp_path, capsys) -> None:
    tmp, _, _ = files
    capsys.readouterr()
    # usage errors (2): found before any work, argparse's or ours
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "no such index directory" in capsys.readouterr().err
    assert main(["build"]) == 2
    capsys.readouterr()
    assert main(["search", str(built), str(tmp / "xq.npy"), "-o", str(tmp_path / "r.csv")]) == 2
    err = capsys.readouterr().err
    assert "r.csv" in err and ".json" in err and not (tmp_path / "r.csv").exists()
    assert main(["search", str(built), str(tmp / "xq.npy"), "--nprobe", "999"]) == 2
    assert "--nlist 16" in capsys.readouterr().err
    assert main(["search", str(built), str(tmp_path / "nope.npy")]) == 2
    assert "nope.npy" in capsys.readouterr().err
    # runtime errors (1): one line naming the file, no traceback
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "manifest.json" in err and "Traceback" not in err
    # --debug shows the traceback instead
    with pytest.raises(Exception, match="manifest"):
        main(["--debug", "info", str(bad)])


def test_python_m_fastface_version_help_and_broken_pipe(files, built) -> None:
    tmp, _, _ = files
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("fastface ")
    r = cli("search", "--help")
    assert r.returncode == 0
    assert "(default: 10)" in r.stdout and "{8,4}" not in r.stdout  # defaults shown
    r = cli("build", "--help")
    assert "{8,4}" in r.stdout and "{ip,l2}" in r.stdout  # choices shown
    # a reader that stops early (`fastface search ... | head -c 100`) ends the command quietly
    big = np.repeat(np.load(tmp / "xq.npy"), 200, axis=0)
    np.save(tmp / "big.npy", big)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastface", "search", str(built), str(tmp / "big.npy"), "-k", "50"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert len(proc.stdout.read(100)) == 100
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_no_progress_bar_without_a_terminal(files, tmp_path) -> None:
    tmp, _, _ = files
    r = cli("build", str(tmp / "xb.npy"), str(tmp_path / "i"), "--nlist", "16", "--M", "8")
    assert r.returncode == 0, r.stderr
    assert "vec/s" not in r.stderr and "%|" not in r.stderr
    r = cli(
        "build", str(tmp / "xb.npy"), str(tmp_path / "j"), "--nlist", "16", "--M", "8", "--progress"
    )
    assert r.returncode == 0 and "%|" in r.stderr


def test_help_texts(capsys) -> None:
    for cmd in (
        ["--help"],
        ["bench", "ann", "--help"],
        ["build", "--help"],
        ["search", "--help"],
        ["info", "--help"],
        ["index", "add", "--help"],
        ["index", "remove", "--help"],
        ["index", "compact", "--help"],
        ["dedup", "--help"],
        ["gallery", "--help"],
        ["gallery", "enroll", "--help"],
    ):
        assert main(cmd) == 0
        assert "usage: fastface" in capsys.readouterr().out


def test_gallery_round_trip(tmp_path, capsys) -> None:
    D, PER, PURPOSE = 32, 8, "door_access"

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["gallery", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    train, _ = SyntheticFaces(n_identities=400, per_identity=5, d=D, seed=99).vectors()
    xb, _ = SyntheticFaces(n_identities=20, per_identity=PER, d=D, seed=98).vectors()
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "a.npy", xb[:PER])
    np.save(tmp_path / "b.npy", xb[PER : 2 * PER])
    g = str(tmp_path / "g")
    code, out, _ = run(
        "create", g, "--train", str(tmp_path / "train.npy"), "--purpose", PURPOSE,
        "--embedder-id", "syn", "--nlist", "16", "--M", "16",
    )  # fmt: skip
    assert code == 0 and strict_json(out)["d"] == D
    for name, f in (("ann", "a.npy"), ("ben", "b.npy")):
        code, out, _ = run(
            "enroll", g, "--subject", name, "--embeddings", str(tmp_path / f),
            "--legal-basis", "contract",
        )  # fmt: skip
        assert code == 0 and len(strict_json(out)["record_ids"]) == PER
    query = ["--queries", str(tmp_path / "a.npy"), "-k", "2", "--requester", "cli"]
    code, out, _ = run("search", g, *query, "--purpose", PURPOSE)
    assert code == 0 and strict_json(out)["matches"][0][0]["subject_id"] == "ann"
    code, _, err = run("search", g, *query, "--purpose", "ads")
    assert code == 1 and "purpose" in err and err.count("\n") == 1
    code, out, _ = run("export", g, "--subject", "ann", "--out", str(tmp_path / "exp"))
    assert code == 0 and strict_json(out)["records"] == PER
    face = ["--face", str(tmp_path / "b.npy"), "--threshold", "0.95"]
    code, out, _ = run("erase", g, *face)
    plan = strict_json(out)
    assert code == 0 and plan["erased"] is False and plan["plan"]["subjects"] == {"ben": PER}
    code, out, _ = run("erase", g, *face, "--yes")
    assert code == 0 and strict_json(out)["receipt"]["records_erased"] == PER
    code, out, _ = run("erase", g, "--subject", "ann")
    assert code == 0 and strict_json(out)["records_erased"] == PER
    # erasure is idempotent: erasing again succeeds and says nothing was held
    code, out, _ = run("erase", g, "--subject", "ann")
    again = strict_json(out)
    assert code == 0 and again["erased"] is False and "ann" in again["message"]
    code, _, err = run("erase", g)
    assert code == 2 and "--subject" in err
    code, out, _ = run("compact", g, "--purge-expired")
    assert code == 0 and strict_json(out)["expired"] is None
    code, out, _ = run("audit", g, "--head")
    lines = strict_jsonl(out)
    head, entries = lines[0], lines[1:]
    kinds = [e["kind"] for e in entries]
    assert code == 0 and kinds.count("erase") == 2 and kinds.count("search") == 1
    assert head["seq"] == len(entries)


def test_corrupt_gallery_database_is_one_line_naming_the_file(tmp_path, capsys) -> None:
    train, _ = SyntheticFaces(n_identities=400, per_identity=5, d=32, seed=99).vectors()
    np.save(tmp_path / "train.npy", train)
    g = tmp_path / "g"
    assert main(
        ["gallery", "create", str(g), "--train", str(tmp_path / "train.npy"), "--purpose", "p",
         "--embedder-id", "syn", "--nlist", "16", "--M", "16"]
    ) == 0  # fmt: skip
    capsys.readouterr()
    db = next(p for p in g.rglob("*.sqlite"))
    with open(db, "r+b") as f:
        f.seek(0)
        f.write(b"\0" * 100)  # the SQLite header
    code = main(["gallery", "audit", str(g)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert str(g) in err


def test_bench_ann_smoke(tmp_path, capsys) -> None:
    out = tmp_path / "ann.json"
    args = ["bench", "ann", "--n-identities", "300", "--per-identity", "10", "--d", "32"]
    args += ["--groups", "10", "--nlist", "16", "--M", "8", "--nq", "30", "--repeat", "1"]
    args += ["--nprobe", "1", "16", "--shards", "1", "3", "--work-dir", str(tmp_path / "w")]
    assert main([*args, "--out", str(out)]) == 0
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
