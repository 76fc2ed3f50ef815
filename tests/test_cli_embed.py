"""``fastface embed``: a folder with a corrupt image, and its output fed to build and gallery."""

from __future__ import annotations

import json
import stat

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from skimage import data

from fastface.cli import main
from fastface.faces import analyze


def _save(path, rgb) -> str:
    cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Variants of two people's heads, a scene without a face, a corrupt file."""
    d = tmp_path_factory.mktemp("photos")
    astro = data.astronaut()
    camera = np.repeat(data.camera()[:, :, None], 3, axis=2)
    rng = np.random.default_rng(0)
    for i in range(20):
        src, (cy, cx) = (astro, (120, 225)) if i % 2 == 0 else (camera, (110, 260))
        M = cv2.getRotationMatrix2D((float(cx), float(cy)), rng.uniform(-12, 12), 1.0)
        rot = cv2.warpAffine(src, M, (512, 512), borderMode=cv2.BORDER_REFLECT)
        half = int(rng.uniform(90, 120))
        img = cv2.resize(rot[max(0, cy - half) : cy + half, cx - half : cx + half], (200, 200))
        _save(d / f"p{i:02d}.jpg", img[:, ::-1] if i % 3 == 0 else img)
    _save(d / "coffee.png", data.coffee())
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 20)
    (d / "notes.txt").write_text("not an image, and not picked up from a folder")
    return d


def _embed(capsys, *argv: str) -> tuple[int, dict, str]:
    code = main(["embed", *argv, "--no-progress"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else {}), err


def test_folder_with_a_corrupt_image_is_embedded_and_reported(folder, tmp_path, capsys):
    out = tmp_path / "faces.parquet"
    code, summary, err = _embed(capsys, str(folder), "-o", str(out))
    assert code == 1  # some input could not be read; the rest is written
    assert summary["images"] == 22 and summary["images_with_faces"] == 20
    assert [e["path"] for e in summary["errors"]] == [str(folder / "broken.jpg")]
    assert summary["errors"][0]["kind"] == "decode"
    assert summary["no_face"] == [str(folder / "coffee.png")]
    assert "broken.jpg: decode" in err and "coffee.png: no_face" in err
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    table = pq.read_table(out)
    assert table.column_names[0] == "embedding" and table.num_rows == summary["faces"]
    meta = json.loads(table.schema.metadata[b"fastface.model"])
    assert meta["name"] == "dlib_face_recognition_resnet_model_v1" and meta["d"] == 128
    assert meta["threshold"] == pytest.approx(0.906) and meta["alignment"]["template"] == "dlib"
    # the rows are what the library computes for those files
    paths = sorted(str(p) for p in folder.iterdir() if p.suffix in (".jpg", ".png"))
    res = analyze(paths)
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert (np.sum(emb * res.embeddings, axis=1) > 0.999).all()
    assert table.column("path").to_pylist() == [paths[i] for i in res.image]
    # an existing output is not replaced without --force; bad arguments exit 2
    assert _embed(capsys, str(folder), "-o", str(out))[0] == 2
    assert _embed(capsys, str(folder / "p00.jpg"), "-o", str(out), "--force")[0] == 0
    assert _embed(capsys, str(folder), "-o", str(tmp_path / "x.csv"))[0] == 2
    code, _, err = _embed(capsys, str(tmp_path / "missing"), "-o", str(tmp_path / "y.npy"))
    assert code == 2 and "no such file" in err


def test_output_feeds_build_and_search(folder, tmp_path, capsys):
    out = tmp_path / "faces.parquet"
    assert _embed(capsys, str(folder), "-o", str(out))[0] == 1
    idx = tmp_path / "idx"
    code = main(
        ["build", str(out), str(idx), "--nlist", "1", "--M", "8", "--nbits", "4", "--quiet"]
    )
    assert code == 0
    built = json.loads(capsys.readouterr().out)
    rows = pq.read_table(out)
    assert built["ntotal"] == rows.num_rows and built["params"]["d"] == 128
    # queries from a .npz output of one file: its own row comes back first
    q = tmp_path / "q.npz"
    assert _embed(capsys, str(folder / "p04.jpg"), "-o", str(q))[0] == 0
    z = np.load(q)
    assert z["embeddings"].shape == (1, 128) and z["paths"].tolist() == [str(folder / "p04.jpg")]
    assert json.loads(str(z["model"]))["threshold"] == pytest.approx(0.906)
    np.save(tmp_path / "q.npy", z["embeddings"])
    assert main(["search", str(idx), str(tmp_path / "q.npy"), "-k", "1", "--nprobe", "1"]) == 0
    [result] = json.loads(capsys.readouterr().out)["results"]
    [hit] = result["ids"]
    assert rows.column("path")[hit].as_py() == str(folder / "p04.jpg")


def test_largest_faces_to_npy_enrol_into_a_gallery(folder, tmp_path, capsys):
    from fastface.datasets import SyntheticFaces

    astro = [str(folder / f"p{i:02d}.jpg") for i in (0, 2, 4)]
    camera = [str(folder / f"p{i:02d}.jpg") for i in (1, 3, 5)]
    a, c = tmp_path / "astro.npy", tmp_path / "camera.npy"
    code, summary, _ = _embed(capsys, *astro, "-o", str(a), "--faces", "largest")
    assert code == 0 and summary["faces"] == 3  # one vector per photo
    assert _embed(capsys, *camera, "-o", str(c), "--faces", "largest")[0] == 0
    side = json.loads((tmp_path / "astro.npy.json").read_text())
    assert [r["path"] for r in side["rows"]] == astro
    assert stat.S_IMODE((tmp_path / "astro.npy.json").stat().st_mode) == 0o600
    train, _ = SyntheticFaces(n_identities=100, per_identity=4, d=128, seed=1).vectors()
    np.save(tmp_path / "train.npy", train)
    g = str(tmp_path / "gallery")
    assert (
        main(
            [
                *("gallery", "create", g, "--train", str(tmp_path / "train.npy")),
                *("--purpose", "door", "--embedder-id", summary["model"]["name"]),
                *("--nlist", "4", "--M", "8"),
            ]
        )
        == 0
    )
    for name, f in (("astro", a), ("camera", c)):
        argv = ["gallery", "enroll", g, "--subject", name, "--embeddings", str(f)]
        assert main([*argv, "--legal-basis", "consent", "--consent-ref", "form-1"]) == 0
    capsys.readouterr()
    q = tmp_path / "q.npy"
    _embed(capsys, str(folder / "p08.jpg"), "-o", str(q), "--faces", "largest")
    argv = ["gallery", "search", g, "--queries", str(q), "-k", "1", "--requester", "cli"]
    assert main([*argv, "--purpose", "door"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["matches"][0][0]["subject_id"] == "astro"
