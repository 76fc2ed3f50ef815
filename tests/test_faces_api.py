"""Faces that cannot be wired wrong: specs, stamped points and crops, compare/verify, analyze."""

from __future__ import annotations

import doctest
import importlib
import pickle

import cv2
import numpy as np
import pytest
from skimage import data

from fastface import faces
from fastface.faces import (
    DLIB_THRESHOLD,
    Crops,
    Detections,
    DlibEmbedder,
    Landmarks,
    ModelSpec,
    align,
    analyze,
    compare,
    detect,
    dlib_landmarks,
    stack_landmarks,
    verify,
)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()


@pytest.fixture(scope="module")
def onnx_dlib():
    return faces.default_embedder()  # dlib's ResNet in ONNX Runtime, what analyze uses


@pytest.fixture(scope="module")
def dlib_bin() -> DlibEmbedder:
    return DlibEmbedder()


def _head(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img[0:320, 80:400])  # the astronaut's head and shoulders


def _rotate(img: np.ndarray, deg: float, scale: float = 1.0) -> np.ndarray:
    M = cv2.getRotationMatrix2D((145.0, 120.0), deg, scale)
    return cv2.warpAffine(img, M, (img.shape[1], img.shape[0]), borderMode=cv2.BORDER_REFLECT)


# --- the README user's mistake ---------------------------------------------------------------


def test_mtcnn_points_with_dlib_options_raise_and_detections_do_the_right_thing(
    astronaut, onnx_dlib
):
    """The README route with dlib's options: MTCNN's points went to dlib's template and
    gave a rotated, mirrored chip whose vector looked plausible. Now it raises; handing
    over the detections makes the right chip."""
    images = [astronaut]
    dets = detect(images)
    lm, which = stack_landmarks(dets)
    assert lm.convention == "mtcnn5"
    with pytest.raises(ValueError, match=r"mtcnn5 points .* 'dlib' template.*dlib_landmarks"):
        align(images, lm, image_index=which, **onnx_dlib.align_options())
    with pytest.raises(ValueError, match="rotated and mirrored"):
        align(images, lm, image_index=which, for_model=onnx_dlib)
    with pytest.raises(ValueError, match="mtcnn5"):
        align(images, dets[0].landmarks[:1], template="dlib")

    # the right thing: dlib's points inside the detected boxes, dlib's template
    right = align(images, dets, for_model=onnx_dlib, output="uint8")
    pts = dlib_landmarks(images, [dets[0].boxes])[0]
    twin = align(images, pts, image_index=np.zeros(len(pts), np.int64), template="dlib")
    np.testing.assert_array_equal(right.crops, twin.crops)
    assert right.spec.template == "dlib" and right.spec.landmarks == "dlib5"

    # what the mistake cost (forced through with a plain array): a different-person score
    wrong, _ = align(images, np.asarray(lm), image_index=which, template="dlib")
    x = onnx_dlib.embed(np.asarray(right.crops[:1]))
    y = onnx_dlib.embed(np.asarray(wrong[:1]))
    assert compare(x[0], y[0]) < DLIB_THRESHOLD
    assert not verify(x[0], y[0], model=onnx_dlib)


def test_landmark_stamps_travel_with_views_and_pickles_not_with_arithmetic():
    pts = Landmarks(np.arange(20.0).reshape(2, 5, 2), "dlib5")
    assert pts.dtype == np.float32 and pts[1:].convention == "dlib5"
    assert pts.copy().convention == "dlib5"
    assert pickle.loads(pickle.dumps(pts)).convention == "dlib5"
    assert type(pts * 2) is np.ndarray and type(pts.mean()) is not Landmarks
    assert type(np.concatenate([pts, pts])) is np.ndarray
    with pytest.raises(ValueError, match="convention"):
        Landmarks(np.zeros((1, 5, 2)), "68-point")
    a = Detections(np.zeros((1, 4)), np.ones(1), np.zeros((1, 5, 2)))
    b = Detections(np.zeros((1, 4)), np.ones(1), np.zeros((1, 5, 2)), "dlib5")
    assert a.landmarks.convention == "mtcnn5" and b.landmarks.convention == "dlib5"
    with pytest.raises(ValueError, match="mixed landmark conventions"):
        stack_landmarks([a, b])
    with pytest.raises(ValueError, match="stamped 'dlib5'"):
        Detections(np.zeros((1, 4)), np.ones(1), b.landmarks, "mtcnn5")
    # dlib5 detections cannot make ArcFace crops: no rule maps them
    with pytest.raises(ValueError, match=r"dlib5 points .* 'arcface' template"):
        align([np.zeros((40, 40, 3), np.uint8)], [b])


