"""End-to-end throughput: ``FacePipeline`` against the naive per-image composition.

Same run, same image files (JPEGs made from the scikit-image samples: two
thirds 250 x 250 LFW-style head shots, one third 512 x 512 scenes, some with
no face), same detector code (fastface's MTCNN), same models. Images per
second, medians, and where the time goes.

* ``dlib-bin`` (the real offline model, run by dlib): naive = per image
  ``cv2.imread``, ``detect([img])``, then per face dlib's 5-point predictor,
  ``dlib.get_face_chip`` (estimate + warp) and ``compute_face_descriptor``;
  pipeline = ``FacePipeline(None, DlibEmbedder(processes=p))``.
* ``dlib-onnx`` (the same model converted to ONNX, same vectors): naive as
  above with one ONNX Runtime run per chip instead of dlib; pipeline =
  ``FacePipeline(None, dlib_onnx_embedder())``. The ``x dlib-bin`` column
  compares with the dlib-bin naive loop, what a dlib user runs today.
* ``resnet112`` (the ResNet-like ONNX model of bench/embed.py, ArcFace
  template): naive = per image ``cv2.imread``, ``detect([img])``, then per face
  ``skimage SimilarityTransform.estimate``, ``cv2.warpAffine`` and one ONNX
  Runtime run; pipeline = ``FacePipeline(None, Embedder(model))``.

The naive loops call ``detect`` with its defaults (ONNX Runtime's thread
count); ``FacePipeline(None, ...)`` detects ``detect_threads`` batches at once
with one ONNX Runtime thread per network. Methods are timed round-robin after
a warm-up run each; ``speedup_vs_naive`` is the median over rounds of the
per-round ratio. The stage columns are seconds spent in each step in the last
run (naive: summed over the loop; pipeline: busy time of each stage thread;
the stages overlap, so they add up to more than the wall time); ``cpu s`` is
the process CPU time of the run; the ``detect_steps`` in the JSON split the
detector's time (``MTCNN.stats``).

The same run measures the dlib model's same-person threshold
(``calibration`` in the JSON; :data:`fastface.faces.DLIB_THRESHOLD`): the
faces of scikit-image's ``lfw_subset`` and altered copies, detected,
dlib-aligned and embedded; the cosine threshold on unit vectors that agrees
most often with face_recognition's rule (Euclidean distance < 0.6 between
raw descriptors) on all pairs.

``--before`` takes the JSON of an earlier run (e.g. the same script at an
older commit, run just before on the same machine) and carries its ratios and
stage times into ``summary.before``.

    python bench/pipeline.py [--images 48] [--repeat 5] [--dlib-processes 0,1,2]
        [--models dlib-bin,dlib-onnx,resnet112] [--before OLD.json --before-note TEXT]
        [--no-calibration]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
    DLIB_THRESHOLD,
    DlibEmbedder,
    Embedder,
    Face,
    FacePipeline,
    analyze,
    detect,
    dlib_onnx_embedder,
    dlib_resnet_to_onnx,
    dlib_shape_predictor_path,
    template,
)
from fastface.faces.detect import _default_model, pipeline_model

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
                tf = SimilarityTransform.from_estimate(np.asarray(lm, np.float64), dst)
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


class Recorded:
    """A method that records wall and CPU seconds and the detector's steps of every call."""

    def __init__(self, fn: Callable[[], Any], detector: Any) -> None:
        self.fn, self.detector = fn, detector
        self.calls: list[tuple[float, float]] = []
        self.steps: dict[str, float] = {}

    def __call__(self) -> Any:
        self.detector.reset_stats()
        w, c = time.perf_counter(), time.process_time()
        out = self.fn()
        self.calls.append((time.perf_counter() - w, time.process_time() - c))
        self.steps = dict(self.detector.stats)
        return out

    @property
    def rounds(self) -> list[tuple[float, float]]:
        return self.calls[1:]  # the first call is Interleaved's warm-up


# --- the dlib model's threshold --------------------------------------------------------------


def lfw_images(n: int) -> list[np.ndarray]:
    """scikit-image's LFW faces (25 x 25 gray) as 200 x 200 RGB images a detector finds."""
    out = []
    for f in data.lfw_subset()[:n]:
        u8 = (f * 255).round().astype(np.uint8)
        up = cv2.resize(u8, (100, 100), interpolation=cv2.INTER_CUBIC)
        up = cv2.copyMakeBorder(up, 50, 50, 50, 50, cv2.BORDER_REFLECT)
        out.append(np.repeat(up[:, :, None], 3, axis=2))
    return out


def altered(img: np.ndarray) -> list[np.ndarray]:
    """The image, mirrored, rotated by +-8 degrees and scaled by 0.8 about its centre."""
    h, w = img.shape[:2]
    out = [img, np.ascontiguousarray(img[:, ::-1])]
    for angle, scale in ((8, 1.0), (-8, 1.0), (0, 0.8)):
        M = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
        out.append(cv2.warpAffine(img, M, (w, h), borderMode=cv2.BORDER_REFLECT))
    return out


