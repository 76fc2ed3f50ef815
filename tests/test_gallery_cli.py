"""``fastface gallery``: no training needed, cosine thresholds, status/verify/train, read-only
commands while a writer holds the gallery, receipts verified from a file."""

from __future__ import annotations

import json

import numpy as np

from fastface import Gallery
from fastface.cli import main
from fastface.datasets import SyntheticFaces

D, PER, PURPOSE = 32, 4, "door_access"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["gallery", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_gallery_commands_from_the_first_face(tmp_path, capsys) -> None:
    xb, _ = SyntheticFaces(n_identities=12, per_identity=PER, d=D, seed=4).vectors()
    np.save(tmp_path / "a.npy", xb[:PER])
    np.save(tmp_path / "b.npy", xb[PER : 2 * PER])
    g = str(tmp_path / "g")
    code, out, _ = _run(capsys, "create", g, "--d", str(D), "--purpose", PURPOSE,
                        "--embedder-id", "syn")  # fmt: skip
    assert code == 0 and json.loads(out)["kind"] == "flat"  # no --train, no --nlist
    for name, f in (("ann", "a.npy"), ("ben", "b.npy")):
        code, out, _ = _run(capsys, "enroll", g, "--subject", name, "--embeddings",
                            str(tmp_path / f), "--legal-basis", "contract")  # fmt: skip
        assert code == 0
    # read-only commands work while another process (here: this one) holds the writer lock
    writer = Gallery.open(g)
    try:
        query = ["--queries", str(tmp_path / "a.npy"), "-k", "2", "--requester", "cli"]
        code, out, _ = _run(capsys, "search", g, *query, "--purpose", PURPOSE,
                            "--threshold", "0.999")  # fmt: skip
        res = json.loads(out)
        assert code == 0 and res["exact"]
        assert [row[0]["subject_id"] for row in res["matches"]] == ["ann"] * PER
        assert all(row[0]["score"] >= 0.999 for row in res["matches"])  # cosine
        code, _, err = _run(capsys, "search", g, *query, "--purpose", PURPOSE,
                            "--threshold", "0.5", "--pq-scores")  # fmt: skip
        assert code == 1 and "exact" in err and err.count("\n") == 1
        code, out, _ = _run(capsys, "status", g)
        st = json.loads(out)
        assert code == 0 and st["mode"] == "r" and st["records"] == 2 * PER
        code, _, err = _run(capsys, "enroll", g, "--subject", "x", "--embeddings",
                            str(tmp_path / "a.npy"), "--legal-basis", "contract")  # fmt: skip
        assert code == 1 and "another process" in err
    finally:
        writer.close()
    face = ["--face", str(tmp_path / "b.npy"), "--threshold", "0.999"]
    code, out, _ = _run(capsys, "erase", g, *face, "--matched-only")
    assert code == 0 and json.loads(out)["plan"]["subjects"] == {"ben": PER}
    code, out, _ = _run(capsys, "erase", g, "--subject", "ann")
    receipt = json.loads(out)
    assert code == 0 and receipt["records_erased"] == PER and receipt["purge_status"] == "purged"
    (tmp_path / "receipt.json").write_text(json.dumps(receipt))
    code, out, _ = _run(capsys, "verify", g, "--receipt", str(tmp_path / "receipt.json"))
    v = json.loads(out)
    assert code == 0 and v["receipt"]["valid"] and v["verified"]["records"] == PER
    anchor = json.dumps(receipt["audit_head"])
    code, out, _ = _run(capsys, "audit", g, "--head", "--anchor", anchor)
    lines = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and lines[0]["seq"] == len(lines) - 1
    assert "ann" not in out and "ben" not in out  # pseudonyms only
    code, _, err = _run(capsys, "audit", g, "--anchor", '{"seq": 2, "mac": "00"}')
    assert code == 1 and "anchored" in err
    code, _, err = _run(
        capsys, "train", g
    )  # 4 vectors cannot train IVF-PQ: says so, changes nothing
    assert code == 1 and "needs no training" in err
    code, out, _ = _run(capsys, "status", g)
    assert json.loads(out)["kind"] == "flat"