def test_align_for_model_is_the_models_options(astronaut, onnx_dlib, dlib_bin):
    dets = detect([astronaut])
    pts = dlib_landmarks([astronaut], [dets[0].boxes[:1]])[0]
    a = align([astronaut], pts, for_model=onnx_dlib)
    b = align([astronaut], pts, **onnx_dlib.align_options())
    np.testing.assert_array_equal(a.crops, b.crops)
    assert a.crops.shape == (1, 3, 150, 150) and a.spec == onnx_dlib.spec.alignment
    u8 = align([astronaut], pts, for_model=onnx_dlib, output="uint8")
    assert u8.crops.dtype == np.uint8 and u8.spec.output == "uint8"
    np.testing.assert_allclose(onnx_dlib.embed(u8), onnx_dlib.embed(a), atol=1e-5)
    with pytest.raises(ValueError, match="drop template"):
        align([astronaut], pts, for_model=onnx_dlib, template="dlib")
    with pytest.raises(ValueError, match="takes uint8 crops"):
        align([astronaut], pts, for_model=dlib_bin, output="float32_nchw")
    with pytest.raises(TypeError, match="for_model"):
        align([astronaut], pts, for_model=object())
    with pytest.raises(ValueError, match="image_index: implied"):
        align([astronaut], dets, image_index=[0], for_model=onnx_dlib)


def test_crop_stamps_survive_slices_not_changes(astronaut):
    [d] = detect([astronaut])
    crops, _ = align([astronaut], d.landmarks[:1])
    assert isinstance(crops, Crops) and crops[:1].spec == crops.spec
    assert crops.spec.template == "arcface" and crops.spec.size == 112
    assert getattr(crops.astype(np.float32), "spec", None) is None
    assert type(crops / 255) is np.ndarray
    assert getattr(crops[0], "spec", None) is None  # one crop is not a batch
    assert getattr(np.asarray(crops), "spec", None) is None


def test_every_embedder_refuses_crops_of_another_size_or_template(astronaut, onnx_dlib, dlib_bin):
    [d] = detect([astronaut])
    pts = dlib_landmarks([astronaut], [d.boxes[:1]])[0]
    arc150, _ = align([astronaut], d.landmarks[:1], size=150)  # right size, wrong template
    dlib112, _ = align([astronaut], pts, template="dlib", size=112)
    good = align([astronaut], pts, template="dlib")
    for emb in (onnx_dlib, dlib_bin):
        with pytest.raises(ValueError, match="template 'arcface' at 150"):
            emb.embed(arc150)
        with pytest.raises(ValueError, match=r"150|size"):
            emb.embed(dlib112)
        assert emb.embed(good).shape == (1, 128)  # an AlignResult is accepted
    # fused input with another normalisation
    other = align([astronaut], pts, template="dlib", output="float32_nchw")
    with pytest.raises(ValueError, match="normalisation"):
        onnx_dlib.embed(other.crops)
    # the way out, on purpose
    assert onnx_dlib.embed(np.asarray(arc150)).shape == (1, 128)
    # an ArcFace-template ONNX model refuses dlib chips of its own size
    arcface = faces.Embedder(_pooled_model(), providers="cpu")
    with pytest.raises(ValueError, match="template 'dlib' at 112"):
        arcface.embed(dlib112)
    with pytest.raises(ValueError, match="template 'dlib' at 150"):
        arcface.embed(good.crops)
    with pytest.raises(ValueError, match=r"\(F, 112, 112, 3\)"):  # unstamped: the size
        arcface.embed(np.asarray(good.crops))
    right, _ = align([astronaut], d.landmarks[:1], for_model=arcface)
    assert arcface.embed(right).shape == (1, 16)


# --- compare / verify ------------------------------------------------------------------------


def test_compare_shapes_and_validation(dlib_bin):
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([1.0, 1.0])
    assert compare(a[0], a[0]) == pytest.approx(1.0)
    np.testing.assert_allclose(compare(a, b), [2**-0.5] * 2)
    np.testing.assert_allclose(compare(b, a), [2**-0.5] * 2)
    np.testing.assert_allclose(compare(a, a), np.eye(2))
    with pytest.raises(ValueError, match="different sizes"):
        compare(a, np.ones(3))
    with pytest.raises(ValueError, match="all zeros"):
        compare(np.zeros(2), b)
    with pytest.raises(ValueError, match="NaN"):
        compare(np.array([np.nan, 1.0]), b)
    with pytest.raises(ValueError, match=r"model= .* or threshold="):
        verify(a, b)
    spec = ModelSpec("m", "v", 2, faces.AlignSpec("arcface", 112, "mtcnn5"))
    with pytest.raises(ValueError, match="no calibrated threshold"):
        verify(a, b, model=spec)
    assert verify(a, b, model=spec, threshold=0.7).tolist() == [True, True]
    with pytest.raises(ValueError, match="threshold"):
        ModelSpec("m", "v", 2, faces.AlignSpec("arcface", 112, "mtcnn5"), threshold=1.5)
    with pytest.raises(ValueError, match="128-d"):
        verify(a, b, model=dlib_bin)


