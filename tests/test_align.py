"""fastface.faces.align against the InsightFace recipe (scikit-image + OpenCV)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage.transform import SimilarityTransform

from fastface.faces import align, estimate_similarity, template

ARC = template("arcface")

# cv2.warpAffine's bilinear arithmetic changed in OpenCV 4.11 (float32 instead
# of 1/32-pixel fixed point); compare with the kernel the installed one uses.
_CV = tuple(int(p) for p in cv2.__version__.split(".")[:2])
CV_KERNEL = "float" if _CV >= (4, 11) else "fixed"


def reference(img: np.ndarray, lm: np.ndarray, dst: np.ndarray = ARC, size: int = 112):
    """InsightFace's norm_crop: scikit-image estimate, cv2.warpAffine with border 0."""
    M = SimilarityTransform.from_estimate(lm, dst).params[:2]
    return cv2.warpAffine(img, M, (size, size), borderValue=0.0), M


def random_faces(rng: np.random.Generator, n: int, h: int = 250, w: int = 250) -> np.ndarray:
    """Landmarks of the ArcFace template placed with rotations up to 45 degrees, scales
    0.5-2 (crop pixels per image pixel) and centres anywhere, faces touching the border."""
    angle = np.deg2rad(rng.uniform(-45, 45, n))
    scale = rng.uniform(0.5, 2.0, n)
    centre = np.stack([rng.uniform(0, w, n), rng.uniform(0, h, n)], axis=1)
    c, s = np.cos(angle), np.sin(angle)
    R = np.stack([np.stack([c, -s], 1), np.stack([s, c], 1)], 1)  # (n, 2, 2)
    pts = (ARC - 56.0) + rng.normal(0, 1.5, (n, 5, 2))
    return np.einsum("nij,nkj->nki", R, pts) / scale[:, None, None] + centre[:, None]


def smooth_images(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    small = rng.integers(0, 256, (n, h // 8, w // 8, 3), dtype=np.uint8)
    return np.stack([cv2.resize(im, (w, h), interpolation=cv2.INTER_CUBIC) for im in small])


def test_matches_insightface_recipe_on_random_images_and_landmarks():
    rng = np.random.default_rng(0)
    n = 64
    imgs = rng.integers(0, 256, (n, 250, 250, 3), dtype=np.uint8)
    lm = random_faces(rng, n)
    crops, M = align(imgs, lm, kernel=CV_KERNEL)
    assert crops.shape == (n, 112, 112, 3) and crops.dtype == np.uint8
    ref = [reference(imgs[i], lm[i]) for i in range(n)]
    ref_M = np.stack([m for _, m in ref])
    np.testing.assert_allclose(M, ref_M, atol=1e-4)
    diff = np.abs(crops.astype(np.int16) - np.stack([c for c, _ in ref]))
    assert diff.max() <= 1
    assert (diff <= 1).mean() >= 0.999
    assert (diff == 0).mean() >= 0.999  # the same arithmetic, not just close
    # Faces that touch or leave the border really exercised the border path.
    assert (np.stack([c for c, _ in ref]) == 0).all(axis=-1).any(axis=(1, 2)).sum() > n // 4


def test_list_of_sizes_and_several_faces_per_image():
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(90, 160), (300, 200)]]
    image_index = np.array([1, 0, 1, 1, 0])
    lm = np.concatenate([random_faces(rng, 1, *imgs[i].shape[:2]) for i in image_index], axis=0)
    crops, _ = align(imgs, lm, image_index=image_index, size=112, kernel=CV_KERNEL)
    for f, i in enumerate(image_index):
        ref, _ = reference(imgs[i], lm[f])
        assert (np.abs(crops[f].astype(np.int16) - ref) <= 1).mean() >= 0.999


def test_128_template_and_custom_template():
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (4, 200, 200, 3), dtype=np.uint8)
    lm = random_faces(rng, 4, 200, 200)
    crops, M = align(imgs, lm, size=128, kernel=CV_KERNEL)
    dst = ARC + np.array([8.0, 0.0])
    for i in range(4):
        ref, ref_M = reference(imgs[i], lm[i], dst, 128)
        np.testing.assert_allclose(M[i], ref_M, atol=1e-4)
        assert (np.abs(crops[i].astype(np.int16) - ref) <= 1).mean() >= 0.999
    own = ARC * 0.5 + 4
    crops, _ = align(imgs, lm, template=own, size=64, kernel=CV_KERNEL)
    ref, _ = reference(imgs[0], lm[0], own, 64)
    assert crops.shape == (4, 64, 64, 3)
    assert (np.abs(crops[0].astype(np.int16) - ref) <= 1).mean() >= 0.999


