"""FacePipeline over a folder of scikit-image samples (one corrupt) against the plain loop."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from skimage import data

from fastface.faces import (
    MTCNN,
    DlibEmbedder,
    Embedder,
    Face,
    FacePipeline,
    ImageError,
    align,
    decode_image,
    detect,
    dlib_landmarks,
)
from fastface.index import IVFPQIndex, IVFPQParams


def _write(path: Path, rgb: np.ndarray) -> str:
    ok, buf = cv2.imencode(path.suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    path.write_bytes(buf.tobytes())
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Image files: faces, no faces, a gray one, a corrupt one, a tiny one."""
    d = tmp_path_factory.mktemp("images")
    astro = data.astronaut()
    head = np.ascontiguousarray(astro[0:320, 80:400])
    paths = [
        _write(d / "astronaut.png", astro),  # 0: two detections (face + a patch)
        _write(d / "coffee.jpg", data.coffee()),  # 1: no face
        _write(d / "head_small.jpg", cv2.resize(head, None, fx=0.6, fy=0.6)),  # 2
        str(d / "corrupt.jpg"),  # 3: undecodable
        _write(d / "camera.png", np.repeat(data.camera()[:, :, None], 3, axis=2)),  # 4
        _write(d / "head_mirror.png", np.ascontiguousarray(head[:, ::-1])),  # 5
        _write(d / "tiny.png", astro[:10, :10]),  # 6: too small
        _write(d / "chelsea.jpg", data.chelsea()),  # 7: a cat, no face
    ]
    Path(paths[3]).write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    return paths


@pytest.fixture(scope="module")
def dlib_emb() -> DlibEmbedder:
    return DlibEmbedder()


def _plain(images: list[np.ndarray], emb: DlibEmbedder) -> list[tuple[int, np.ndarray]]:
    """The slow twin: per image detect, dlib points, align, embed."""
    out = []
    for i, img in enumerate(images):
        [d] = detect([img])
        if len(d) == 0:
            continue
        lm = dlib_landmarks([img], [d.boxes])[0]
        chips, _ = align([img], lm, image_index=np.zeros(len(lm), np.int64), **emb.align_options())
        out += [(i, v) for v in emb.embed(chips)]
    return out


def test_pipeline_folder_matches_plain_composition(
    folder: list[str], dlib_emb: DlibEmbedder
) -> None:
    pipe = FacePipeline(MTCNN(), dlib_emb, batch_size=3, workers=2, progress=False)
    items = list(pipe.run(folder))
    faces = [r for r in items if isinstance(r, Face)]
    errors = {r.image: r for r in items if isinstance(r, ImageError)}
    assert {i: e.kind for i, e in errors.items()} == {
        1: "no_face",
        3: "decode",
        6: "too_small",
        7: "no_face",
    }
    assert errors[3].source == folder[3] and "decodable" in errors[3].reason
    # input order kept, one item or more per image
    assert [r.image for r in items] == sorted(r.image for r in items)
    assert {r.image for r in items} == set(range(len(folder)))

    good = [i for i in range(len(folder)) if i not in errors]
    want = _plain([decode_image(folder[i]) for i in good], dlib_emb)
    assert len(faces) == len(want)
    for f, (i, v) in zip(faces, want, strict=True):
        assert f.image == good[i]
        np.testing.assert_allclose(f.embedding, v, atol=1e-5)
        assert f.box.shape == (4,) and f.landmarks.shape == (5, 2)
        assert np.isclose(np.linalg.norm(f.embedding), 1.0, atol=1e-5)
    # the astronaut's face, her mirrored and downscaled head: one person
    best = {f.image: f.embedding for f in faces if f.face == 0}
    assert np.linalg.norm(best[0] - best[2]) < 0.6 / 1.4
    assert np.linalg.norm(best[0] - best[5]) < 0.6 / 1.4
    assert np.linalg.norm(best[0] - best[4]) > 0.6 / 1.4  # the cameraman is someone else
    assert pipe.stats["images"] == len(folder) and pipe.stats["errors"] == 4
    assert pipe.stats["faces"] == len(faces) and pipe.stats["embed"] > 0


