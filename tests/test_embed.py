"""Embedder (ONNX Runtime) against a NumPy forward pass; DlibEmbedder on astronaut.png."""

from __future__ import annotations

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper
from skimage import data

from fastface.faces import (
    DlibEmbedder,
    Embedder,
    FaceEmbedder,
    align,
    detect,
    dlib_landmarks,
    l2_normalize,
)

S = 16  # crop side of the test model
D = 12  # embedding size of the test model


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.1, 8).astype(np.float32),
        "w2": rng.normal(0, 0.2, (16, 8, 3, 3)).astype(np.float32),
        "b2": rng.normal(0, 0.1, 16).astype(np.float32),
        "wf": rng.normal(0, 0.3, (D, 16)).astype(np.float32),
        "bf": rng.normal(0, 0.1, D).astype(np.float32),
    }


def make_model(
    batch: int | str = "N",
    layout: str = "NCHW",
    size: int | str = S,
    seed: int = 0,
    in_type: int = TensorProto.FLOAT,
) -> bytes:
    """conv3x3(8)+relu -> maxpool2 -> conv3x3(16)+relu -> global avg pool -> gemm(D)."""
    w = _weights(seed)
    nodes = []
    x = "x"
    if in_type == TensorProto.FLOAT16:
        nodes.append(helper.make_node("Cast", [x], ["xf"], to=TensorProto.FLOAT))
        x = "xf"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [x], ["xt"], perm=[0, 3, 1, 2]))
        x = "xt"
    nodes += [
        helper.make_node("Conv", [x, "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
    ]
    shape = [batch, 3, size, size] if layout == "NCHW" else [batch, size, size, 3]
    graph = helper.make_graph(
        nodes,
        "testnet",
        [helper.make_tensor_value_info("x", in_type, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, D])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _conv3x3(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = sliding_window_view(xp, (3, 3), axis=(2, 3))  # (N, C, H, W, 3, 3)
    return np.einsum("nchwij,ocij->nohw", win, w, dtype=np.float64) + b[None, :, None, None]


def numpy_forward(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """The test model on float NCHW input, in float64 NumPy."""
    w = _weights(seed)
    h = np.maximum(_conv3x3(x.astype(np.float64), w["w1"], w["b1"]), 0)
    n, c, hh, ww = h.shape
    h = h.reshape(n, c, hh // 2, 2, ww // 2, 2).max(axis=(3, 5))
    h = np.maximum(_conv3x3(h, w["w2"], w["b2"]), 0)
    return h.mean(axis=(2, 3)) @ w["wf"].T.astype(np.float64) + w["bf"]


def reference(crops: np.ndarray, mean: object, std: object, rgb: bool) -> np.ndarray:
    """uint8 NHWC crops -> normalised NCHW -> NumPy forward -> unit rows."""
    x = crops.astype(np.float64)
    if not rgb:
        x = x[..., ::-1]
    x = (x - np.asarray(mean, np.float64)) / np.asarray(std, np.float64)
    y = numpy_forward(x.transpose(0, 3, 1, 2))
    return y / np.linalg.norm(y, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (11, S, S, 3), dtype=np.uint8)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_dynamic_batch_matches_numpy(crops: np.ndarray, batch_size: int) -> None:
    emb = Embedder(make_model(), providers="cpu", batch_size=batch_size, size=S)
    got = emb.embed(crops)
    assert got.dtype == np.float32 and got.shape == (11, D)
    np.testing.assert_allclose(got, reference(crops, 127.5, 127.5, True), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_normalisation_and_channel_order(crops: np.ndarray) -> None:
    mean, std = (120.0, 110.0, 100.0), (60.0, 58.0, 57.0)
    for rgb in (True, False):
        emb = Embedder(make_model(), providers="cpu", mean=mean, std=std, rgb=rgb, size=S)
        np.testing.assert_allclose(emb(crops), reference(crops, mean, std, rgb), atol=2e-5)
    # BGR model on RGB crops == RGB model on channel-flipped crops
    bgr = Embedder(make_model(), providers="cpu", rgb=False, size=S)
    rgb_ = Embedder(make_model(), providers="cpu", rgb=True, size=S)
    np.testing.assert_allclose(
        bgr.embed(crops), rgb_.embed(np.ascontiguousarray(crops[..., ::-1])), atol=1e-6
    )


def test_fixed_batch_model_pads_last_batch(crops: np.ndarray) -> None:
    fixed = Embedder(make_model(batch=4), providers="cpu")
    assert fixed.fixed_batch == 4 and fixed.size == S
    want = reference(crops, 127.5, 127.5, True)
    np.testing.assert_allclose(fixed.embed(crops), want, atol=2e-5)  # 11 = 4 + 4 + 3 (+1 pad)
    np.testing.assert_allclose(fixed.embed(crops[:1]), want[:1], atol=2e-5)
    assert fixed.embed(crops[:0]).shape == (0, D)


def test_nhwc_model_and_float_input(crops: np.ndarray) -> None:
    nhwc = Embedder(make_model(layout="NHWC", size="S"), providers="cpu", size=S)
    assert nhwc.layout == "NHWC"
    want = reference(crops, 127.5, 127.5, True)
    np.testing.assert_allclose(nhwc.embed(crops), want, atol=2e-5)
    x = ((crops.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2).copy()
    np.testing.assert_allclose(nhwc.embed(x), want, atol=2e-5)


def test_float16_input_model(crops: np.ndarray) -> None:
    emb = Embedder(make_model(in_type=TensorProto.FLOAT16), providers="cpu")
    want = reference(crops, 127.5, 127.5, True)
    np.testing.assert_allclose(emb.embed(crops), want, atol=5e-3)  # input rounded to half


def test_align_fused_input_equals_uint8_crops() -> None:
    img = data.astronaut()
    [faces] = detect([img])
    emb = Embedder(make_model(size="S"), providers="cpu", size=112, mean=(128, 120, 110), std=64)
    x, _ = align([img], faces.landmarks[:1], **emb.align_options())
    u8, _ = align([img], faces.landmarks[:1], template="arcface", size=112)
    np.testing.assert_allclose(emb.embed(x), emb.embed(u8), atol=1e-5)
    assert isinstance(emb, FaceEmbedder)


def test_name_version_and_repr(tmp_path: object) -> None:
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "tiny.onnx"
    path.write_bytes(make_model())
    a = Embedder(path, providers="cpu")
    b = Embedder(make_model(), providers="cpu")
    c = Embedder(make_model(seed=1), providers="cpu")
    assert a.name == "tiny" and b.name == "testnet"
    assert a.version == b.version != c.version
    assert "d=12" in repr(a)


def test_l2_normalize_zero_rows() -> None:
    x = l2_normalize(np.array([[0.0, 0.0], [1.0, 1.0]]))
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [[0, 0], [2**-0.5, 2**-0.5]], rtol=1e-6)


# --- bad input -------------------------------------------------------------------------------


def _graph_model(inp: list[object], in_type: int, nodes: list[object], out_shape: list) -> bytes:
    graph = helper.make_graph(
        nodes,
        "bad",
        [helper.make_tensor_value_info("x", in_type, inp)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_bad_models(tmp_path: object) -> None:
    import pathlib

    with pytest.raises(FileNotFoundError, match="no such file"):
        Embedder(pathlib.Path(str(tmp_path)) / "missing.onnx", providers="cpu")
    with pytest.raises(ValueError, match="cannot load"):
        Embedder(b"not an onnx model", providers="cpu")
    with pytest.raises(ValueError, match="empty bytes"):
        Embedder(b"", providers="cpu")
    with pytest.raises(TypeError, match="path or ONNX bytes"):
        Embedder(123, providers="cpu")  # type: ignore[arg-type]
    flat = _graph_model(
        ["N", 512], TensorProto.FLOAT, [helper.make_node("Relu", ["x"], ["y"])], ["N", 512]
    )
    with pytest.raises(ValueError, match="not an image tensor"):
        Embedder(flat, providers="cpu")
    ints = _graph_model(
        ["N", 3, 8, 8],
        TensorProto.INT64,
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        ["N", 3, 8, 8],
    )
    with pytest.raises(ValueError, match="not an image tensor"):
        Embedder(ints, providers="cpu")
    gray = _graph_model(
        ["N", 1, 8, 8], TensorProto.FLOAT, [helper.make_node("Relu", ["x"], ["y"])], ["N", 1, 8, 8]
    )
    with pytest.raises(ValueError, match="channels"):
        Embedder(gray, providers="cpu")
    # an image input, but the output is a feature map, not (N, d)
    fmap = _graph_model(
        ["N", 3, 8, 8], TensorProto.FLOAT, [helper.make_node("Relu", ["x"], ["y"])], ["N", 3, 8, 8]
    )
    with pytest.raises(ValueError, match="expected \\(batch, d\\)"):
        Embedder(fmap, providers="cpu")
    with pytest.raises(ValueError, match="takes 16 x 16"):
        Embedder(make_model(), providers="cpu", size=112)
    with pytest.raises(ValueError, match="fp16=True needs"):
        Embedder(make_model(), providers="cpu", fp16=True)
    with pytest.raises(ValueError, match="providers"):
        Embedder(make_model(), providers="gpu")
    with pytest.raises(ValueError, match="std"):
        Embedder(make_model(), providers="cpu", std=0)
    with pytest.raises(ValueError, match="batch_size"):
        Embedder(make_model(), providers="cpu", batch_size=0)


def test_bad_crops(crops: np.ndarray) -> None:
    emb = Embedder(make_model(), providers="cpu")
    with pytest.raises(ValueError, match=r"\(F, 16, 16, 3\)"):
        emb.embed(np.zeros((2, 112, 112, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(F, 16, 16, 3\)"):
        emb.embed(crops[0])
    with pytest.raises(TypeError, match="float64"):
        emb.embed(crops.astype(np.float64))
    with pytest.raises(ValueError, match=r"\(F, 3, 16, 16\)"):
        emb.embed(crops.astype(np.float32))  # float NHWC: not the model input layout
    with pytest.raises(TypeError, match="numpy array"):
        emb.embed(crops.tolist())  # type: ignore[arg-type]
    bad = np.zeros((1, 3, S, S), np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        emb.embed(bad)


class _HostDeviceArray:
    """Host memory behind ``__cuda_array_interface__``: drives the device-array
    path of Embedder with I/O binding on the CPU, where no GPU is present."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = np.ascontiguousarray(a)
        self.shape = self.a.shape

    def __getitem__(self, key: slice) -> _HostDeviceArray:
        return _HostDeviceArray(self.a[key])

    @property
    def __cuda_array_interface__(self) -> dict[str, object]:
        return {
            "shape": self.a.shape,
            "typestr": self.a.dtype.str,
            "data": (self.a.ctypes.data, False),
            "strides": None,
            "version": 3,
        }


def test_io_binding_paths_on_cpu(crops: np.ndarray) -> None:
    """The GPU code (bound inputs/outputs, arrays read in place) with the binding on the CPU."""
    plain = Embedder(make_model(), providers="cpu", batch_size=4)
    bound = Embedder(make_model(), providers="cpu", batch_size=4)
    bound._bind_device = "cpu"
    want = plain.embed(crops)
    np.testing.assert_allclose(bound.embed(crops), want, atol=1e-6)
    x = ((crops.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(bound.embed(_HostDeviceArray(x)), want, atol=1e-6)
    with pytest.raises(ValueError, match="float32"):
        bound.embed(_HostDeviceArray(x.astype(np.float64)))


@pytest.mark.gpu
def test_cuda_matches_cpu_with_io_binding(crops: np.ndarray) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA execution provider (install onnxruntime-gpu on a CUDA machine)")
    cpu = Embedder(make_model(), providers="cpu", batch_size=4)
    gpu = Embedder(make_model(), providers="cuda", batch_size=4)
    assert gpu.on_gpu
    np.testing.assert_allclose(gpu.embed(crops), cpu.embed(crops), atol=1e-4)
    half = Embedder(make_model(), providers="cuda", fp16=True)
    np.testing.assert_allclose(half.embed(crops), cpu.embed(crops), atol=2e-2)
    try:
        import cupy as cp
    except ImportError:
        return
    x = ((crops.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2).copy()
    np.testing.assert_allclose(gpu.embed(cp.asarray(x)), cpu.embed(x), atol=1e-4)


# --- dlib ------------------------------------------------------------------------------------

SAME_PERSON = 0.6  # dlib's threshold on the Euclidean distance of its raw descriptors


@pytest.fixture(scope="module")
def dlib_raw() -> DlibEmbedder:
    return DlibEmbedder(normalize=False)


def _dlib_descriptors(emb: DlibEmbedder, images: list[np.ndarray]) -> np.ndarray:
    """Best face of each image: MTCNN box -> dlib 5 points -> fastface chip -> descriptor."""
    found = detect(images)
    boxes = [f.boxes[:1] for f in found]
    assert all(len(b) == 1 for b in boxes), "no face found in a variant"
    lm = np.concatenate(dlib_landmarks(images, boxes))
    chips, _ = align(images, lm, image_index=np.arange(len(images)), **emb.align_options())
    return emb.embed(chips)


def _rotate(img: np.ndarray, deg: float, center: tuple[float, float]) -> np.ndarray:
    M = cv2.getRotationMatrix2D(center, deg, 1.0)
    return cv2.warpAffine(img, M, (img.shape[1], img.shape[0]), borderMode=cv2.BORDER_REFLECT)


def test_dlib_same_person_under_transforms(dlib_raw: DlibEmbedder) -> None:
    img = np.ascontiguousarray(data.astronaut()[0:320, 80:400])  # the head and shoulders
    centre = (145.0, 120.0)
    variants = [
        img,
        _rotate(img, 30, centre),
        _rotate(img, -20, centre),
        cv2.resize(img, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA),
        cv2.resize(img, None, fx=2.0, fy=2.0, interpolation=cv2.INTER_LINEAR),
        np.clip(img.astype(np.int16) + 40, 0, 255).astype(np.uint8),
        np.clip(img.astype(np.int16) - 40, 0, 255).astype(np.uint8),
        np.ascontiguousarray(img[:, ::-1]),
    ]
    x = _dlib_descriptors(dlib_raw, variants)
    dist = np.linalg.norm(x[1:] - x[0], axis=1)
    assert (dist < SAME_PERSON).all(), dist
    # non-face regions of the same photo, chipped with the same template, are far away
    coffee = data.coffee()
    rocket = data.rocket()
    others = [img[200:320, 180:300], coffee[100:300, 200:400], rocket[50:250, 100:300]]
    chips = np.stack([cv2.resize(o, (150, 150)) for o in others])
    far = np.linalg.norm(dlib_raw.embed(chips) - x[0], axis=1)
    assert (far > SAME_PERSON).all(), far


def test_dlib_matches_dlib_own_chips_and_normalises(dlib_raw: DlibEmbedder) -> None:
    """Slow twin: dlib's own get_face_chip + descriptor on the same 5 points."""
    import dlib

    from fastface.faces import dlib_shape_predictor_path

    img = data.astronaut()
    [faces] = detect([img])
    x1, y1, x2, y2 = (round(float(v)) for v in faces.boxes[0])
    shape = dlib.shape_predictor(str(dlib_shape_predictor_path()))(
        img, dlib.rectangle(x1, y1, x2, y2)
    )
    own = np.asarray(dlib_raw._model.compute_face_descriptor(img, shape), np.float32)
    ours = _dlib_descriptors(dlib_raw, [img])[0]
    assert np.linalg.norm(ours - own) < 0.05
    unit = DlibEmbedder()
    lm = dlib_landmarks([img], [faces.boxes[:1]])[0]
    chips, _ = align([img], lm, **unit.align_options())
    got = unit.embed(chips)
    np.testing.assert_allclose(got[0], ours / np.linalg.norm(ours), atol=1e-6)
    assert unit.version == dlib_raw.version and unit.version.startswith("sha256:")


def test_dlib_bad_input(dlib_raw: DlibEmbedder, tmp_path: object) -> None:
    import pathlib

    with pytest.raises(TypeError, match="uint8"):
        dlib_raw.embed(np.zeros((1, 3, 150, 150), np.float32))
    with pytest.raises(ValueError, match=r"\(F, 150, 150, 3\)"):
        dlib_raw.embed(np.zeros((1, 112, 112, 3), np.uint8))
    with pytest.raises(FileNotFoundError):
        DlibEmbedder(pathlib.Path(str(tmp_path)) / "nope.dat")
    assert dlib_raw.embed(np.zeros((0, 150, 150, 3), np.uint8)).shape == (0, 128)


def test_dlib_worker_processes_match_in_process(dlib_raw: DlibEmbedder) -> None:
    chips = np.random.default_rng(3).integers(0, 256, (5, 150, 150, 3), dtype=np.uint8)
    with DlibEmbedder(normalize=False, processes=2, batch_size=2) as multi:
        got = multi.embed(chips)
    np.testing.assert_allclose(got, dlib_raw.embed(chips), atol=1e-6)
    assert multi._pool is None
    with pytest.raises(ValueError, match="processes"):
        DlibEmbedder(processes=-1)


# --- dlib's network in ONNX Runtime ----------------------------------------------------------


def test_dlib_onnx_matches_dlib(dlib_raw: DlibEmbedder) -> None:
    """The converted graph against dlib itself: astronaut chips and random chips."""
    from fastface.faces import dlib_onnx_embedder

    img = data.astronaut()
    [faces] = detect([img])
    lm = dlib_landmarks([img], [faces.boxes])[0]
    chips, _ = align([img], lm, image_index=np.zeros(len(lm), np.int64), template="dlib")
    noise = np.random.default_rng(5).integers(0, 256, (3, 150, 150, 3), dtype=np.uint8)
    chips = np.concatenate([chips, noise])
    want = l2_normalize(dlib_raw.embed(chips))
    emb = dlib_onnx_embedder(providers="cpu", batch_size=2)
    got = emb.embed(chips)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert (emb.name, emb.version, emb.d) == (dlib_raw.name, dlib_raw.version, 128)
    assert emb.align_options()["template"] == "dlib" and emb.size == 150


def test_dlib_onnx_bad_files(tmp_path: object) -> None:
    import pathlib

    from fastface.faces import dlib_resnet_to_onnx

    root = pathlib.Path(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        dlib_resnet_to_onnx(root / "missing.dat")
    bad = root / "bad.dat"
    bad.write_bytes(b"\x01\x01" * 100)
    with pytest.raises(ValueError, match="not dlib's face ResNet"):
        dlib_resnet_to_onnx(bad)
    from fastface.faces import dlib_shape_predictor_path

    with pytest.raises(ValueError, match="dlib model"):  # a dlib file, but not the ResNet
        dlib_resnet_to_onnx(dlib_shape_predictor_path())


@pytest.mark.gpu
def test_dlib_onnx_cuda_matches_cpu() -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA execution provider (install onnxruntime-gpu on a CUDA machine)")
    from fastface.faces import dlib_onnx_embedder

    chips = np.random.default_rng(6).integers(0, 256, (9, 150, 150, 3), dtype=np.uint8)
    cpu = dlib_onnx_embedder(providers="cpu").embed(chips)
    gpu = dlib_onnx_embedder(providers="cuda", batch_size=4)
    assert gpu.on_gpu
    np.testing.assert_allclose(gpu.embed(chips), cpu, atol=1e-4)