def calibrate_dlib(n_faces: int = 100, raw_threshold: float = 0.6) -> dict[str, Any]:
    """The cosine threshold on unit dlib vectors equivalent to ``dist < raw_threshold``
    between raw descriptors, measured on LFW faces and altered copies of them."""
    images, source = [], []
    for i, img in enumerate(lfw_images(n_faces)):
        for v in altered(img):
            images.append(v)
            source.append(i)
    emb = dlib_onnx_embedder(providers="cpu", normalize=False)
    res = analyze(images, embedder=emb, max_faces=1)
    R = res.embeddings.astype(np.float64)
    norms = np.linalg.norm(R, axis=1)
    U = R / norms[:, None]
    iu = np.triu_indices(len(R), 1)
    gram = R @ R.T
    dist = np.sqrt(np.maximum(norms[:, None] ** 2 + norms[None] ** 2 - 2 * gram, 0))[iu]
    cos = (U @ U.T)[iu]
    raw_same = dist < raw_threshold
    # Disagreements of "cos >= t" with the raw rule for t just below each sorted cosine.
    order = np.argsort(-cos, kind="stable")
    c_sorted, s_sorted = cos[order], raw_same[order]
    n_same = int(raw_same.sum())
    wrong = np.concatenate([[n_same], n_same - np.cumsum(s_sorted) + np.cumsum(~s_sorted)])
    best = np.flatnonzero(wrong == wrong.min())
    hi = float(c_sorted[best.min() - 1]) if best.min() > 0 else 1.0
    lo = float(c_sorted[best.max()]) if best.max() < len(c_sorted) else -1.0
    median_norm = float(np.median(norms))

    def agreement(t: float) -> float:
        return float(((cos >= t) == raw_same).mean())

    src = np.asarray(source)[res.image]
    same_source = src[iu[0]] == src[iu[1]]
    return {
        "method": (
            f"the {n_faces} faces of skimage.data.lfw_subset() (25 x 25 gray, upscaled 4x "
            "bicubic, padded to 200 x 200), each also mirrored, rotated +-8 degrees and "
            "scaled 0.8; MTCNN best face, dlib 5 points, dlib chip, dlib's ResNet (ONNX, "
            "raw descriptors); over all pairs, the cosine threshold t on unit vectors whose "
            f"decisions cos >= t agree most often with dist < {raw_threshold} on the raw "
            "descriptors (face_recognition's default tolerance)"
        ),
        "images": len(images),
        "faces": len(res),
        "pairs": len(cos),
        "raw_same_pairs": n_same,
        "raw_same_pairs_of_altered_copies": int((raw_same & same_source).sum()),
        "altered_copy_pairs": int(same_source.sum()),
        "raw_norm": {
            "min": float(norms.min()),
            "median": median_norm,
            "max": float(norms.max()),
        },
        "best_threshold_interval": [lo, hi],
        "best_threshold": (lo + hi) / 2,
        "best_agreement": agreement((lo + hi) / 2),
        "closed_form_threshold": 1 - (raw_threshold / median_norm) ** 2 / 2,
        "stored_threshold": DLIB_THRESHOLD,
        "stored_agreement": agreement(DLIB_THRESHOLD),
    }


