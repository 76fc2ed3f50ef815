"""GPU benchmark: alignment, encoding and IVF-PQ search against their references, one run.

Sections (each side by side with its reference, measured in the same run):

- align:  faces/s, 250 x 250 uint8 images -> 112 x 112 crops (uint8 and the fused
          float32 NCHW model input), images in GPU memory and, separately, in host
          memory (copies included); fraction of the device's peak memory bandwidth
          (bytes: the crops written plus each face's sampled source box read);
          fastface's CPU align on all cores as the reference.
- encode: vectors/s of GPU encoding (GEMMs) against FAISS CPU ``add`` (all cores),
          same codec; agreement of the codes.
- search: R@10 against QPS per nprobe for the GPU IVF-PQ path with exact
          re-ranking, FAISS CPU (all cores) on the same index, and exact PyTorch
          float16 matmul + top-k on the GPU; the scan's achieved bandwidth (code
          bytes of the probed lists / search time) against the peak.

Sizes: full run 10M x 128 (``SyntheticFaces``); ``--quick`` 1M x 128 and fewer
queries so that the whole script (data generation included) fits in about four
minutes on one H200 with 16 cores. ``--emulate`` runs every section on the CPU
emulation at toy sizes: it checks the script, not the speed.

    python bench/gpu.py --quick --out OUTDIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from fastface import IVFPQIndex, IVFPQParams
from fastface._bench.common import bench_meta, print_table
from fastface.datasets import SyntheticFaces
from fastface.faces import align, estimate_similarity, template
from fastface.gpu import encode, from_cpu, get_backend
from fastface.gpu import warp as gpu_warp
from fastface.gpu._adapter import _codec_of, codec_arrays


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Timer:
    """Median of ``repeat`` timed calls (after one warm-up), synchronising the device."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def __call__(self, fn: Any, repeat: int = 3) -> tuple[float, Any]:
        out = fn()
        self.backend.synchronize()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = fn()
            self.backend.synchronize()
            times.append(time.perf_counter() - t0)
        return float(np.median(times)), out


def peak_bandwidth(backend: Any) -> float | None:
    if not backend.is_device:
        return None
    from fastface.gpu import device_info

    return float(device_info()["peak_bandwidth_gbs"]) * 1e9


def bench_align(args: argparse.Namespace, backend: Any, timer: Timer) -> dict[str, Any]:
    F = args.faces
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (F, 250, 250, 3), dtype=np.uint8)
    lm = template("arcface")[None] * rng.uniform(1.2, 1.8, (F, 1, 1)) + rng.uniform(
        10, 40, (F, 1, 2)
    )
    M = estimate_similarity(lm, template("arcface"))
    idx = np.arange(F, dtype=np.int64)
    dev = backend.device_kind
    rows = []
    imgs_dev = backend.asarray(images)
    # bytes: the crop written + the source box each face samples (scale^2 of the crop)
    scale2 = 1.0 / np.abs(M[:, 0, 0] * M[:, 1, 1] - M[:, 0, 1] * M[:, 1, 0])
    src_bytes = float((112 * 112 * 3 * scale2).sum())
    for output, out_bytes in (("uint8", 112 * 112 * 3), ("float32_nchw", 112 * 112 * 3 * 4)):
        t_dev, _ = timer(
            lambda o=output: gpu_warp(imgs_dev, M, idx, (112, 112), output=o, device=dev)
        )
        t_host, _ = timer(
            lambda o=output: gpu_warp(images, M, idx, (112, 112), output=o, device=dev)
        )
        n_cpu = min(F, args.cpu_faces)
        t_cpu, _ = timer(lambda o=output, n=n_cpu: align(images[:n], lm[:n], output=o), repeat=2)
        moved = F * out_bytes + src_bytes
        peak = peak_bandwidth(backend)
        rows.append(
            {
                "output": output,
                "faces": F,
                "device_faces_s": F / t_dev,
                "host_faces_s": F / t_host,
                "cpu_faces_s": n_cpu / t_cpu,
                "device_vs_cpu": (F / t_dev) / (n_cpu / t_cpu),
                "device_gbs": moved / t_dev / 1e9,
                "bandwidth_fraction": None if peak is None else moved / t_dev / peak,
            }
        )
    print_table(
        rows,
        [
            ("output", "output", "s"),
            ("device_faces_s", "faces/s (device mem)", ",.0f"),
            ("host_faces_s", "faces/s (host mem)", ",.0f"),
            ("cpu_faces_s", "CPU faces/s", ",.0f"),
            ("device_vs_cpu", "x CPU", ".1f"),
            ("device_gbs", "GB/s", ".1f"),
            ("bandwidth_fraction", "of peak", ".2f"),
        ],
    )
    return {"rows": rows, "goal_faces_s": 1_000_000}