def test_verify_astronaut_under_flips_rotations_scaling_and_non_faces(astronaut, onnx_dlib):
    head = _head(astronaut)
    variants = [
        head,
        np.ascontiguousarray(head[:, ::-1]),
        _rotate(head, 30),
        _rotate(head, -25),
        cv2.resize(head, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA),
        cv2.resize(head, None, fx=2.0, fy=2.0, interpolation=cv2.INTER_LINEAR),
        np.clip(head.astype(np.int16) + 40, 0, 255).astype(np.uint8),
    ]
    res = analyze(variants, max_faces=1)
    assert res.image.tolist() == list(range(len(variants)))
    assert verify(res[0], res.faces[1:], model=onnx_dlib).all()
    # non-faces chipped with the same template, and another person, are "different"
    gray = data.camera()
    others = [
        head[200:320, 180:300],
        data.coffee()[100:300, 200:400],
        data.rocket()[50:250, 100:300],
        np.repeat(data.brick()[:200, :200, None], 3, axis=2),
    ]
    chips = np.stack([cv2.resize(o, (150, 150)) for o in others])
    far = onnx_dlib.embed(chips)
    assert not verify(res[0], far, model=onnx_dlib).any(), compare(res[0], far)
    camera = analyze([np.repeat(gray[:, :, None], 3, axis=2)], max_faces=1)
    assert not verify(res[0], camera[0], model=res.spec)
    # raw descriptors compare the same way
    raw = faces.dlib_onnx_embedder(providers="cpu", normalize=False)
    raw_res = analyze(variants[:2], embedder=raw, max_faces=1)
    assert raw_res.spec.normalized is False
    norms = np.linalg.norm(raw_res.embeddings, axis=1)
    assert (norms > 1.1).all() and (norms < 1.7).all()
    assert compare(raw_res[0], raw_res[1]) == pytest.approx(compare(res[0], res[1]), abs=1e-5)


def _lfw_images(n: int) -> list[np.ndarray]:
    out = []
    for f in data.lfw_subset()[:n]:
        u = cv2.resize(
            (f * 255).round().astype(np.uint8), (100, 100), interpolation=cv2.INTER_CUBIC
        )
        u = cv2.copyMakeBorder(u, 50, 50, 50, 50, cv2.BORDER_REFLECT)
        out.append(np.repeat(u[:, :, None], 3, axis=2))
    return out


def test_dlib_threshold_is_face_recognitions_tolerance_on_unit_vectors(dlib_bin):
    """Re-measured on a third of the calibration set, with dlib itself as the model."""
    imgs = _lfw_images(30)
    imgs += [np.ascontiguousarray(im[:, ::-1]) for im in imgs]
    with DlibEmbedder(normalize=False) as dlib_bin:
        res = analyze(imgs, embedder=dlib_bin, max_faces=1)
    assert len(res) >= 50
    R = res.embeddings.astype(np.float64)
    iu = np.triu_indices(len(R), 1)
    dist = np.linalg.norm(R[:, None] - R[None], axis=2)[iu]
    raw_same = dist < 0.6  # face_recognition's compare_faces(tolerance=0.6)
    unit_same = verify(R, R, model=dlib_bin)[iu]  # the threshold stored in the model's spec
    assert raw_same.sum() > 20 and (~raw_same).sum() > 1000
    assert (raw_same == unit_same).mean() > 0.95
    norm = np.median(np.linalg.norm(R, axis=1))
    assert abs(1 - (0.6 / norm) ** 2 / 2 - DLIB_THRESHOLD) < 0.005
    # the thresholds nearby agree less well (the stored one is near the best)
    agree = {t: ((compare(R, R)[iu] >= t) == raw_same).mean() for t in (0.88, 0.93)}
    assert max(agree.values()) < (raw_same == unit_same).mean()


# --- analyze ---------------------------------------------------------------------------------


