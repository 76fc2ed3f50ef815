"""The README's gallery example runs as written, and prints what the README says."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "### A gallery with data-subject rights\n"


def test_gallery_example_runs(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    text = README.read_text()
    start = text.index(HEADING) + len(HEADING)
    body = text[start : start + re.search(r"^#{2,3} ", text[start:], flags=re.M).start()]
    (code,) = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    exec(compile(code, str(README), "exec"), {})
    out = capsys.readouterr().out.split("\n")
    assert out[0] == "person-0 1.0"
    assert out[1].startswith("purged ")
    assert out[2] == "True flat"
    assert (tmp_path / "person-1-export" / "embeddings.npy").exists()
