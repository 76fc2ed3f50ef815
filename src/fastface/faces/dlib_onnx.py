"""dlib's ResNet face model as an ONNX graph, so ONNX Runtime can run it in batches.

dlib-bin is built without BLAS and runs the network on one core with the
GIL held; the same weights in ONNX Runtime run batched, on every core or on
a GPU. The converter reads dlib's serialised network
(``dlib_face_recognition_resnet_model_v1.dat``) directly:

* integers are dlib's compressed encoding (a control byte: bit 7 the sign,
  the low 4 bits the byte count; then the bytes, little endian), floats a
  mantissa and a base-2 exponent in that encoding, strings a length and the
  bytes, tensors a version (2), four dimensions and raw little-endian float32;
* the layers follow innermost first (input, then forward order), each named by
  its serialisation tag (``con_4``, ``affine_``, ``relu_``, ``max_pool_2``,
  ``avg_pool_2``, ``add_prev_``, ``fc_2``), with no tag for ``tag``/``skip``
  layers: the residual wiring is that of dlib's ``anet_type`` (a block is
  conv, affine, relu, conv, affine, then an optional 2 x 2 average pool of the
  block's input, then ``add_prev`` of the block's input and relu);
* ``add_prev`` of tensors of different sizes gives the larger size, the
  missing parts read as zero (Pad in ONNX); dlib's convolutions pad
  ``size // 2`` at stride 1 and 0 otherwise, as the file records.

The input is dlib's: RGB, ``(pixel - mean) / 256`` with the means the file
stores, 150 x 150 chips. :func:`dlib_onnx_embedder` wraps it in an
:class:`~fastface.faces.Embedder` set up for that.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from .embed import (
    DLIB_THRESHOLD,
    DLIB_THRESHOLD_SOURCE,
    Embedder,
    _file_sha256,
    dlib_face_model_path,
)

__all__ = ["dlib_onnx_embedder", "dlib_resnet_to_onnx"]

_GAP = 4096
_TAGS = ("con_4", "affine_", "relu_", "max_pool_2", "avg_pool_2", "add_prev_", "fc_2")


class _Reader:
    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def read_int(self) -> int:
        c = self.data[self.pos]
        n = c & 0x0F
        v = int.from_bytes(self.data[self.pos + 1 : self.pos + 1 + n], "little")
        self.pos += 1 + n
        return -v if c & 0x80 else v

    def read_float(self) -> float:
        mantissa = self.read_int()
        exponent = self.read_int()
        return float(mantissa * 2.0**exponent)

    def read_str(self) -> str:
        n = self.read_int()
        s = self.data[self.pos : self.pos + n].decode("ascii")
        self.pos += n
        return s

    def read_tensor(self) -> np.ndarray:
        version = self.read_int()
        if version != 2:
            raise ValueError(f"dlib model: tensor format {version} at byte {self.pos}, expected 2")
        dims = [self.read_int() for _ in range(4)]
        n = int(np.prod(dims))
        out = np.frombuffer(self.data, "<f4", n, self.pos).astype(np.float32)
        self.pos += 4 * n
        return out

    def next_tag(self) -> str | None:
        """Move to the next layer tag (length-prefixed) and read it.

        Between two layers' parameters lie only a few flags and empty
        tensors, so the search looks a few KiB ahead, never into weights.
        """
        window = self.data[self.pos : self.pos + _GAP]
        best = None
        for tag in _TAGS:
            i = window.find(bytes([1, len(tag)]) + tag.encode())
            if i >= 0 and (best is None or i < best[0]):
                best = (i, tag)
        if best is None:
            return None
        self.pos += best[0]
        return self.read_str()


def _parse(data: bytes) -> tuple[list[float], list[tuple[Any, ...]]]:
    key = b"\x01\x15input_rgb_image_sized"
    start = data.find(key)
    if start < 0:
        raise ValueError("dlib model: no input_rgb_image_sized layer; not dlib's face ResNet")
    r = _Reader(data, start)
    r.read_str()
    mean = [r.read_float() for _ in range(3)]
    layers: list[tuple[Any, ...]] = []
    while (tag := r.next_tag()) is not None:
        if tag == "con_4":
            params = r.read_tensor()
            f, kh, kw, sy, sx, py, px = (r.read_int() for _ in range(7))
            c = (params.size - f) // (f * kh * kw)
            if c * f * kh * kw + f != params.size:
                raise ValueError(
                    f"dlib model: conv of {params.size} parameters is not {f}x?x{kh}x{kw}"
                )
            w = params[: c * f * kh * kw].reshape(f, c, kh, kw)
            layers.append(("conv", w, params[c * f * kh * kw :], (sy, sx), (py, px)))
        elif tag == "affine_":
            params = r.read_tensor()
            k = params.size // 2
            layers.append(("affine", params[:k], params[k:]))
        elif tag in ("max_pool_2", "avg_pool_2"):
            kh, kw, sy, sx, py, px = (r.read_int() for _ in range(6))
            layers.append((tag[:8], (kh, kw), (sy, sx), (py, px)))
        elif tag == "fc_2":
            n_out, n_in = r.read_int(), r.read_int()
            params = r.read_tensor()
            if params.size != n_in * n_out:  # fc_no_bias: weights only, (inputs, outputs)
                raise ValueError(
                    f"dlib model: fc of {params.size} parameters is not {n_in}x{n_out}"
                )
            layers.append(("fc", params.reshape(n_in, n_out)))
        else:
            layers.append((tag.rstrip("_"),))
    return mean, layers


class _Graph:
    """Builds the ONNX graph while tracking each tensor's (C, H, W)."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.shape: dict[str, tuple[int, int, int]] = {}
        self.n = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def const(self, value: np.ndarray, prefix: str = "p") -> str:
        from onnx import numpy_helper

        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], shape: tuple[int, int, int], **attrs: Any) -> str:
        from onnx import helper

        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        self.shape[out] = shape
        return out

    def conv(self, x: str, layer: tuple[Any, ...]) -> str:
        _, w, b, (sy, sx), (py, px) = layer
        c, h, wd = self.shape[x]
        if w.shape[1] != c:
            raise ValueError(f"dlib model: conv expects {w.shape[1]} channels, gets {c}")
        kh, kw = w.shape[2:]
        out = (w.shape[0], (h + 2 * py - kh) // sy + 1, (wd + 2 * px - kw) // sx + 1)
        return self.node(
            "Conv",
            [x, self.const(w), self.const(b)],
            out,
            strides=[sy, sx],
            pads=[py, px, py, px],
            kernel_shape=[kh, kw],
        )

    def affine(self, x: str, layer: tuple[Any, ...]) -> str:
        _, gamma, beta = layer
        scale = self.const(gamma.reshape(1, -1, 1, 1))
        shift = self.const(beta.reshape(1, -1, 1, 1))
        y = self.node("Mul", [x, scale], self.shape[x])
        return self.node("Add", [y, shift], self.shape[x])

    def pool(self, x: str, layer: tuple[Any, ...]) -> str:
        kind, (kh, kw), (sy, sx), (py, px) = layer
        c, h, w = self.shape[x]
        if kind == "avg_pool" and kh == 0 and kw == 0:  # dlib's avg_pool_everything
            return self.node("GlobalAveragePool", [x], (c, 1, 1))
        out = (c, (h + 2 * py - kh) // sy + 1, (w + 2 * px - kw) // sx + 1)
        op = "MaxPool" if kind == "max_pool" else "AveragePool"
        return self.node(op, [x], out, kernel_shape=[kh, kw], strides=[sy, sx], pads=[py, px] * 2)

    def pad_to(self, x: str, shape: tuple[int, int, int]) -> str:
        have = self.shape[x]
        if have == shape:
            return x
        extra = [0, 0, 0, 0, 0, *(s - h for s, h in zip(shape, have, strict=True))]
        return self.node("Pad", [x, self.const(np.array(extra, np.int64), "pads")], shape)

    def add(self, a: str, b: str) -> str:
        shape = tuple(max(p, q) for p, q in zip(self.shape[a], self.shape[b], strict=True))
        target = (shape[0], shape[1], shape[2])
        return self.node("Add", [self.pad_to(a, target), self.pad_to(b, target)], target)


@functools.lru_cache(maxsize=2)
def _convert(path: str, mtime_ns: int) -> bytes:
    from onnx import TensorProto, helper

    mean, layers = _parse(Path(path).read_bytes())
    kinds = [entry[0] for entry in layers]
    stem = ["conv", "affine", "relu", "max_pool"]
    if kinds[:4] != stem or kinds[-2:] != ["avg_pool", "fc"]:
        raise ValueError(f"dlib model: unexpected layer sequence {kinds[:6]}...{kinds[-3:]}")
    g = _Graph()
    g.shape["input"] = (3, 150, 150)
    a = g.affine(g.conv("input", layers[0]), layers[1])
    x = g.pool(g.node("Relu", [a], g.shape[a]), layers[3])
    i = 4
    block = ["conv", "affine", "relu", "conv", "affine"]
    while kinds[i : i + 5] == block:
        h = g.conv(x, layers[i])
        h = g.affine(h, layers[i + 1])
        h = g.node("Relu", [h], g.shape[h])
        h = g.conv(h, layers[i + 3])
        h = g.affine(h, layers[i + 4])
        i += 5
        skip = x
        if kinds[i] == "avg_pool":
            skip = g.pool(x, layers[i])
            i += 1
        if kinds[i : i + 2] != ["add_prev", "relu"]:
            raise ValueError(f"dlib model: expected add_prev, relu after a block at layer {i}")
        s = g.add(h, skip)
        x = g.node("Relu", [s], g.shape[s])
        i += 2
    if i != len(layers) - 2:
        raise ValueError(f"dlib model: unexpected layer {kinds[i]!r} at {i}")
    x = g.pool(x, layers[i])
    flat = g.node("Flatten", [x], (g.shape[x][0], 1, 1))
    w = layers[i + 1][1]
    y = g.node("MatMul", [flat, g.const(np.ascontiguousarray(w))], (w.shape[1], 1, 1))
    graph = helper.make_graph(
        g.nodes,
        "dlib_face_recognition_resnet_model_v1",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 150, 150])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", int(w.shape[1])])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    meta = model.metadata_props.add()
    meta.key, meta.value = "dlib_input_mean", ",".join(repr(m) for m in mean)
    return bytes(model.SerializeToString())


def dlib_resnet_to_onnx(path: str | os.PathLike[str] | None = None) -> tuple[bytes, list[float]]:
    """dlib's face ResNet as ONNX bytes, and its input mean (R, G, B).

    The graph takes ``(N, 3, 150, 150)`` float32 ``(rgb - mean) / 256`` and
    returns dlib's raw 128-d descriptors. Needs the ``onnx`` package.

    Raises
    ------
    FileNotFoundError
        When the model file is missing.
    ValueError
        When the file is not dlib's face ResNet.
    """
    p = dlib_face_model_path() if path is None else Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model: no such file: {p}")
    data = _convert(str(p), p.stat().st_mtime_ns)
    import onnx

    meta = {m.key: m.value for m in onnx.load_from_string(data).metadata_props}
    return data, [float(v) for v in meta["dlib_input_mean"].split(",")]


def dlib_onnx_embedder(path: str | os.PathLike[str] | None = None, **kwargs: Any) -> Embedder:
    """An :class:`Embedder` running dlib's face ResNet in ONNX Runtime.

    Gives the vectors of :class:`DlibEmbedder` (within float rounding; same
    ``name``, ``version`` and same-person threshold) from the same 150 x 150
    ``"dlib"`` chips, but batched, multi-threaded and on GPU providers.
    ``kwargs`` go to :class:`Embedder` (``providers``, ``batch_size``,
    ``threads``, ``normalize=False`` for dlib's raw descriptors, ...).

    Examples
    --------
    >>> emb = dlib_onnx_embedder(providers="cpu")
    >>> emb.d, emb.size, emb.align_options()["template"]
    (128, 150, 'dlib')
    """
    p = dlib_face_model_path() if path is None else Path(path)
    data, mean = dlib_resnet_to_onnx(p)
    kwargs.setdefault("threshold", DLIB_THRESHOLD)
    kwargs.setdefault("threshold_source", DLIB_THRESHOLD_SOURCE)
    emb = Embedder(data, size=150, mean=mean, std=256.0, rgb=True, template="dlib", **kwargs)
    emb.name = "dlib_face_recognition_resnet_model_v1"
    emb.version = "sha256:" + _file_sha256(p)[:16]
    return emb
