"""The README's index examples run as written (the sections this package documents)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = (
    "## Use\n",
    "### Exact re-ranking and near-duplicates\n",
    "### Large galleries: index specs, auto-tuning, streaming builds\n",
)


def _blocks(text: str, heading: str) -> list[str]:
    start = text.index(heading) + len(heading)
    nxt = re.search(r"^#{2,3} ", text[start:], flags=re.M)
    body = text[start : start + nxt.start()] if nxt else text[start:]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_index_examples_run(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    text = README.read_text()
    namespace: dict[str, object] = {}
    code = [block for heading in SECTIONS for block in _blocks(text, heading)]
    assert len(code) == 3
    for block in code:
        exec(compile(block, str(README), "exec"), namespace)
    D, I = namespace["D"], namespace["I"]
    assert D.shape == I.shape == (5, 10)  # type: ignore[attr-defined]
    assert (tmp_path / "gallery.idx" / "manifest.json").exists()
    assert namespace["choice"].spec == "IVF262144_IVF4096,PQ32,F16"  # type: ignore[attr-defined]
    assert namespace["big"].ntotal == 20_000  # type: ignore[attr-defined]
    assert namespace["small"].params.kind == "flat"  # type: ignore[attr-defined]