def _before(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    old = json.loads(path.read_text())
    rows = old["rows"]
    out: dict[str, Any] = {
        "source": str(path),
        "git_sha": old["meta"].get("git_sha"),
        "time_utc": old["meta"].get("time_utc"),
        "load_avg_at_start": old["meta"].get("load_avg_at_start"),
        "rows": [
            {k: r.get(k) for k in ("model", "method", "seconds", "ratio", "images_per_s", *STAGES)}
            for r in rows
        ],
    }
    out["speedup_vs_naive"] = {
        r["model"]: r["ratio"] for r in rows if r["method"].startswith("FacePipeline")
    }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    p.add_argument("--detect-threads", type=int, default=2)
    p.add_argument("--dlib-processes", default="0,1,2")
    p.add_argument("--models", default="dlib-bin,dlib-onnx,resnet112")
    p.add_argument("--before", type=Path, help="results JSON of an earlier run")
    p.add_argument("--before-note", default="", help="what the earlier run was (commit, when)")
    p.add_argument("--no-calibration", action="store_true")
    p.add_argument("--out", type=Path, help="result file (default bench/results/pipeline.json)")
    args = p.parse_args(argv)
    models = args.models.split(",")
    naive_det, pipe_det = _default_model(), pipeline_model()

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_folder(Path(tmp), args.images)

        def pipeline(emb: Any) -> FacePipeline:
            return FacePipeline(
                None,
                emb,
                batch_size=args.batch_size,
                workers=args.workers,
                detect_threads=args.detect_threads,
                progress=False,
            )

        bench = Interleaved()
        rec: dict[str, Recorded] = {}

        def add(key: str, fn: Callable[[], Any], det: Any) -> None:
            rec[key] = Recorded(fn, det)
            bench.add(key, rec[key], args.repeat)

        demb = DlibEmbedder()
        procs = [int(x) for x in args.dlib_processes.split(",")]
        pools = [DlibEmbedder(processes=n) for n in procs] if "dlib-bin" in models else []
        if "dlib-bin" in models:
            add("dlib-naive", lambda: naive_dlib(paths, demb), naive_det)
            for n, pe in zip(procs, pools, strict=True):
                pipe = pipeline(pe)
                add(f"dlib-pipe-{n}", lambda pipe=pipe: run_pipeline(paths, pipe), pipe_det)
        if "dlib-onnx" in models:
            add("onnx-naive", lambda: naive_dlib(paths, demb, onnx=True), naive_det)
            dpipe = pipeline(dlib_onnx_embedder(providers="cpu"))
            add("onnx-pipe", lambda: run_pipeline(paths, dpipe), pipe_det)
        if "resnet112" in models:
            model = resnet112()
            add("r112-naive", lambda: naive_onnx(paths, model), naive_det)
            rpipe = pipeline(Embedder(model, providers="cpu"))
            add("r112-pipe", lambda: run_pipeline(paths, rpipe), pipe_det)
        load_before = os.getloadavg()
        try:
            res = bench.run()
        finally:
            for pe in pools:
                pe.close()
        load_after = os.getloadavg()

    def row(key: str, model: str, method: str, ref: str) -> dict[str, Any]:
        t, (faces, stages) = res[key]
        r = rec[key]
        ratios = [a[0] / b[0] for a, b in zip(rec[ref].rounds, r.rounds, strict=True)]
        return {
            "model": model,
            "method": method,
            "seconds": t,
            "cpu_seconds": statistics.median(c for _, c in r.rounds),
            "faces": faces,
            **stages,
            "ratio": statistics.median(ratios),
            "ratio_rounds": ratios,
            "ratio_dlib_bin": (
                res["dlib-naive"][0] / t
                if model.startswith("dlib") and "dlib-naive" in res
                else None
            ),
            "detect_steps": r.steps,
        }

    rows = []
    if "dlib-bin" in models:
        rows.append(row("dlib-naive", "dlib-bin", "naive per image/face", "dlib-naive"))
        rows += [
            row(f"dlib-pipe-{n}", "dlib-bin", f"FacePipeline processes={n}", "dlib-naive")
            for n in procs
        ]
    if "dlib-onnx" in models:
        rows += [
            row("onnx-naive", "dlib-onnx", "naive per image/face", "onnx-naive"),
            row("onnx-pipe", "dlib-onnx", "FacePipeline", "onnx-naive"),
        ]
    if "resnet112" in models:
        rows += [
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
            ("cpu_seconds", "cpu s", ".2f"),
            *[(k, f"{k} s", ".2f") for k in STAGES],
        ],
    )
    pipes = [r for r in rows if r["method"].startswith("FacePipeline")]
    best: dict[str, dict[str, Any]] = {}
    for r in pipes:
        if r["model"] not in best or r["ratio"] > best[r["model"]]["ratio"]:
            best[r["model"]] = r
    naive = {r["model"]: r for r in rows if r["method"].startswith("naive")}
    summary: dict[str, Any] = {
        "speedup_vs_naive": {m: r["ratio"] for m, r in best.items()},
        "speedup_vs_naive_rounds": {m: r["ratio_rounds"] for m, r in best.items()},
        "pipeline_method": {m: r["method"] for m, r in best.items()},
        "cpu_seconds": {
            m: {"naive": naive[m]["cpu_seconds"], "pipeline": r["cpu_seconds"]}
            for m, r in best.items()
        },
        "stage_seconds": {
            m: {
                "naive": {k: naive[m][k] for k in STAGES},
                "pipeline": {k: r[k] for k in STAGES},
                "naive_detect_steps": naive[m]["detect_steps"],
                "pipeline_detect_steps": r["detect_steps"],
            }
            for m, r in best.items()
        },
        "load_avg": {"before": load_before, "after": load_after},
        "note": (
            "wall-clock ratios on a shared 2-core machine: other jobs' load (load_avg) takes "
            "cores from the pipeline, which wants both, more than from the naive loop"
        ),
    }
    before = _before(args.before)
    if before is not None:
        before["note"] = args.before_note
        summary["before"] = before
    if not args.no_calibration:
        t0 = time.perf_counter()
        summary["calibration"] = calibrate_dlib()
        summary["calibration"]["seconds"] = time.perf_counter() - t0
        cal = summary["calibration"]
        print(
            f"dlib threshold: best {cal['best_threshold']:.4f} (agreement "
            f"{cal['best_agreement']:.4f}), closed form {cal['closed_form_threshold']:.4f}, "
            f"stored {cal['stored_threshold']} (agreement {cal['stored_agreement']:.4f})"
        )
    meta = bench_meta(
        ["python", "bench/pipeline.py", *(argv if argv is not None else sys.argv[1:])]
    )
    meta["onnxruntime"] = ort.__version__
    meta["note"] = "stage seconds: naive = summed per step; pipeline = busy time per stage thread"
    out = args.out or results_dir() / "pipeline.json"
    path = write_results(out, {"meta": meta, "summary": summary, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