def test_analyze_equals_the_explicit_route(tmp_path, astronaut, onnx_dlib):
    head = _head(astronaut)
    camera = np.repeat(data.camera()[:, :, None], 3, axis=2)
    path = tmp_path / "head.png"
    cv2.imwrite(str(path), cv2.cvtColor(head, cv2.COLOR_RGB2BGR))
    items = [astronaut, str(path), data.coffee(), camera, b"not an image"]
    res = analyze(items, crops=True, batch_size=2)
    decoded = [astronaut, head, data.coffee(), camera]
    want_img, want_emb, want_crops = [], [], []
    for i, img in enumerate(decoded):  # detect -> align for the model -> embed, image by image
        dets = detect([img])
        if len(dets[0]) == 0:
            continue
        crops = align([img], dets, for_model=onnx_dlib, output="uint8")
        want_emb.append(onnx_dlib.embed(crops))
        want_crops.append(np.asarray(crops.crops))
        want_img += [i] * len(dets[0])
    want = np.concatenate(want_emb)
    assert res.image.tolist() == want_img
    assert (np.sum(res.embeddings * want, axis=1) > 0.999).all()
    np.testing.assert_array_equal(res.crops, np.concatenate(want_crops))
    assert res.crops.spec.template == "dlib" and res.landmarks.convention == "dlib5"
    assert {e.image: e.kind for e in res.errors} == {2: "no_face", 4: "decode"}
    assert [len(p) for p in res.per_image()] == [want_img.count(i) for i in range(5)]
    assert res.boxes.shape == (len(res), 4) and res.scores.shape == (len(res),)
    # one image, and the batch form
    assert len(analyze(astronaut, max_faces=1)) == 1
    assert analyze(np.stack([astronaut, astronaut]), max_faces=1).image.tolist() == [0, 1]
    with pytest.raises(TypeError, match="images"):
        analyze(42)


def _pooled_model(d: int = 16) -> bytes:
    """A small ArcFace-size ONNX model: 8 x 8 average pooling, then a random linear map."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 1, (d, 3 * 14 * 14)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[8, 8], strides=[8, 8]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "w"], ["y"], transB=1),
        ],
        "pooled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


def test_analyze_with_an_arcface_model_equals_the_explicit_route(astronaut):
    """Another template: MTCNN's own points, fused float input (the pipeline's path)."""
    emb = faces.Embedder(_pooled_model(), providers="cpu")
    assert emb.spec.alignment.landmarks == "mtcnn5" and emb.spec.threshold is None
    imgs = [astronaut, _head(astronaut)]
    res = analyze(imgs, embedder=emb)
    want = np.concatenate([emb.embed(align([im], detect([im]), for_model=emb)) for im in imgs])
    assert len(res) == len(want)
    assert (np.sum(res.embeddings * want, axis=1) > 0.999).all()


def test_pipeline_refuses_a_detector_of_the_wrong_convention(astronaut):
    emb = faces.Embedder(_pooled_model(4), providers="cpu")

    def dlib_points_detector(images):
        found = detect(images)
        pts = dlib_landmarks(images, found)
        return [Detections(d.boxes, d.scores, p, "dlib5") for d, p in zip(found, pts, strict=True)]

    pipe = faces.FacePipeline(dlib_points_detector, emb, progress=False)
    with pytest.raises(ValueError, match="gives dlib5 landmarks"):
        list(pipe.run([astronaut]))


# --- hints for float images ------------------------------------------------------------------


def test_float_images_get_a_conversion_that_keeps_the_picture(astronaut):
    unit = astronaut / 255.0  # scikit-image's img_as_float convention
    with pytest.raises(TypeError, match=r"\[0, 1\] image.*img_as_ubyte") as e:
        detect([unit])
    assert "(x * 255).round().astype(np.uint8)" in str(e.value)
    fixed = (unit * 255).round().astype(np.uint8)  # the advice, followed
    np.testing.assert_array_equal(fixed, astronaut)
    old = np.clip(unit, 0, 255).astype(np.uint8)  # the former advice: a black image
    assert old.max() <= 1 and len(detect([old])[0]) == 0
    wide = astronaut.astype(np.float32)
    with pytest.raises(TypeError, match=r"\[0, 255\] image; convert with x.round\(\)"):
        align([wide], np.zeros((1, 5, 2)))
    with pytest.raises(TypeError, match=r"\[-1, 1\]"):
        detect(np.stack([unit * 2 - 1]))
    with pytest.raises(TypeError, match="16-bit"):
        faces.decode_image(astronaut.astype(np.uint16) * 257)
    with pytest.raises(TypeError, match="outside"):
        detect([wide * 4])


@pytest.mark.parametrize(
    "name",
    [
        "fastface.faces.align",
        "fastface.faces.analyze",
        "fastface.faces.compare",
        "fastface.faces.detect",
        "fastface.faces.landmarks",
        "fastface.faces.spec",
    ],
)
def test_doctests(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