def test_pipeline_onnx_embedder_arrays_and_bytes() -> None:
    """Arcface-template path: MTCNN points, fused float32 NCHW input, an ONNX model."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 1, (16, 3 * 14 * 14)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[8, 8], strides=[8, 8]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "w"], ["y"], transB=1),
        ],
        "pooled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    emb = Embedder(model.SerializeToString(), providers="cpu")
    astro = data.astronaut()
    _, png = cv2.imencode(".png", cv2.cvtColor(astro, cv2.COLOR_RGB2BGR))
    pipe = FacePipeline(None, emb, batch_size=2, progress=False, max_faces=1)
    items = list(pipe.run([astro, png.tobytes(), np.zeros((64, 64, 3), np.uint8), b""]))
    assert [type(r).__name__ for r in items] == ["Face", "Face", "ImageError", "ImageError"]
    assert [r.kind for r in items[2:]] == ["no_face", "decode"]  # type: ignore[union-attr]
    [d] = detect([astro])
    u8, _ = align([astro], d.landmarks[:1])
    np.testing.assert_allclose(items[0].embedding, emb.embed(u8)[0], atol=1e-5)  # type: ignore[union-attr]
    np.testing.assert_allclose(items[1].embedding, items[0].embedding, atol=1e-6)  # type: ignore[union-attr]


def test_index_images(folder: list[str], dlib_emb: DlibEmbedder) -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(700, 128)).astype(np.float32)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    index = IVFPQIndex(IVFPQParams(128, 2, 4, nbits=4))
    index.train(train)
    pipe = FacePipeline(None, dlib_emb, batch_size=4, progress=False)
    ids = np.arange(100, 100 + len(folder))
    report = pipe.index_images(folder, index, ids=ids)
    assert report.image.tolist() == [0, 2, 4, 5]  # the largest face of each good image
    assert report.ids.tolist() == [100, 102, 104, 105]
    assert {e.image for e in report.errors} == {1, 3, 6, 7}
    assert index.ntotal == 4 and report.model_version == dlib_emb.version
    # called again (a resumed run): the indexed images are skipped, the bad ones retried
    again = pipe.index_images(folder, index, ids=ids)
    assert again.skipped == 4 and again.ids.size == 0 and index.ntotal == 4
    assert sorted(e.image for e in again.errors) == [1, 3, 6, 7]
    [f] = [r for r in pipe.run([folder[0]]) if isinstance(r, Face) and r.face == 0]
    _, I = index.search(f.embedding[None], 4, nprobe=2)
    # 16-bit codes: the astronaut's three vectors may tie, the cameraman comes last
    assert set(I[0, :3].tolist()) == {100, 102, 105} and I[0, 3] == 104
    every = IVFPQIndex(IVFPQParams(128, 2, 4, nbits=4))
    every.train(train)
    rep = pipe.index_images(folder[:3], every, faces="all")
    assert rep.image.tolist() == [0, 0, 2] and every.ntotal == 3
    with pytest.raises(ValueError, match="faces='all'"):
        pipe.index_images(folder, every, ids=ids, faces="all")
    with pytest.raises(ValueError, match="dimension"):
        pipe.index_images(folder, IVFPQIndex(IVFPQParams(64, 2, 4, nbits=4)))
    from fastface.errors import NotTrainedError

    with pytest.raises(NotTrainedError):
        pipe.index_images(folder, IVFPQIndex(IVFPQParams(128, 2, 4, nbits=4)))


class _Boom:
    d, name, version, template, size, input = 128, "boom", "0", "dlib", 150, "uint8"

    def align_options(self) -> dict[str, object]:
        return {"template": "dlib", "size": 150, "output": "uint8"}

    def embed(self, crops: np.ndarray) -> np.ndarray:
        raise RuntimeError("model crashed")


def test_stage_failure_is_raised_and_threads_stop(folder: list[str]) -> None:
    before = threading.active_count()
    pipe = FacePipeline(None, _Boom(), batch_size=2, progress=False)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="model crashed"):
        list(pipe.run(folder))
    assert threading.active_count() == before


def test_early_stop_releases_threads(folder: list[str], dlib_emb: DlibEmbedder) -> None:
    before = threading.active_count()
    pipe = FacePipeline(None, dlib_emb, batch_size=1, progress=False)
    gen = pipe.run(folder * 3)
    first = next(gen)
    gen.close()
    assert isinstance(first, Face) and first.image == 0
    assert threading.active_count() == before


def test_bad_arguments(dlib_emb: DlibEmbedder) -> None:
    with pytest.raises(TypeError, match="embedder"):
        FacePipeline(None, object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="detector"):
        FacePipeline(42, dlib_emb)
    with pytest.raises(ValueError, match="batch_size"):
        FacePipeline(None, dlib_emb, batch_size=0)
    with pytest.raises(ValueError, match="min_face_size"):
        FacePipeline(None, dlib_emb, min_face_size=0)
    with pytest.raises(TypeError, match="uint8"):
        decode_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(FileNotFoundError):
        decode_image("/nonexistent/image.jpg")


def test_pipeline_dlib_onnx_equals_dlib(folder: list[str], dlib_emb: DlibEmbedder) -> None:
    from fastface.faces import dlib_onnx_embedder

    a = [r for r in FacePipeline(None, dlib_emb, progress=False).run(folder[:6])]
    onnx_emb = dlib_onnx_embedder(providers="cpu")
    b = [r for r in FacePipeline(None, onnx_emb, batch_size=4, progress=False).run(folder[:6])]
    assert [type(r) for r in a] == [type(r) for r in b]
    for x, y in zip(a, b, strict=True):
        if isinstance(x, Face) and isinstance(y, Face):
            assert (x.image, x.face) == (y.image, y.face)
            np.testing.assert_allclose(x.embedding, y.embedding, atol=1e-5)
