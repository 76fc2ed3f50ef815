"""Near-duplicate detection: fastface dedup against exact all-pairs (FAISS range_search).

Data: ``SyntheticFaces(identities, per_identity, d, n_groups=groups)`` with
planted near copies (:func:`fastface.datasets.plant_duplicates`): a random 5%
of the rows get 1 to 3 copies each, at cosine 0.95 to 0.99 to their original.
Planted groups are the rows that share an original.

1. On a random ``--subset`` of rows (100k by default): FAISS exact
   ``IndexFlatIP.range_search`` on the unit vectors gives every pair with cosine
   ``>= threshold`` and, by union-find, the exact groups; fastface
   ``dedup_vectors`` is run at each ``--nprobe`` and compared (pair recall and
   precision against exact, equal groups, wall time, speed-up).
2. On all rows: fastface ``dedup_vectors`` at ``--nprobe-full``, with pair
   recall and precision against the planted truth (pairs inside planted groups
   whose cosine is ``>= threshold``) and the share of planted groups found whole.

Usage::

    python bench/dedup.py                       # 1M x 512 (+ ~100k planted copies)
    python bench/dedup.py --identities 20000    # 200k x 512
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/rerank.py

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from fastface import dedup_vectors
from fastface._bench.common import bench_meta
from fastface.datasets import SyntheticFaces, plant_duplicates
from fastface.kernels.dedup import union_find


def pair_keys(pairs: np.ndarray, n: int) -> np.ndarray:
    return np.unique(pairs[:, 0].astype(np.int64) * n + pairs[:, 1])


def recall_precision(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    hit = np.intersect1d(found, truth).size
    return hit / max(truth.size, 1), hit / max(found.size, 1)


def exact_faiss(x: np.ndarray, threshold: float) -> tuple[np.ndarray, float]:
    """All pairs (a < b) with cosine >= threshold, by FAISS exact range search; wall time."""
    t = time.perf_counter()
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(u)
    lims, _, J = flat.range_search(u, threshold)  # IP: keeps scores > radius
    rows = np.repeat(np.arange(x.shape[0], dtype=np.int64), np.diff(lims).astype(np.int64))
    keep = rows < J
    pairs = np.stack([rows[keep], J[keep]], axis=1)
    return pairs, time.perf_counter() - t


def groups_of(pairs: np.ndarray, n: int) -> np.ndarray:
    parent = np.arange(n, dtype=np.int64)
    union_find(pairs[:, 0].copy(), pairs[:, 1].copy(), parent)
    return parent


def planted_truth_pairs(x: np.ndarray, origin: np.ndarray, threshold: float) -> np.ndarray:
    """Pairs inside planted groups whose exact cosine is >= threshold, as (a, b) rows."""
    copies = np.flatnonzero(origin != np.arange(origin.size))
    members: dict[int, list[int]] = {}
    for c in copies.tolist():
        members.setdefault(int(origin[c]), [int(origin[c])]).append(c)
    out = []
    for grp in members.values():
        g = np.array(grp)
        u = x[g] / np.linalg.norm(x[g], axis=1, keepdims=True)
        S = u @ u.T
        a, b = np.nonzero(np.triu(np.float32(threshold) <= S, 1))
        out.append(np.stack([g[a], g[b]], axis=1))
    pairs = np.concatenate(out) if out else np.empty((0, 2), np.int64)
    return np.sort(pairs, axis=1)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--identities", type=int, default=100_000)
    ap.add_argument("--per-identity", type=int, default=10)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--groups", type=int, default=300)
    ap.add_argument("--frac", type=float, default=0.05)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--subset", type=int, default=100_000)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--nprobe-full", type=int, default=4)
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--work", default="/tmp/fastface-bench")
    ap.add_argument("--out", default="bench/results/dedup.json")
    args = ap.parse_args(argv)
    thr = args.threshold

    data = SyntheticFaces(args.identities, args.per_identity, args.d, seed=0, n_groups=args.groups)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{data.n}x{args.d}-g{args.groups}-dup{args.frac}"
    x_path, o_path = work / f"planted-{tag}.npy", work / f"planted-{tag}.origin.npy"
    if not x_path.exists():
        base = work / f"synth-{data.n}x{args.d}-g{args.groups}.npy"
        xb = np.load(base) if base.exists() else data.vectors()[0]
        x_new, origin = plant_duplicates(xb, args.frac, seed=0)
        del xb
        np.save(o_path, origin)
        np.save(x_path.with_suffix(".tmp.npy"), x_new)
        x_path.with_suffix(".tmp.npy").rename(x_path)
        del x_new
    x = np.load(x_path, mmap_mode="r")
    origin = np.load(o_path)
    n = x.shape[0]
    out: dict[str, Any] = {"meta": bench_meta(["bench/dedup.py", *argv]), "config": vars(args)}
    out["config"]["n"] = n

    # 1. subset: fastface against FAISS exact range search -----------------------------------
    rng = np.random.default_rng(0)
    sub = np.sort(rng.choice(n, size=min(args.subset, n), replace=False))
    xs = np.ascontiguousarray(x[sub])
    exact_pairs, t_exact = exact_faiss(xs, thr)
    exact_keys = pair_keys(exact_pairs, sub.size)
    exact_groups = groups_of(exact_pairs, sub.size)
    print(f"subset n={sub.size}: FAISS exact range_search {t_exact:.1f}s, {exact_keys.size} pairs")
    sub_rows = []
    for nprobe in args.nprobe:
        t = time.perf_counter()
        r = dedup_vectors(xs, thr, nprobe=nprobe, exact_below=0, progress=False)
        secs = time.perf_counter() - t
        rec, prec = recall_precision(pair_keys(r.pairs, sub.size), exact_keys)
        same_groups = bool(
            np.array_equal(r.labels, np.unique(exact_groups, return_inverse=True)[1])
        )
        row = {
            "nprobe": nprobe,
            "seconds": secs,
            "pair_recall_vs_exact": rec,
            "pair_precision_vs_exact": prec,
            "groups_equal_exact": same_groups,
            "groups_with_duplicates": int((r.sizes > 1).sum()),
            "speedup_vs_faiss_range_search": t_exact / secs,
        }
        sub_rows.append(row)
        print(
            f"  fastface nprobe={nprobe:3d}: {secs:6.1f}s  x{t_exact / secs:5.1f} faster  "
            f"pair recall {rec:.4f} precision {prec:.4f}  groups equal exact: {same_groups}",
            flush=True,
        )
    out["subset"] = {
        "n": int(sub.size),
        "faiss_range_search_s": t_exact,
        "exact_pairs": int(exact_keys.size),
        "fastface": sub_rows,
    }

    # 2. everything: fastface against the planted truth ------------------------------------
    if not args.skip_full:
        t = time.perf_counter()
        r = dedup_vectors(x, thr, nprobe=args.nprobe_full, exact_below=0, progress=True)
        secs = time.perf_counter() - t
        truth = planted_truth_pairs(x, origin, thr)
        truth_keys = pair_keys(truth, n)
        found_keys = pair_keys(r.pairs, n)
        rec = np.intersect1d(found_keys, truth_keys).size / max(truth_keys.size, 1)
        # precision against the planted truth: found pairs that lie inside a planted group
        inside = origin[r.pairs[:, 0]] == origin[r.pairs[:, 1]]
        prec = float(inside.mean()) if inside.size else 1.0
        planted_roots = np.unique(origin[origin != np.arange(n)])
        whole = np.ones(planted_roots.size, bool)
        lab = r.labels  # ids are the row numbers here
        members = np.flatnonzero(origin != np.arange(n))
        whole_map = lab[members] == lab[origin[members]]
        bad_roots = np.unique(origin[members[~whole_map]])
        whole[np.isin(planted_roots, bad_roots)] = False
        full = {
            "n": n,
            "nprobe": args.nprobe_full,
            "seconds": secs,
            "planted_groups": int(planted_roots.size),
            "planted_pairs_at_threshold": int(truth_keys.size),
            "pair_recall_vs_planted": rec,
            "pair_precision_vs_planted": prec,
            "planted_groups_found_whole": float(whole.mean()),
            "pairs_found": int(found_keys.size),
        }
        out["full"] = full
        print(
            f"all n={n}: fastface nprobe={args.nprobe_full} {secs:.1f}s; pair recall vs planted "
            f"{rec:.4f}, precision {prec:.4f}; planted groups found whole {whole.mean():.4f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
