"""End-to-end throughput: ``FacePipeline`` against the naive per-image composition.

Same run, same image files (JPEGs made from the scikit-image samples: two
thirds 250 x 250 LFW-style head shots, one third 512 x 512 scenes, some with
no face), same detector (fastface's MTCNN), same models. Images per second,
medians, and where the time goes.

* ``dlib-bin`` (the real offline model, run by dlib): naive = per image
  ``cv2.imread``, ``detect([img])``, then per face dlib's 5-point predictor,
  ``dlib.get_face_chip`` (estimate + warp) and ``compute_face_descriptor``;
  pipeline = ``FacePipeline(MTCNN(), DlibEmbedder(processes=p))``.
* ``dlib-onnx`` (the same model converted to ONNX, same vectors): naive as
  above with one ONNX Runtime run per chip instead of dlib; pipeline =
  ``FacePipeline(MTCNN(), dlib_onnx_embedder())``. The ``x dlib-bin`` column
  compares with the dlib-bin naive loop, what a dlib user runs today.
* ``resnet112`` (the ResNet-like ONNX model of bench/embed.py, ArcFace
  template): naive = per image ``cv2.imread``, ``detect([img])``, then per face
  ``skimage SimilarityTransform.estimate``, ``cv2.warpAffine`` and one ONNX
  Runtime run; pipeline = ``FacePipeline(MTCNN(), Embedder(model))``.

The stage columns are seconds spent in each step in the last run (naive:
summed over the loop; pipeline: busy time of each stage thread; the stages
overlap, so they add up to more than the wall time). Methods are timed
round-robin after a warm-up run each (``fastface._bench.common.Interleaved``).

    python bench/pipeline.py [--images 48] [--repeat 2] [--dlib-processes 0,1,2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
from skimage import data
from skimage.transform import SimilarityTransform

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed import resnet112  # bench/embed.py

from fastface._bench.common import (
    Interleaved,
    bench_meta,
    print_table,
    results_dir,
    write_results,
)
from fastface.faces import (
    MTCNN,
    DlibEmbedder,
    Embedder,
    Face,
    FacePipeline,
    detect,
    dlib_onnx_embedder,
    dlib_resnet_to_onnx,
    dlib_shape_predictor_path,
    template,
)

STAGES = ("decode", "detect", "landmarks", "align", "embed")


def make_folder(root: Path, n: int, seed: int = 0) -> list[str]:
    """n JPEG files: varied head shots (250 x 250) and scenes (512 x 512)."""
    rng = np.random.default_rng(seed)
    astro = data.astronaut()
    camera = np.repeat(data.camera()[:, :, None], 3, axis=2)
    scenes = [astro, camera, cv2.resize(data.coffee(), (512, 512)), data.immunohistochemistry()]
    paths = []
    for i in range(n):
        if i % 3 == 2:
            img = scenes[(i // 3) % len(scenes)]
        else:
            src, (cy, cx) = (astro, (120, 225)) if i % 2 == 0 else (camera, (110, 260))
            half = int(rng.uniform(90, 130))
            M = cv2.getRotationMatrix2D((float(cx), float(cy)), rng.uniform(-15, 15), 1.0)
            rot = cv2.warpAffine(src, M, (512, 512), borderMode=cv2.BORDER_REFLECT)
            y0, x0 = max(0, cy - half), max(0, cx - half)
            img = cv2.resize(rot[y0 : cy + half, x0 : cx + half], (250, 250))
            if rng.random() < 0.5:
                img = img[:, ::-1]
            shift = int(rng.integers(-30, 31))
            img = np.clip(img.astype(np.int16) + shift, 0, 255).astype(np.uint8)
        path = root / f"img{i:04d}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR))
        paths.append(str(path))
    return paths


class Clock:
    def __init__(self) -> None:
        self.t = dict.fromkeys(STAGES, 0.0)

    def __call__(self, stage: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.t[stage] += time.perf_counter() - t0
        return out


def naive_dlib(
    paths: list[str], emb: DlibEmbedder, onnx: bool = False
) -> tuple[int, dict[str, float]]:
    import dlib

    predictor = dlib.shape_predictor(str(dlib_shape_predictor_path()))
    clock = Clock()
    if onnx:
        graph, mean = dlib_resnet_to_onnx()
        sess = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        m = np.asarray(mean, np.float32)

        def descriptor(chip: np.ndarray) -> np.ndarray:
            x = ((chip.astype(np.float32) - m) / np.float32(256)).transpose(2, 0, 1)[None]
            return np.asarray(sess.run(None, {"input": np.ascontiguousarray(x)})[0][0])

    else:

        def descriptor(chip: np.ndarray) -> np.ndarray:
            return np.asarray(emb._model.compute_face_descriptor(chip))

    faces = 0
    for p in paths:
        img = clock("decode", lambda p=p: cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB))
        [d] = clock("detect", lambda img=img: detect([img]))
        for box in d.boxes:
            x1, y1, x2, y2 = (round(float(v)) for v in box)
            rect = dlib.rectangle(x1, y1, x2, y2)
            shape = clock("landmarks", lambda img=img, rect=rect: predictor(img, rect))
            chip = clock("align", lambda img=img, shape=shape: dlib.get_face_chip(img, shape))
            v = clock("embed", lambda chip=chip: descriptor(chip))
            _ = v / np.linalg.norm(v)
            faces += 1
    return faces, clock.t


def naive_onnx(paths: list[str], model: bytes) -> tuple[int, dict[str, float]]:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    dst = template("arcface")
    clock = Clock()
    faces = 0
    for p in paths:
        img = clock("decode", lambda p=p: cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB))
        [d] = clock("detect", lambda img=img: detect([img]))
        for lm in d.landmarks:

            def warp(img: np.ndarray = img, lm: np.ndarray = lm) -> np.ndarray:
                tf = SimilarityTransform.from_estimate(lm.astype(np.float64), dst)
                return cv2.warpAffine(img, tf.params[:2], (112, 112), borderValue=0)

            crop = clock("align", warp)

            def run(crop: np.ndarray = crop) -> np.ndarray:
                x = ((crop.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
                y = sess.run(None, {name: np.ascontiguousarray(x)})[0][0]
                return y / np.linalg.norm(y)

            clock("embed", run)
            faces += 1
    return faces, clock.t


def run_pipeline(paths: list[str], pipe: FacePipeline) -> tuple[int, dict[str, float]]:
    faces = sum(isinstance(r, Face) for r in pipe.run(paths))
    return faces, {k: float(pipe.stats[k]) for k in STAGES}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    p.add_argument("--detect-threads", type=int, default=2)
    p.add_argument("--dlib-processes", default="0,1,2")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_folder(Path(tmp), args.images)
        detector = MTCNN()

        def pipeline(emb: Any) -> FacePipeline:
            return FacePipeline(
                detector,
                emb,
                batch_size=args.batch_size,
                workers=args.workers,
                detect_threads=args.detect_threads,
                progress=False,
            )

        bench = Interleaved()
        demb = DlibEmbedder()
        bench.add("dlib-naive", lambda: naive_dlib(paths, demb), args.repeat)
        procs = [int(x) for x in args.dlib_processes.split(",")]
        pools = [DlibEmbedder(processes=n) for n in procs]
        for n, pe in zip(procs, pools, strict=True):
            pipe = pipeline(pe)
            bench.add(f"dlib-pipe-{n}", lambda pipe=pipe: run_pipeline(paths, pipe), args.repeat)
        bench.add("onnx-naive", lambda: naive_dlib(paths, demb, onnx=True), args.repeat)
        dpipe = pipeline(dlib_onnx_embedder(providers="cpu"))
        bench.add("onnx-pipe", lambda: run_pipeline(paths, dpipe), args.repeat)
        model = resnet112()
        bench.add("r112-naive", lambda: naive_onnx(paths, model), args.repeat)
        rpipe = pipeline(Embedder(model, providers="cpu"))
        bench.add("r112-pipe", lambda: run_pipeline(paths, rpipe), args.repeat)
        try:
            res = bench.run()
        finally:
            for pe in pools:
                pe.close()

    def row(key: str, model: str, method: str, ref: str) -> dict[str, Any]:
        t, (faces, stages) = res[key]
        return {
            "model": model,
            "method": method,
            "seconds": t,
            "faces": faces,
            **stages,
            "ratio": res[ref][0] / t,
            "ratio_dlib_bin": res["dlib-naive"][0] / t if model.startswith("dlib") else None,
        }

    rows = [row("dlib-naive", "dlib-bin", "naive per image/face", "dlib-naive")]
    rows += [
        row(f"dlib-pipe-{n}", "dlib-bin", f"FacePipeline processes={n}", "dlib-naive")
        for n in procs
    ]
    rows += [
        row("onnx-naive", "dlib-onnx", "naive per image/face", "onnx-naive"),
        row("onnx-pipe", "dlib-onnx", "FacePipeline", "onnx-naive"),
        row("r112-naive", "resnet112", "naive per image/face", "r112-naive"),
        row("r112-pipe", "resnet112", "FacePipeline", "r112-naive"),
    ]
    for r in rows:
        r["images"] = args.images
        r["images_per_s"] = args.images / r["seconds"]
    print_table(
        rows,
        [
            ("model", "model", "s"),
            ("method", "method", "s"),
            ("images_per_s", "img/s", ".2f"),
            ("faces", "faces", "d"),
            ("ratio", "x naive", ".2f"),
            ("ratio_dlib_bin", "x dlib-bin", ".2f"),
            ("seconds", "wall s", ".2f"),
            *[(k, f"{k} s", ".2f") for k in STAGES],
        ],
    )
    meta = bench_meta(
        ["python", "bench/pipeline.py", *(argv if argv is not None else sys.argv[1:])]
    )
    meta["onnxruntime"] = ort.__version__
    meta["note"] = "stage seconds: naive = summed per step; pipeline = busy time per stage thread"
    path = write_results(results_dir() / "pipeline.json", {"meta": meta, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