def make_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    data = SyntheticFaces(
        n_identities=args.n // 10, per_identity=10, d=128, seed=0, n_groups=max(1, args.n // 10_000)
    )
    t0 = time.perf_counter()
    xb, _ = data.vectors()
    xq, _ = data.queries(args.nq, seed=1)
    log(f"data {xb.shape} generated in {time.perf_counter() - t0:.1f}s")
    return xb, xq


def exact_gt(xb: np.ndarray, xq: np.ndarray, k: int, backend: Any) -> tuple[np.ndarray, Any]:
    """float32 ground truth, and the PyTorch float16 brute force (the competitor) if on a GPU."""
    if not backend.is_device:
        s = xq @ xb.T
        gt = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return gt, None
    import torch

    xb_t = torch.from_numpy(xb).cuda()
    xq_t = torch.from_numpy(xq).cuda()
    gt = []
    for s in range(0, xq.shape[0], 256):
        gt.append(torch.topk(xq_t[s : s + 256] @ xb_t.T, k, dim=1).indices.cpu().numpy())
    xb_h = xb_t.half()
    del xb_t

    def brute() -> Any:
        out = []
        q = xq_t.half()
        for s in range(0, q.shape[0], 1024):
            out.append(torch.topk(q[s : s + 1024] @ xb_h.T, k, dim=1).indices)
        torch.cuda.synchronize()
        return torch.cat(out).cpu().numpy()

    return np.concatenate(gt), brute


def recall(I: np.ndarray, gt: np.ndarray, k: int = 10) -> float:
    hits = sum(len(np.intersect1d(I[i, :k], gt[i, :k])) for i in range(len(gt)))
    return hits / (k * len(gt))


