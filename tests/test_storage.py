"""Storage that hostile files cannot break: manifest bit flips and crafted fields, FAISS
header fuzzing in child processes, owner-only permissions, planted symlinks."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fastface import ShardedIndex
from fastface.errors import CorruptIndexError
from fastface.index import faiss_format, storage


def _listing(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture()
def small_index(tmp_path, small_data, codec32) -> Path:
    """A sealed shard, an open one and tombstones: a ~1 kB manifest."""
    path = tmp_path / "idx"
    with ShardedIndex.create(path, codec32.with_storage(None), shard_size=300) as index:
        index.add(small_data[0][:500])
        index.remove([3, 350])
    return path


def test_every_single_bit_flip_of_the_manifest(small_index) -> None:
    man = small_index / "manifest.json"
    raw = man.read_bytes()
    before = _listing(small_index)
    with ShardedIndex.open(small_index) as index:
        want = (index.ntotal, index.shard_counts, index.tombstones.tolist(), index.generation)
    outcomes = {"corrupt": 0, "original": 0}
    for pos in range(len(raw)):
        for bit in range(8):
            flipped = bytearray(raw)
            flipped[pos] ^= 1 << bit
            man.write_bytes(bytes(flipped))
            try:
                # mode "a": a writer, which may delete unreferenced files once verified
                with ShardedIndex.open(small_index, mode="a") as index:
                    got = (index.ntotal, index.shard_counts, index.tombstones.tolist())
                    assert (*got, index.generation) == want, (pos, bit)
                outcomes["original"] += 1
            except CorruptIndexError as e:
                assert e.path == str(man), (pos, bit, e)
                outcomes["corrupt"] += 1
            now = {n for n in os.listdir(small_index)}
            assert now == set(before), (pos, bit, set(before) ^ now)  # nothing deleted
    man.write_bytes(raw)
    assert _listing(small_index) == before
    assert outcomes["corrupt"] + outcomes["original"] == 8 * len(raw)
    assert outcomes["corrupt"] > 0.99 * 8 * len(raw)


def _edit(path: Path, change) -> None:
    man = json.loads((path / "manifest.json").read_text())
    man.pop("checksum", None)
    change(man)
    (path / "manifest.json").write_text(json.dumps(storage.seal(man)))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda m: m.update(shard_size=0), "shard_size"),
        (lambda m: m.update(shard_size=-5), "shard_size"),
        (lambda m: m.update(shard_size="300"), "shard_size"),
        (lambda m: m.update(shard_size=True), "shard_size"),
        (lambda m: m.update(generation=0), "generation"),
        (lambda m: m.update(extra=1), "extra"),
        (lambda m: m.pop("tombstones"), "tombstones"),
        (lambda m: m.update(ntotal=-1), "ntotal"),
        (lambda m: m.update(ntotal=5), "ntotal"),
        (lambda m: m.update(next_id=2), "next_id"),
        (lambda m: m.update(params={**m["params"], "M": 7}), "params"),
        (lambda m: m.update(params={**m["params"], "metric": "cos"}), "params"),
        (lambda m: m.update(params={**m["params"], "surprise": 1}), "params"),
        (lambda m: m.update(codec=None), "codec"),
        (lambda m: m.update(shards="all"), "shards"),
        (lambda m: m["shards"][0].update(count=-1), "shards[0].count"),
        (lambda m: m["shards"][0].update(count=301), "shards[0].count"),
        (lambda m: m["shards"][0].update(count=299), "shards[0]"),
        (lambda m: m["shards"][1].update(number=0), "shards[1].number"),
        (lambda m: m["shards"][0].update(sealed="yes"), "shards[0].sealed"),
        (lambda m: m["shards"][0].update(sealed=False), "shards[0].sealed"),
        (lambda m: m["shards"][0].update(extra=1), "shards[0]"),
        (lambda m: m["shards"][0]["files"]["ids"].update(file="../outside.npy"), "shards[0]"),
        (lambda m: m["shards"][0]["files"]["ids"].update(file="/etc/passwd"), "shards[0]"),
        (lambda m: m["shards"][0]["files"]["ids"].update(file="sub/x.npy"), "shards[0]"),
        (lambda m: m["shards"][0]["files"]["ids"].update(file="manifest.json"), "shards[0]"),
        (lambda m: m["shards"][0]["files"]["index"].update(bytes=-1), "shards[0]"),
        (lambda m: m["shards"][0]["files"]["index"].update(bytes=10**30), "shards[0]"),
        (lambda m: m["shards"][0]["files"]["index"].update(sha256="AB" * 32), "shards[0]"),
        (lambda m: m["shards"][0]["files"].pop("ids"), "shards[0].files"),
        (lambda m: m["tombstones"].update(file="../tombstones-g000001.npy"), "tombstones"),
        (lambda m: m.update(build=[1]), "build"),
        (lambda m: m.update(format_version="2"), "format_version"),
    ],
)
def test_crafted_manifest_fields_raise_naming_file_and_field(small_index, change, field) -> None:
    (small_index.parent / "outside.npy").write_bytes(b"\x93NUMPY")  # bait outside the directory
    before = set(os.listdir(small_index))
    _edit(small_index, change)
    with pytest.raises(CorruptIndexError) as e:
        ShardedIndex.open(small_index, mode="a").close()
    assert e.value.path is not None and Path(e.value.path).parent == small_index
    assert e.value.field is not None and e.value.field.startswith(field), e.value
    assert set(os.listdir(small_index)) == before


def test_tombstone_of_an_unknown_id(small_index) -> None:
    tomb = storage.atomic_write_npy(small_index / "tombstones-g000099.npy", np.array([3, 999999]))
    _edit(small_index, lambda m: m.update(tombstones=tomb, ntotal=m["ntotal"] - 1))
    with pytest.raises(CorruptIndexError, match="in no sealed shard") as e:
        ShardedIndex.open(small_index)
    assert e.value.field == "tombstones"


_FUZZ_CHILD = textwrap.dedent(
    """
    import faulthandler, hashlib, json, sys
    from pathlib import Path
    import numpy as np
    from fastface import ShardedIndex
    from fastface.errors import CorruptIndexError
    from fastface.index import storage

    faulthandler.enable()
    path, cases, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    pristine_man = json.loads((path / "manifest.json").read_text())
    originals = {}
    q = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    with open(out, "w") as log:
        for line in open(cases):
            case = json.loads(line)
            target = path / case["file"]
            raw = originals.setdefault(case["file"], target.read_bytes())
            data = bytearray(raw)
            data[case["offset"] : case["offset"] + len(case["bytes"])] = bytes(case["bytes"])
            target.write_bytes(bytes(data))
            man = json.loads(json.dumps(pristine_man))
            man.pop("checksum")
            recs = [man["codec"]] + [r for s in man["shards"] for r in s["files"].values()]
            for rec in recs:  # fix up the checksum: only the header check stands in the way
                if rec["file"] == case["file"]:
                    rec["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
            (path / "manifest.json").write_text(json.dumps(storage.seal(man)))
            log.write(json.dumps({"case": case["id"], "status": "started"}) + "\\n")
            log.flush()
            try:
                with ShardedIndex.open(path, mmap=case["id"] % 2 == 1) as index:
                    index.search(q, 5, nprobe=4)
                status = "opened"
            except CorruptIndexError as e:
                # the edited file, or a shard whose embedded codec no longer matches it
                status = "corrupt" if Path(e.path).parent == path else f"wrong file {e.path}"
            except Exception as e:
                status = f"other {type(e).__name__}: {e}"
            target.write_bytes(raw)
            log.write(json.dumps({"case": case["id"], "status": status}) + "\\n")
            log.flush()
    """
)


def _header_fields(layout: faiss_format.IVFPQLayout) -> list[tuple[str, int, int]]:
    """(name, offset, width) of the integer fields of an IwPQ / IwPf header."""
    f = [("d", 4, 4), ("ntotal", 8, 8), ("is_trained", 32, 1), ("metric", 33, 4)]
    f += [("nlist", 37, 8), ("nprobe", 45, 8), ("quantizer.kind", 53, 4), ("quantizer.d", 57, 4)]
    f += [("quantizer.ntotal", 61, 8), ("quantizer.metric", 86, 4), ("quantizer.count", 90, 8)]
    after_q = layout.centroids_off + 4 * layout.quantizer_d * layout.quantizer_ntotal
    f += [("direct_map.type", after_q, 1), ("direct_map.size", after_q + 1, 8)]
    f += [("by_residual", after_q + 9, 1), ("code_size", after_q + 10, 8)]
    pq = layout.pq_off - 32
    f += [("pq.d", pq, 8), ("pq.M", pq + 8, 8), ("pq.nbits", pq + 16, 8), ("pq.count", pq + 24, 8)]
    lo = layout.lists_off
    f += [("lists.kind", lo, 4), ("lists.nlist", lo + 4, 8), ("lists.code_size", lo + 12, 8)]
    if layout.nbits == 8:
        f += [("lists.type", lo + 20, 4), ("lists.count", lo + 24, 8), ("lists.size0", lo + 32, 8)]
    else:
        fs = after_q + 18
        f += [("fastscan.bbs", fs, 4), ("fastscan.M2", fs + 4, 8), ("fastscan.implem", fs + 12, 4)]
        f += [("fastscan.qbs2", fs + 16, 8), ("lists.per_block", lo + 20, 8)]
        f += [("lists.block_size", lo + 28, 8), ("lists.n0", lo + 36, 8)]
    return f


@pytest.mark.parametrize("nbits", [8, 4])
def test_faiss_header_fuzz_never_kills_the_process(tmp_path, small_data, codec32, nbits) -> None:
    from fastface import Codec, IVFPQParams

    xb = small_data[0]
    src = tmp_path / "src"
    codec = codec32 if nbits == 8 else Codec.train(IVFPQParams(32, 8, 8, nbits=4), xb)
    with ShardedIndex.create(src, codec, shard_size=600) as index:
        index.add(xb[:1000])
    man = json.loads((src / "manifest.json").read_text())
    files = [man["codec"]["file"], man["shards"][0]["files"]["index"]["file"]]
    rng = np.random.default_rng(nbits)
    cases = []
    values = [0, 1, 255, 2**31 - 1, 2**64 - 1]
    for name in files:
        raw = (src / name).read_bytes()
        layout = faiss_format.parse(raw, name)
        for fld, off, width in _header_fields(layout):
            for v in [*values, int.from_bytes(raw[off : off + width], "little") + 1]:
                v &= (1 << (8 * width)) - 1
                cases.append((name, off, list(v.to_bytes(width, "little")), fld))
        for _ in range(40):  # random bytes anywhere in the header, and anywhere at all
            off = int(rng.integers(0, layout.lists_off + 64))
            cases.append((name, off, [int(rng.integers(256))], "random header"))
            off = int(rng.integers(0, len(raw)))
            cases.append((name, off, [int(rng.integers(256))], "random"))
    lines = [
        json.dumps({"id": i, "file": f, "offset": o, "bytes": b, "field": fld})
        for i, (f, o, b, fld) in enumerate(cases)
    ]
    (tmp_path / "cases.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", _FUZZ_CHILD, str(src), str(tmp_path / "cases.jsonl"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    last = log[-1] if log else None
    assert proc.returncode == 0, (
        f"child died ({proc.returncode}) at {cases[last['case']] if last else None}: "
        f"{proc.stderr[-3000:]}"
    )
    status = {e["case"]: e["status"] for e in log}
    assert len(status) == len(cases)
    bad = [(cases[i], s) for i, s in status.items() if s not in ("opened", "corrupt")]
    assert not bad, bad[:5]
    # the field edits that must be refused are refused: d = 0, a huge list size...
    refused = {cases[i][3] for i, s in status.items() if s == "corrupt"}
    assert {"d", "nlist", "pq.M", "lists.kind", "code_size"} <= refused
    d_zero = [i for i, c in enumerate(cases) if c[3] == "d" and c[2] == [0, 0, 0, 0]]
    assert all(status[i] == "corrupt" for i in d_zero)


def test_files_are_owner_only(tmp_path, small_data, codec32) -> None:
    old_umask = os.umask(0o022)  # a permissive umask must not leak into the files
    try:
        path = tmp_path / "own"
        with ShardedIndex.create(path, codec32, shard_size=300) as index:
            index.add(small_data[0][:500])
            index.remove([1])
        assert os.umask(0o022) == 0o022  # the library never changed it
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    for p in path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p.name
    shared = tmp_path / "shared"
    with ShardedIndex.create(shared, codec32, shard_size=300, file_mode=0o640) as index:
        index.add(small_data[0][:10])
    assert stat.S_IMODE(shared.stat().st_mode) == 0o750
    with ShardedIndex.open(shared, mode="a") as index:  # later commits keep the choice
        index.add(small_data[0][10:20])
    assert {stat.S_IMODE(p.stat().st_mode) for p in shared.iterdir()} == {0o640}
    with pytest.raises(ValueError, match="file_mode"):
        ShardedIndex.create(tmp_path / "x", codec32, file_mode=0o044)


def test_planted_symlink_at_a_temporary_name_is_not_followed(tmp_path, monkeypatch) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "data.bin"
    monkeypatch.setattr(storage.secrets, "token_hex", lambda n: "0" * (2 * n))  # predictable
    planted = tmp_path / f".data.bin.tmp-{'0' * 16}"
    planted.symlink_to(victim)
    with pytest.raises(FileExistsError):
        storage.atomic_write(target, [b"new"], mode=0o600)
    assert victim.read_text() == "precious" and not target.exists()
    assert planted.is_symlink()  # left alone, not followed, not replaced
    monkeypatch.undo()
    rec = storage.atomic_write(target, [b"new"], mode=0o600)  # unpredictable names: fine
    assert rec["bytes"] == 3 and victim.read_text() == "precious"


def test_symlinked_files_in_an_index_are_refused(tmp_path, small_index) -> None:
    man = json.loads((small_index / "manifest.json").read_text())
    name = man["shards"][0]["files"]["ids"]["file"]
    real = tmp_path / "elsewhere.npy"
    shutil.move(small_index / name, real)
    (small_index / name).symlink_to(real)
    with pytest.raises(CorruptIndexError, match="cannot be opened") as e:
        ShardedIndex.open(small_index)
    assert e.value.path == str(small_index / name)
    (small_index / ".lock").unlink()
    (small_index / ".lock").symlink_to(tmp_path / "victim")
    with pytest.raises(CorruptIndexError, match="symbolic link"):
        ShardedIndex.open(small_index, mode="a")
    assert not (tmp_path / "victim").exists()


def test_unsealed_format_1_manifest_opens_but_deletes_nothing(small_index, small_data) -> None:
    """Indexes written before manifests were sealed still open; leftovers stay until a commit
    writes a sealed manifest."""
    man = json.loads((small_index / "manifest.json").read_text())
    for key in ("checksum", "next_id"):
        man.pop(key)
    man["format_version"] = 1
    (small_index / "manifest.json").write_text(json.dumps(man))
    stray = small_index / "shard-000009-g000001.npy"  # looks like ours, referenced by nothing
    stray.write_bytes(b"x")
    with ShardedIndex.open(small_index, mode="a") as index:
        n = index.ntotal
        assert stray.exists()
        index.add(small_data[0][:3])
    assert not stray.exists()
    again = json.loads((small_index / "manifest.json").read_text())
    assert again["format_version"] == 2 and again["checksum"].startswith("sha256:")
    with ShardedIndex.open(small_index) as index:
        assert index.ntotal == n + 3
