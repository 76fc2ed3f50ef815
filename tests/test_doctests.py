"""The Examples sections of the public API run as doctests (on the installed package)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "fastface._dedup",
    "fastface._native",
    "fastface.datasets",
    "fastface.eval",
    "fastface.faces.dlib_onnx",
    "fastface.faces.embed",
    "fastface.faces.pipeline",
    "fastface.index.ivfpq",
    "fastface.index.params",
    "fastface.index.sharded",
    "fastface.io",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