def bench_index(args: argparse.Namespace, backend: Any, timer: Timer) -> dict[str, Any]:
    xb, xq = make_data(args)
    params = IVFPQParams(128, args.nlist, 16, store_vectors="float16")
    cpu = IVFPQIndex(params)
    t0 = time.perf_counter()
    cpu.train(xb, max_points=min(len(xb), 64 * args.nlist))
    log(f"trained nlist={args.nlist} in {time.perf_counter() - t0:.1f}s")
    codec = codec_arrays(_codec_of(cpu))
    dev = backend.device_kind
    # --- encoding: GPU GEMMs vs FAISS CPU add, same codec -------------------------------------
    n_enc = min(len(xb), args.encode_n)
    xe = backend.asarray(xb[:n_enc])
    t_gpu, (lists, codes) = timer(
        lambda: encode(
            xe, codec["centroids"], codec["codebook"], by_residual=codec["by_residual"], device=dev
        ),
        repeat=2,
    )
    probe = faiss.clone_index(_codec_of(cpu))
    t_cpu, _ = timer(lambda: (probe.reset(), probe.add(xb[:n_enc])), repeat=1)
    ref = _codec_of(cpu).sa_encode(xb[: min(n_enc, 100_000)])
    nc = _codec_of(cpu).coarse_code_size()
    ref_lists = sum(ref[:, b].astype(np.int64) << (8 * b) for b in range(nc))
    got_codes = backend.to_host(codes)[: len(ref)]
    enc = {
        "n": n_enc,
        "gpu_vectors_s": n_enc / t_gpu,
        "faiss_cpu_add_vectors_s": n_enc / t_cpu,
        "speedup": t_cpu / t_gpu,
        "same_list": float((backend.to_host(lists)[: len(ref)] == ref_lists).mean()),
        "same_code": float((got_codes == ref[:, nc:]).all(axis=1).mean()),
    }
    log(f"encode: {enc}")
    t0 = time.perf_counter()
    cpu.add(xb)
    log(f"FAISS add of {len(xb)} in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    g = from_cpu(cpu, device=dev)
    log(f"to GPU in {time.perf_counter() - t0:.1f}s")
    gt, brute = exact_gt(xb, xq, 10, backend)
    rows: list[dict[str, Any]] = []
    qd = backend.asarray(xq)
    code_bytes_total = float(np.prod(g.codes.shape)) * 4
    peak = peak_bandwidth(backend)
    nq_cpu = min(len(xq), args.nq_cpu)
    for nprobe in args.nprobe:
        for rerank in args.rerank:
            t, (_, I) = timer(
                lambda p=nprobe, r=rerank: g.search(qd, 10, nprobe=p, rerank=r or None)
            )
            scanned = code_bytes_total * nprobe / args.nlist * len(xq)
            rows.append(
                {
                    "method": f"gpu rerank={rerank}",
                    "nprobe": nprobe,
                    "R@10": recall(backend.to_host(I), gt),
                    "QPS": len(xq) / t,
                    "scan_gbs": scanned / t / 1e9,
                    "of_peak": None if peak is None else scanned / t / peak,
                }
            )
        t, (_, I) = timer(lambda p=nprobe: cpu.search(xq[:nq_cpu], 10, nprobe=p), repeat=1)
        rows.append(
            {
                "method": "faiss cpu",
                "nprobe": nprobe,
                "R@10": recall(I, gt[:nq_cpu]),
                "QPS": nq_cpu / t,
            }
        )
    if brute is not None:
        t, I = timer(brute)
        rows.append(
            {
                "method": "torch fp16 exact",
                "nprobe": None,
                "R@10": recall(I, gt),
                "QPS": len(xq) / t,
            }
        )
    print_table(
        rows,
        [
            ("method", "method", "s"),
            ("nprobe", "nprobe", "d"),
            ("R@10", "R@10", ".4f"),
            ("QPS", "QPS", ",.0f"),
            ("scan_gbs", "scan GB/s", ".1f"),
            ("of_peak", "of peak", ".2f"),
        ],
    )

    def best(prefix: str) -> float | None:
        ok = [r["QPS"] for r in rows if r["method"].startswith(prefix) and r["R@10"] >= 0.95]
        return max(ok) if ok else None

    g_best, f_best, b_best = best("gpu"), best("faiss"), best("torch")
    summary = {
        "gpu_best_qps_at_r95": g_best,
        "faiss_cpu_best_qps_at_r95": f_best,
        "torch_fp16_qps": b_best,
        "gpu_vs_faiss_cpu": None if not (g_best and f_best) else g_best / f_best,
        "gpu_vs_brute_force": None if not (g_best and b_best) else g_best / b_best,
        "goals": {"vs_brute_force": 5, "vs_faiss_cpu": 20},
    }
    log(f"summary: {summary}")
    return {
        "n": len(xb),
        "nq": len(xq),
        "nlist": args.nlist,
        "M": 16,
        "encode": enc,
        "rows": rows,
        "summary": summary,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="1M x 128, fewer queries (fits ~4 min)")
    ap.add_argument("--emulate", action="store_true", help="CPU emulation, toy sizes (rehearsal)")
    ap.add_argument(
        "--out", type=Path, default=None, help="folder for gpu.json (default bench/results)"
    )
    ap.add_argument("--sections", default="align,search", help="comma list: align, search")
    args = ap.parse_args(argv)
    # (n, nq, nq for FAISS CPU, nlist, faces, faces for the CPU align, vectors encoded,
    #  nprobe sweep, rerank factors (0: none))
    sizes = {
        "emulate": (20_000, 50, 50, 64, 64, 64, 20_000, [4, 16], [0, 4]),
        "quick": (1_000_000, 5_000, 1_000, 1024, 8_192, 2_000, 1_000_000, [8, 16, 32, 64], [4]),
        "full": (10_000_000, 10_000, 2_000, 4096, 50_000, 5_000, 2_000_000, [8, 16, 32, 64, 128],
                 [0, 4, 8]),
    }  # fmt: skip
    mode = "emulate" if args.emulate else ("quick" if args.quick else "full")
    (args.n, args.nq, args.nq_cpu, args.nlist, args.faces, args.cpu_faces, args.encode_n,
     args.nprobe, args.rerank) = sizes[mode]  # fmt: skip
    backend = get_backend("emulate" if args.emulate else "cuda")
    backend.device_kind = "emulate" if args.emulate else "cuda"
    timer = Timer(backend)
    out: dict[str, Any] = {"meta": bench_meta(), "mode": mode, "sizes": sizes[mode]}
    if backend.is_device:
        from fastface.gpu import device_info

        out["device"] = device_info()
        log(f"device: {out['device']}")
    sections = set(args.sections.split(","))
    if "align" in sections:
        log("align")
        out["align"] = bench_align(args, backend, timer)
    if "search" in sections:
        log("search")
        out["search"] = bench_index(args, backend, timer)
    folder = args.out or Path("bench/results")
    folder.mkdir(parents=True, exist_ok=True)
    name = "gpu-emulate.json" if args.emulate else ("gpu-quick.json" if args.quick else "gpu.json")
    (folder / name).write_text(json.dumps(out, indent=2, default=float) + "\n")
    log(f"wrote {folder / name}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
