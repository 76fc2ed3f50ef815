from __future__ import annotations

import numpy as np
import pytest

from fastface.datasets import SyntheticFaces


@pytest.fixture(scope="session")
def small_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """4000 x 32 identity-clustered vectors with population structure, and 100 queries."""
    data = SyntheticFaces(n_identities=400, per_identity=10, d=32, seed=0, n_groups=20)
    xb, labels = data.vectors()
    xq, qlabels = data.queries(100, seed=7)
    return xb, labels, xq, qlabels


@pytest.fixture(scope="session")
def codec32(small_data):
    """A codec for IVFPQParams(32, 32, 8) trained once on ``small_data`` (training is slow)."""
    from fastface.index import Codec, IVFPQParams

    return Codec.train(IVFPQParams(32, 32, 8), small_data[0])