def test_fused_float32_nchw_equals_normalised_uint8():
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, (6, 160, 160, 3), dtype=np.uint8)
    lm = random_faces(rng, 6, 160, 160)
    crops, _ = align(imgs, lm)
    x, _ = align(imgs, lm, output="float32_nchw")
    want = (crops.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)
    np.testing.assert_array_equal(x, want.transpose(0, 3, 1, 2))
    mean, std = [0.485 * 255, 0.456 * 255, 0.406 * 255], [58.4, 57.1, 57.4]
    x, _ = align(imgs, lm, output="float32_nchw", mean=mean, std=std, rgb=False)
    bgr = crops[..., ::-1].astype(np.float32)
    want = (bgr - np.float32(mean)) / np.float32(std)
    np.testing.assert_array_equal(x, want.transpose(0, 3, 1, 2))


def test_the_two_kernels_agree_on_smooth_images():
    # OpenCV <= 4.10 quantised coordinates to 1/32 pixel; on smooth images that
    # moves a pixel by well under one grey level against the float kernel.
    rng = np.random.default_rng(4)
    imgs = smooth_images(rng, 8, 200, 200)
    lm = random_faces(rng, 8, 200, 200)
    fixed, _ = align(imgs, lm, kernel="fixed")
    flt, _ = align(imgs, lm, kernel="float")
    for i in range(8):
        ref, _ = reference(imgs[i], lm[i])
        other = flt[i] if CV_KERNEL == "fixed" else fixed[i]
        assert (np.abs(other.astype(np.int16) - ref) <= 1).mean() >= 0.99


def test_estimate_matches_skimage_on_reflections_and_collinear_points():
    rng = np.random.default_rng(5)
    mirrored = ARC[None] * [-1.0, 1.0] + rng.normal(0, 2, (3, 5, 2)) + 200
    line = np.stack([np.linspace(0, 40, 5), np.linspace(10, 30, 5)], axis=1)[None] + [[[5, 5]]]
    for src in (mirrored, line, line[:, ::-1]):
        M = estimate_similarity(src, ARC)
        for i in range(len(src)):
            ref = SimilarityTransform.from_estimate(src[i], ARC).params[:2]
            np.testing.assert_allclose(M[i], ref, atol=1e-9)


def test_dlib_template_sits_on_dlibs_mean_face():
    # dlib's 68-point mean face (points 45, 42, 36, 39 and 33, unit square).
    mean_face = np.array(
        [[0.858516, 0.216423], [0.645647, 0.231733], [0.121737, 0.216423],
         [0.334606, 0.231733], [0.490127, 0.628106]]
    )  # fmt: skip
    unit = (template("dlib", 150) + 0.5) / 150 * 1.5 - 0.25
    assert np.abs(unit - mean_face).max() < 0.005


def test_landmarks_outside_the_image_give_border_fill():
    img = np.full((1, 50, 50, 3), 200, np.uint8)
    crops, _ = align(img, ARC[None] + 1000.0)
    assert (crops == 0).all()


def test_empty_batch_returns_empty_arrays():
    crops, M = align(np.zeros((0, 50, 50, 3), np.uint8), np.zeros((0, 5, 2)))
    assert crops.shape == (0, 112, 112, 3) and M.shape == (0, 2, 3)
    x, _ = align([], np.zeros((0, 5, 2)), output="float32_nchw")
    assert x.shape == (0, 3, 112, 112) and x.dtype == np.float32


def test_grayscale_needs_explicit_conversion():
    gray = np.random.default_rng(6).integers(0, 256, (1, 120, 120), dtype=np.uint8)
    lm = ARC[None] + 4
    with pytest.raises(ValueError, match="gray_to_rgb"):
        align([gray[0]], lm)
    with pytest.raises(ValueError, match="gray_to_rgb"):
        align(gray[..., None], lm)
    crops, _ = align([gray[0]], lm, gray_to_rgb=True, kernel=CV_KERNEL)
    ref, _ = reference(np.repeat(gray[0][..., None], 3, axis=2), lm[0])
    assert (np.abs(crops[0].astype(np.int16) - ref) <= 1).all()


