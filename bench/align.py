"""Face alignment and MTCNN throughput: fastface against the references, same inputs, same run.

Alignment (250 x 250 images -> 112 x 112 ArcFace crops), faces per second:
  * fastface ``align`` (uint8, and the fused float32 NCHW model input),
  * the InsightFace-style loop: scikit-image ``SimilarityTransform`` estimate
    and ``cv2.warpAffine`` per face,
  * the fastest OpenCV variant: ``cv2.estimateAffinePartial2D`` (LMEDS) and
    ``cv2.warpAffine`` over a thread pool, one chunk of faces per thread.
Detection: MTCNN images per second, fastface ``detect`` on a batch against
the same ONNX files run one image at a time.

Prints one table (medians) and writes bench/results/align.json.

    python bench/align.py [--faces 2000] [--repeat 5] [--threads 2] [--images 32]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from skimage import data
from skimage.transform import SimilarityTransform

import fastface
from fastface._bench.common import Interleaved, median_time, results_dir
from fastface.faces import align, detect, template

ROOT = Path(__file__).resolve().parent
ARC = template("arcface")


def make_inputs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n 250 x 250 images (the astronaut's face pasted at random places, so
    the content is a face, plus noise) and LFW-like landmarks: the face near
    the centre, rotated up to 20 degrees, 90-130 px between eyes and mouth."""
    rng = np.random.default_rng(seed)
    base = cv2.resize(data.astronaut()[0:250, 100:350], (250, 250))
    imgs = np.empty((n, 250, 250, 3), np.uint8)
    for i in range(n):
        noise = rng.integers(-10, 11, (250, 250, 3))
        imgs[i] = np.clip(base.astype(np.int16) + noise, 0, 255)
    angle = np.deg2rad(rng.uniform(-20, 20, n))
    scale = rng.uniform(0.8, 1.2, n)  # crop pixels per image pixel
    c, s = np.cos(angle), np.sin(angle)
    R = np.stack([np.stack([c, -s], 1), np.stack([s, c], 1)], 1)
    pts = (ARC - 56.0) + rng.normal(0, 1.0, (n, 5, 2))
    centre = 125 + rng.normal(0, 5, (n, 2))
    lm = np.einsum("nij,nkj->nki", R, pts) / scale[:, None, None] + centre[:, None]
    return imgs, lm


def insightface_loop(imgs: np.ndarray, lm: np.ndarray) -> np.ndarray:
    out = np.empty((len(lm), 112, 112, 3), np.uint8)
    for i in range(len(lm)):
        M = SimilarityTransform.from_estimate(lm[i], ARC).params[:2]
        out[i] = cv2.warpAffine(imgs[i], M, (112, 112), borderValue=0.0)
    return out


def opencv_pool(imgs: np.ndarray, lm: np.ndarray, pool: ThreadPoolExecutor, threads: int):
    out = np.empty((len(lm), 112, 112, 3), np.uint8)
    src = lm.astype(np.float32)
    dst = ARC.astype(np.float32)

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            M, _ = cv2.estimateAffinePartial2D(src[i], dst, method=cv2.LMEDS)
            cv2.warpAffine(imgs[i], M, (112, 112), dst=out[i], borderValue=0.0)

    bounds = np.linspace(0, len(lm), 4 * threads + 1).astype(int)
    list(pool.map(lambda b: work(*b), itertools.pairwise(bounds)))
    return out


def mtcnn_one_at_a_time(images: np.ndarray) -> list:
    return [detect([im])[0] for im in images]


def git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faces", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--images", type=int, default=32, help="images for the MTCNN rows")
    args = ap.parse_args()

    imgs, lm = make_inputs(args.faces)
    n = args.faces
    rows: list[dict[str, Any]] = []

    # The references must agree with fastface before their speed means anything.
    ours = align(imgs, lm).crops
    ref = insightface_loop(imgs, lm)
    agree = float((np.abs(ours.astype(np.int16) - ref) <= 1).mean())

    # interleaved rounds: every method sees the same drift of a shared machine
    with ThreadPoolExecutor(args.threads) as pool:
        bench = Interleaved()
        for key, fn in {
            "ref": lambda: insightface_loop(imgs, lm),
            "cv": lambda: opencv_pool(imgs, lm, pool, args.threads),
            "ff": lambda: align(imgs, lm, threads=args.threads),
            "ff1": lambda: align(imgs, lm, threads=1),
            "fix": lambda: align(imgs, lm, kernel="fixed", threads=args.threads),
            "ff32": lambda: align(imgs, lm, output="float32_nchw", threads=args.threads),
        }.items():
            bench.add(key, fn, args.repeat)
        res = bench.run()
    t_ref, t_cv, t_ff, t_ff1, t_fix, t_ff32 = (
        res[k][0] for k in ("ref", "cv", "ff", "ff1", "fix", "ff32")
    )
    for name, t in [
        ("insightface loop (skimage + cv2.warpAffine)", t_ref),
        (f"opencv estimateAffinePartial2D + warpAffine, {args.threads} threads", t_cv),
        (f"fastface align uint8, {args.threads} threads", t_ff),
        ("fastface align uint8, 1 thread", t_ff1),
        ("fastface align uint8, kernel='fixed'", t_fix),
        ("fastface align float32_nchw (fused)", t_ff32),
    ]:
        rows.append(
            {
                "task": "align 250x250 -> 112x112",
                "method": name,
                "n": n,
                "seconds": t,
                "per_second": n / t,
                "vs_insightface": t_ref / t,
                "vs_opencv_pool": t_cv / t,
            }
        )

    det_imgs = imgs[: args.images]
    t_one = median_time(lambda: mtcnn_one_at_a_time(det_imgs), max(1, args.repeat // 2))
    t_batch = median_time(lambda: detect(det_imgs), max(1, args.repeat // 2))
    for name, t in [("mtcnn one image at a time", t_one), ("fastface detect, batch", t_batch)]:
        rows.append(
            {
                "task": "mtcnn 250x250",
                "method": name,
                "n": len(det_imgs),
                "seconds": t,
                "per_second": len(det_imgs) / t,
                "vs_one_at_a_time": t_one / t,
            }
        )

    print(f"{'task':26s} {'method':62s} {'per s':>10s} {'ratio':>8s}")
    for r in rows:
        ratio = r.get("vs_insightface", r.get("vs_one_at_a_time"))
        print(f"{r['task']:26s} {r['method']:62s} {r['per_second']:10.0f} {ratio:7.2f}x")
    print(
        f"fastface vs opencv pool: {t_cv / t_ff:.2f}x; crops within 1 grey level of the "
        f"InsightFace recipe: {agree:.5f}"
    )

    import onnxruntime
    import skimage

    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_sha": git_sha(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "scikit_image": skimage.__version__,
        "onnxruntime": onnxruntime.__version__,
        "build_info": fastface.build_info(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "repeat": args.repeat,
        "statistic": "median",
        "agreement_within_1_grey_level": agree,
        "load_average_at_start": os.getloadavg(),
    }
    out = results_dir() / "align.json"  # FASTFACE_BENCH_RESULTS, else bench/results
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
