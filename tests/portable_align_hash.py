"""Prints the SIMD variant in use and a hash of what its kernels return (run by test_portable.py).

The hash covers the align crops (both kernels, both outputs), exact re-ranking
(float32 and float16 vectors with subnormals, every specialised dimension and
others), exhaustive coarse assignment (inner product and L2, full and partial
centroid blocks) and, given a saved index directory as argv[1], 8-bit IVF-PQ scans (one
list per vector, and spilled: two) of its saved queries with its saved coarse
assignment (so that nothing FAISS computes on this CPU enters).
Kept as a script so that it can run in a child process with another
``FASTFACE_ISA`` or under ``qemu-x86_64 -cpu <older model>``.
"""

import hashlib
import sys
from pathlib import Path

import numpy as np

import fastface
import fastface._native
from fastface import faces

rng = np.random.default_rng(0)
images = rng.integers(0, 256, (4, 120, 130, 3), dtype=np.uint8)
base = np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]])
F = 12
angle = rng.uniform(-0.8, 0.8, F)
scale = rng.uniform(0.5, 2.0, F)
rot = np.stack(
    [np.stack([np.cos(angle), -np.sin(angle)], 1), np.stack([np.sin(angle), np.cos(angle)], 1)], 1
)
landmarks = (base[None] @ rot.transpose(0, 2, 1)) * scale[:, None, None]
landmarks += rng.uniform(-30, 90, (F, 1, 2))
which = rng.integers(0, 4, F)
digest = hashlib.sha256()
for kernel in ("float", "fixed"):
    for output in ("uint8", "float32_nchw"):
        res = faces.align(images, landmarks, image_index=which, output=output, kernel=kernel)
        digest.update(np.ascontiguousarray(res.crops).tobytes())
for d in (8, 32, 50, 64, 96, 128, 200, 256, 512):
    base = rng.standard_normal((200, d)).astype(np.float32)
    base *= rng.choice(np.array([1.0, 1e-6], np.float32), base.shape)
    q = rng.standard_normal((16, d)).astype(np.float32)
    cand = np.stack([rng.permutation(200)[:60] for _ in range(16)]).astype(np.int64)
    for dtype in (np.float32, np.float16):
        for l2 in (False, True):
            D, I = fastface._native.rerank(q, base.astype(dtype), cand, 9, l2=l2, lo=0, span=200)
            digest.update(D.tobytes())
            digest.update(I.tobytes())
for d, n, k in ((16, 64, 8), (50, 200, 64), (128, 1000, 300)):
    q = rng.standard_normal((9, d)).astype(np.float32)
    c = rng.standard_normal((n, d)).astype(np.float32)
    for norms in (None, (c * c).sum(1).astype(np.float32)):
        D, I = fastface._native.coarse_topk(q, np.ascontiguousarray(c.T), k, centroid_norms=norms)
        digest.update(D.tobytes())
        digest.update(I.tobytes())
if len(sys.argv) > 1:
    from fastface import IVFPQIndex

    where = Path(sys.argv[1])
    q = np.load(where / "q.npy")
    assignment = (np.load(where / "Dq.npy"), np.load(where / "Iq.npy"))
    for name in ("shard.faiss", "soar.faiss"):
        index = IVFPQIndex.load(where / name)
        for k in (1, 10, 100):
            D, I = index.scan(q, k, assignment)
            digest.update(D.tobytes())
            digest.update(I.tobytes())
print(fastface.build_info()["simd_selected"], digest.hexdigest())