@pytest.mark.parametrize(
    ("images", "landmarks", "error", "match"),
    [
        (np.zeros((1, 50, 50, 3), np.float32), ARC[None], TypeError, "uint8"),
        ([np.zeros((50, 50, 4), np.uint8)], ARC[None], ValueError, "alpha"),
        (np.zeros((50, 50, 3), np.uint8), ARC[None], ValueError, r"images\[None\]"),
        (np.zeros((1, 50, 50, 3), np.uint8), ARC, ValueError, r"landmarks\[None\]"),
        (np.zeros((1, 50, 50, 3), np.uint8), np.zeros((1, 4, 2)), ValueError, r"\(F, 5, 2\)"),
        (np.zeros((2, 50, 50, 3), np.uint8), ARC[None], ValueError, "image_index"),
    ],
)
def test_bad_input_is_rejected(images, landmarks, error, match):
    with pytest.raises(error, match=match):
        align(images, landmarks)


def test_nan_and_degenerate_landmarks_name_the_face():
    imgs = np.zeros((3, 60, 60, 3), np.uint8)
    lm = np.stack([ARC, ARC, ARC])
    lm[2, 3, 0] = np.nan
    with pytest.raises(ValueError, match="face 2"):
        align(imgs, lm)
    lm = np.stack([ARC, np.full((5, 2), 7.0), ARC])
    with pytest.raises(ValueError, match="face 1 is degenerate"):
        align(imgs, lm)
    with pytest.raises(ValueError, match="face 1 points to image 5"):
        align(imgs, np.stack([ARC, ARC]), image_index=[0, 5])


def fixed_point_twin(img: np.ndarray, M: np.ndarray, size: int) -> np.ndarray:
    """OpenCV <= 4.10's INTER_LINEAR warpAffine in NumPy: inverse matrix, 10-bit
    coordinate steps rounded to 1/32 pixel, integer weights summing to 1024."""
    d = M[0, 0] * M[1, 1] - M[0, 1] * M[1, 0]
    d = 1.0 / d
    a0, a1, a3, a4 = M[1, 1] * d, -M[0, 1] * d, -M[1, 0] * d, M[0, 0] * d
    a2 = -a0 * M[0, 2] - a1 * M[1, 2]
    a5 = -a3 * M[0, 2] - a4 * M[1, 2]
    x = np.arange(size)
    adelta = np.rint(a0 * x * 1024).astype(np.int64)
    bdelta = np.rint(a3 * x * 1024).astype(np.int64)
    y = np.arange(size)[:, None]
    X0 = np.rint((a1 * y + a2) * 1024).astype(np.int64) + 16
    Y0 = np.rint((a4 * y + a5) * 1024).astype(np.int64) + 16
    X = (X0 + adelta) >> 5
    Y = (Y0 + bdelta) >> 5
    ix, iy, fx, fy = X >> 5, Y >> 5, X & 31, Y & 31
    h, w = img.shape[:2]
    padded = np.zeros((h + 4, w + 4, 3), np.int64)
    padded[2 : h + 2, 2 : w + 2] = img
    cx, cy = np.clip(ix + 2, 0, w + 2), np.clip(iy + 2, 0, h + 2)
    p = [padded[cy + dy, cx + dx] for dy in (0, 1) for dx in (0, 1)]
    fx, fy = fx[..., None], fy[..., None]
    top = p[0] * (32 - fx) + p[1] * fx
    bot = p[2] * (32 - fx) + p[3] * fx
    out = (top * (32 - fy) + bot * fy + 512) >> 10
    outside = (ix < -1) | (iy < -1) | (ix >= w) | (iy >= h)
    out[outside] = 0
    return out.astype(np.uint8)


def test_fixed_point_kernel_equals_its_numpy_twin_bit_for_bit():
    rng = np.random.default_rng(7)
    imgs = rng.integers(0, 256, (12, 180, 220, 3), dtype=np.uint8)
    lm = random_faces(rng, 12, 180, 220)
    crops, M = align(imgs, lm, kernel="fixed")
    for i in range(12):
        np.testing.assert_array_equal(crops[i], fixed_point_twin(imgs[i], M[i], 112))


def test_thread_count_does_not_change_the_crops():
    rng = np.random.default_rng(8)
    imgs = rng.integers(0, 256, (40, 120, 120, 3), dtype=np.uint8)
    lm = random_faces(rng, 40, 120, 120)
    one, _ = align(imgs, lm, threads=1)
    two, _ = align(imgs, lm, threads=2)
    np.testing.assert_array_equal(one, two)
    with pytest.raises(ValueError, match="threads"):
        align(imgs, lm, threads=0)
