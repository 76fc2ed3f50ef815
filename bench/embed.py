"""Embedding throughput: the batched ``Embedder`` against a per-face ONNX Runtime loop.

Same run, same inputs, same model. Two models:

* ``resnet112``: a ResNet-like net for 112 x 112 crops built here with
  ``onnx.helper`` (seeded weights; stem conv, three residual stages 64/128/256
  at stride 2, a 512-d linear head: about 0.15 GMAC per face, the size class
  of MobileFaceNet-style face models). Methods: ``Embedder`` on uint8 crops
  for several batch sizes, ``Embedder`` on the fused float32 NCHW input, and
  the reference: a plain ``InferenceSession`` (default options) called once
  per face with NumPy preprocessing and normalisation per face.
* ``dlib``: dlib's ResNet, the real model. As an ONNX graph
  (``dlib_onnx_embedder``: batched ``Embedder``) against the same graph run
  once per face; and dlib itself (dlib-bin: ``DlibEmbedder`` batches of 32,
  and ``compute_face_descriptor`` once per chip, the way dlib users call it).

Prints one table (faces/s, ms/face, ratio to the per-face ONNX Runtime loop
on the same model, and for dlib also to dlib's own per-chip loop; medians;
max|diff| is the largest difference to the per-face loop's unit vectors) and
writes bench/results/embed.json.

    python bench/embed.py [--faces 512] [--dlib-faces 48] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from fastface._bench.common import (
    Interleaved,
    bench_meta,
    print_table,
    results_dir,
    write_results,
)
from fastface.faces import (
    DlibEmbedder,
    Embedder,
    align,
    detect,
    dlib_landmarks,
    dlib_onnx_embedder,
    dlib_resnet_to_onnx,
)


def resnet112(d: int = 512, seed: int = 0) -> bytes:
    """ResNet-like face model for (N, 3, 112, 112) float32 input, d-dim output."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    counter = [0]

    def name(prefix: str) -> str:
        counter[0] += 1
        return f"{prefix}{counter[0]}"

    def conv(x: str, cin: int, cout: int, k: int, stride: int, relu: bool) -> str:
        w = name("w")
        b = name("b")
        fan_in = cin * k * k
        inits.append(
            numpy_helper.from_array(
                rng.normal(0, np.sqrt(2.0 / fan_in), (cout, cin, k, k)).astype(np.float32), w
            )
        )
        inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), b))
        y = name("c")
        p = k // 2
        nodes.append(helper.make_node("Conv", [x, w, b], [y], strides=[stride] * 2, pads=[p] * 4))
        if relu:
            r = name("r")
            nodes.append(helper.make_node("Relu", [y], [r]))
            return r
        return y

    def block(x: str, cin: int, cout: int, stride: int) -> str:
        h = conv(x, cin, cout, 3, stride, True)
        h = conv(h, cout, cout, 3, 1, False)
        skip = conv(x, cin, cout, 1, stride, False) if (stride != 1 or cin != cout) else x
        s = name("add")
        nodes.append(helper.make_node("Add", [h, skip], [s]))
        r = name("r")
        nodes.append(helper.make_node("Relu", [s], [r]))
        return r

    h = conv("input", 3, 32, 3, 2, True)  # 56 x 56
    h = block(h, 32, 64, 2)  # 28
    h = block(h, 64, 64, 1)
    h = block(h, 64, 128, 2)  # 14
    h = block(h, 128, 256, 2)  # 7
    nodes.append(helper.make_node("Flatten", [h], ["flat"]))
    wf = rng.normal(0, np.sqrt(1.0 / (256 * 49)), (d, 256 * 49)).astype(np.float32)
    inits.append(numpy_helper.from_array(wf, "wf"))
    inits.append(numpy_helper.from_array(np.zeros(d, np.float32), "bf"))
    nodes.append(helper.make_node("Gemm", ["flat", "wf", "bf"], ["embedding"], transB=1))
    graph = helper.make_graph(
        nodes,
        "resnet112",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", d])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def face_crops(n: int, size: int, template: str, seed: int = 0) -> np.ndarray:
    """n aligned crops of the astronaut's face, jittered (shifts, noise) so they differ."""
    from skimage import data

    img = data.astronaut()
    [faces] = detect([img])
    dlib_points = template == "dlib"
    lm = dlib_landmarks([img], [faces.boxes[:1]])[0] if dlib_points else faces.landmarks[:1]
    rng = np.random.default_rng(seed)
    jitter = lm + rng.normal(0, 2.0, (n, *lm.shape[1:])).astype(np.float32)
    crops, _ = align([img], jitter, image_index=np.zeros(n, np.int64), template=template, size=size)
    noise = rng.integers(-8, 9, crops.shape)
    return np.clip(crops.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def per_face_onnx(
    model: bytes, mean: Any = 127.5, std: float = 127.5
) -> Callable[[np.ndarray], np.ndarray]:
    """What code without batching does: one session run per face."""
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0].name
    m = np.asarray(mean, np.float32)

    def run(crops: np.ndarray) -> np.ndarray:
        out = []
        for c in crops:
            x = ((c.astype(np.float32) - m) / np.float32(std)).transpose(2, 0, 1)[None]
            y = sess.run(None, {inp: np.ascontiguousarray(x)})[0][0]
            out.append(y / np.linalg.norm(y))
        return np.stack(out)

    return run


def per_face_dlib(emb: DlibEmbedder) -> Callable[[np.ndarray], np.ndarray]:
    def run(chips: np.ndarray) -> np.ndarray:
        out = [np.asarray(emb._model.compute_face_descriptor(c), np.float32) for c in chips]
        x = np.stack(out)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faces", type=int, default=512, help="crops for the ONNX model")
    p.add_argument("--dlib-faces", type=int, default=48, help="chips for dlib (slow model)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--batch-sizes", default="8,32,64,128")
    args = p.parse_args(argv)

    bench = Interleaved()
    model = resnet112()
    crops = face_crops(args.faces, 112, "arcface")
    bench.add("ref", lambda: per_face_onnx(model)(crops), args.repeat)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    for bs in sizes:
        emb = Embedder(model, providers="cpu", batch_size=bs)
        bench.add(f"u8-{bs}", lambda emb=emb: emb.embed(crops), args.repeat)
    emb64 = Embedder(model, providers="cpu", batch_size=64)
    x = ((crops.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2).copy()
    bench.add("f32-64", lambda: emb64.embed(x), args.repeat)

    # dlib's model: the ONNX graph (batched vs per face) and dlib-bin itself
    chips = face_crops(args.dlib_faces, 150, "dlib")
    graph, mean = dlib_resnet_to_onnx()
    bench.add("dref", lambda: per_face_onnx(graph, mean, 256.0)(chips), args.repeat)
    demb = DlibEmbedder(batch_size=32)
    reps = max(1, args.repeat - 2)  # dlib-bin is ~20x slower
    bench.add("dlib-loop", lambda: per_face_dlib(demb)(chips), reps)
    bench.add("dlib-batch", lambda: demb.embed(chips), reps)
    for bs in (8, 32):
        demb_onnx = dlib_onnx_embedder(providers="cpu", batch_size=bs)
        bench.add(f"dlib-onnx-{bs}", lambda e=demb_onnx: e.embed(chips), args.repeat)
    res = bench.run()

    t_ref, ref = res["ref"]
    rows: list[dict[str, Any]] = [
        {"model": "resnet112", "method": "per-face ORT loop", "batch": 1, "seconds": t_ref}
    ]
    for key, method, bs in [(f"u8-{b}", "Embedder uint8", b) for b in sizes] + [
        ("f32-64", "Embedder float32_nchw", 64)
    ]:
        t, got = res[key]
        rows.append(
            {
                "model": "resnet112",
                "method": method,
                "batch": bs,
                "seconds": t,
                "max_abs_diff": float(np.abs(got - ref).max()),
            }
        )
    for r in rows:
        r["faces"] = args.faces
        r["ratio"] = t_ref / r["seconds"]
    t_oref, oref = res["dref"]
    t_dref = res["dlib-loop"][0]
    for key, method, bs in [
        ("dref", "per-face ORT loop (dlib graph)", 1),
        ("dlib-loop", "per-face dlib-bin loop", 1),
        ("dlib-batch", "DlibEmbedder (dlib-bin)", 32),
        ("dlib-onnx-8", "Embedder (dlib graph)", 8),
        ("dlib-onnx-32", "Embedder (dlib graph)", 32),
    ]:
        t, got = res[key]
        rows.append(
            {
                "model": "dlib",
                "method": method,
                "batch": bs,
                "seconds": t,
                "faces": args.dlib_faces,
                "ratio": t_oref / t,
                "ratio_dlib_loop": t_dref / t,
                "max_abs_diff": None if key == "dref" else float(np.abs(got - oref).max()),
            }
        )
    for r in rows:
        r["faces_per_s"] = r["faces"] / r["seconds"]
        r["ms_per_face"] = 1e3 * r["seconds"] / r["faces"]
    print_table(
        rows,
        [
            ("model", "model", "s"),
            ("method", "method", "s"),
            ("batch", "batch", "d"),
            ("faces_per_s", "faces/s", ".1f"),
            ("ms_per_face", "ms/face", ".2f"),
            ("ratio", "x ORT loop", ".2f"),
            ("ratio_dlib_loop", "x dlib loop", ".2f"),
            ("max_abs_diff", "max|diff|", ".1e"),
        ],
    )
    meta = bench_meta(["python", "bench/embed.py", *(argv if argv is not None else sys.argv[1:])])
    meta["onnxruntime"] = ort.__version__
    meta["threads"] = "Embedder: intra-op threads = usable cores; loop: ORT defaults"
    path = write_results(results_dir() / "embed.json", {"meta": meta, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
