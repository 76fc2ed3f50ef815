"""The README's Faces section: its Python blocks run, in order, and say what is true."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _faces_blocks() -> list[str]:
    text = README.read_text()
    start = text.index("### Faces:")
    end = text.index("\n### ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_faces_section_runs_and_its_comments_hold() -> None:
    blocks = _faces_blocks()
    assert len(blocks) == 2
    ns: dict[str, object] = {}
    for code in blocks:
        exec(compile(code, str(README), "exec"), ns)
    res, x = ns["res"], ns["x"]
    assert [e.kind for e in res.errors] == ["no_face"] and res.errors[0].image == 1
    assert x.shape == (2, 128) and (np.sum(x * res.embeddings[:2], axis=1) > 0.999).all()
    assert ns["emb"].shape == (len(res), 128)
    assert ns["faces"].verify(ns["emb"][0], ns["emb"][0], model=res.spec)
    assert ns["dlib"].spec.threshold == ns["faces"].DLIB_THRESHOLD == 0.906
