"""The Numba CUDA re-ranking kernels in Numba's CUDA simulator, against the CPU kernels.

The simulator must be switched on before Numba is imported, so the check runs
in a child process with ``NUMBA_ENABLE_CUDASIM=1``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import numpy as np
    from fastface.gpu.rerank import rerank_arrays, simulator_enabled
    from fastface.kernels.rerank import rerank_f16, rerank_f32

    assert simulator_enabled()
    rng = np.random.default_rng(0)
    nq, C, d, n, k = 3, 24, 16, 60, 5
    base = rng.normal(size=(n, d)).astype(np.float32)
    base[7] = base[3]  # an exact tie: the lower id must come first
    q = rng.normal(size=(nq, d)).astype(np.float32)
    ids = rng.permutation(1000)[:n].astype(np.int64)
    rows = rng.integers(0, n, (nq, C)).astype(np.int64)
    for i in range(nq):
        rows[i] = rng.permutation(n)[:C]
    rows[0, :2] = [3, 7]
    rows[1, 5] = -1  # skipped candidate
    cand = np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)
    for l2 in (False, True):
        for dtype in (np.float32, np.float16):
            b = base.astype(dtype)
            D, I = rerank_arrays(q, b, rows, cand, k, l2=l2)
            Dr = np.full((nq, k), np.inf if l2 else -np.inf, np.float32)
            Ir = np.full((nq, k), -1, np.int64)
            if dtype == np.float16:
                rerank_f16(q, b.view(np.uint16), rows, cand, l2, Dr, Ir)
            else:
                rerank_f32(q, b, rows, cand, l2, Dr, Ir)
            np.testing.assert_array_equal(I, Ir)
            np.testing.assert_allclose(D, Dr, rtol=1e-5, atol=1e-5)
    # fewer candidates than k: padded
    D, I = rerank_arrays(q, base, rows[:, :3].copy(), cand[:, :3].copy(), 5, l2=False)
    assert (I[:, 3:] == -1).all() and np.isneginf(D[:, 3:]).all()
    print("SIM-OK")
    """
)


def test_rerank_kernels_in_cuda_simulator() -> None:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SIM-OK" in proc.stdout
