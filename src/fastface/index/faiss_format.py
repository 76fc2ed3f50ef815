"""FAISS's binary format for IVF-PQ indexes: parsed and checked here, before FAISS sees it.

Shard and codec files are ordinary FAISS files (``faiss.read_index`` opens
them), but fastface never hands FAISS a file it has not checked: FAISS's
readers trust sizes written in the file, and a crafted header (``d = 0``,
a list size of ``2**60``) can make them abort the process. :func:`parse`
walks the whole layout with bounds checks on every read, and
:meth:`IVFPQLayout.check` compares every header field with what the
manifest expects (dimension, metric, lists, sub-quantizers, bits, code
size, vector count). Any mismatch raises
:class:`~fastface.errors.CorruptIndexError` naming the file and the field.

8-bit shards are then scanned in place from the parsed layout (no FAISS
involved); 4-bit fast-scan shards and codecs are handed to
``faiss.deserialize_index`` only after the check.

The layout (little-endian, FAISS ``impl/index_write.cpp``) of the two kinds
fastface writes, ``IwPQ`` (``IndexIVFPQ``) and ``IwPf`` (``IndexIVFPQFastScan``)::

    fourcc | index header: d i32, ntotal i64, 2 x i64, is_trained u8, metric i32
           | nlist u64, nprobe u64
           | quantizer: IxFI|IxF2, index header, u64 n/4, n bytes of centroids
           | direct map: type u8, u64 count, count x i64
           | by_residual u8, code_size u64
           | [IwPf: bbs i32, M2 u64, implem i32, qbs2 u64]
           | PQ: d u64, M u64, nbits u64, u64 count, count x f32 codebooks
           | lists: "ilar" nlist u64, code_size u64, "full"|"sprs", u64 count,
           |        count x u64 sizes (or (list, size) pairs), then per
           |        non-empty list: codes, ids (i64)
           |     or "ilbl" nlist u64, code_size u64, per_block u64,
           |        block_size u64, then per list: u64 n, n x i64 ids,
           |        u64 nbytes, nbytes of packed codes

Codec files (``codec-g*.faiss`` of a sharded index, never holding vectors)
may add two parts that shard files never have, both checked here too:

- an OPQ rotation: the file starts with ``IxPT`` (index header, i32 chain
  length 1), then ``LTra`` (have_bias u8, A: u64 count + floats, b: u64
  count + floats, d_in i32, d_out i32, is_trained u8), then the IVF index;
- an HNSW coarse quantizer in place of the flat one: ``IHNf``, index header,
  the graph (assign_probas f64 vector, cum_nneighbor_per_level i32 vector,
  levels i32 vector, offsets u64 vector, neighbors i32 vector, entry_point,
  max_level, efConstruction, efSearch, upper_beam: i32 each), then its flat
  storage (``IxFI``/``IxF2``). Every neighbour must be a node or -1, every
  node's level and offsets must agree with the per-level neighbour counts:
  FAISS's search follows these numbers without checking them;
- or a two-level quantizer (``coarse_ivf``): ``IwFl`` (an ``IndexIVFFlat``
  over the centroids): index header, top nlist u64, nprobe u64, its flat
  quantizer of top centroids, a direct map (type 1, one ``list << 32 |
  offset`` per centroid), then ``ilar`` lists whose codes are the centroids
  (``4 d`` bytes each) and whose ids are the centroid numbers. Every
  centroid must be stored exactly once and the direct map must point at
  it: FAISS reconstructs centroids through the map without checks.

A flat index's codec file is an empty ``IxFI``/``IxF2`` (:func:`parse_flat`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import CorruptIndexError
from .params import IVFPQParams

__all__ = ["FlatLayout", "IVFPQLayout", "ilar_section", "parse", "parse_flat"]

_KINDS = {b"IwPQ": 8, b"IwPf": 4}
_QUANTIZERS = {b"IxFI": 0, b"IxF2": 1}  # fourcc -> FAISS metric
_PRETRANSFORM, _LINEAR, _HNSW_FLAT, _IVF_FLAT = b"IxPT", b"LTra", b"IHNf", b"IwFl"
_MAX_HNSW_LEVELS = 64
_ILAR, _ILBL, _FULL, _SPRS = b"ilar", b"ilbl", b"full", b"sprs"


class _Reader:
    """Bounds-checked reads from a byte buffer; every failure names the file and field."""

    def __init__(self, buf: Any, path: str) -> None:
        self.mv = memoryview(buf).cast("B")
        self.n = len(self.mv)
        self.pos = 0
        self.path = path

    def fail(self, fld: str, why: str) -> CorruptIndexError:
        return CorruptIndexError(
            f"{self.path}: bad FAISS header field {fld}: {why}", self.path, fld
        )

    def need(self, nbytes: int, fld: str) -> None:
        if nbytes < 0 or nbytes > self.n - self.pos:
            raise self.fail(
                fld, f"needs {nbytes} bytes at offset {self.pos}, the file has {self.n - self.pos}"
            )

    def i32(self, fld: str) -> int:
        return int(self.unpack("<i", fld))

    def vector(self, dtype: Any, fld: str) -> npt.NDArray[Any]:
        """A FAISS vector: u64 count, then count items (bounds-checked)."""
        dt = np.dtype(dtype)
        n = self.count(fld, dt.itemsize)
        return self.array(dt, n, fld)

    def unpack(self, fmt: str, fld: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, fld)
        (v,) = struct.unpack_from(fmt, self.mv, self.pos)
        self.pos += size
        return v

    def fourcc(self, fld: str) -> bytes:
        self.need(4, fld)
        v = bytes(self.mv[self.pos : self.pos + 4])
        self.pos += 4
        return v

    def u64(self, fld: str) -> int:
        return int(self.unpack("<Q", fld))

    def count(self, fld: str, item_size: int) -> int:
        """A vector length: the items must fit in what is left of the file."""
        n = self.u64(fld)
        if n > (self.n - self.pos) // item_size:
            raise self.fail(fld, f"{n} items of {item_size} bytes exceed the file")
        return n

    def skip(self, nbytes: int, fld: str) -> int:
        self.need(nbytes, fld)
        start = self.pos
        self.pos += nbytes
        return start

    def array(self, dtype: Any, count: int, fld: str) -> npt.NDArray[Any]:
        dt = np.dtype(dtype)
        start = self.skip(count * dt.itemsize, fld)
        return np.frombuffer(self.mv, dtype=dt, count=count, offset=start)


@dataclass
class IVFPQLayout:
    """Where everything is in a FAISS IVF-PQ file, and its header fields.

    ``codes_off`` / ``ids_off`` / ``sizes`` (8-bit files) give, for each list,
    the byte offsets of its codes and ids in the file and its entry count.
    """

    path: str
    nbits: int
    d: int
    ntotal: int
    is_trained: bool
    metric: int
    nlist: int
    nprobe: int
    quantizer_metric: int
    quantizer_d: int
    quantizer_ntotal: int
    centroids_off: int
    by_residual: bool
    code_size: int
    pq_d: int
    pq_M: int
    pq_nbits: int
    pq_off: int
    lists_off: int  # where the inverted-lists section starts
    sizes: npt.NDArray[np.int64]
    codes_off: npt.NDArray[np.int64] = field(repr=False)
    ids_off: npt.NDArray[np.int64] = field(repr=False)
    size: int = 0  # file length
    fastscan: dict[str, int] = field(default_factory=dict)
    #: OPQ rotation of a codec file: d_in, d_out, have_bias, A_off (byte offset of A)
    transform: dict[str, int] | None = None
    #: HNSW coarse quantizer of a codec file: M (links per node above level 0), levels, ntotal
    hnsw: dict[str, int] | None = None
    #: two-level quantizer of a codec file: top (lists), nprobe, byte offsets of the top
    #: centroids, the direct map and each list's centroids, list sizes
    nested: dict[str, Any] | None = None

    def _fail(self, fld: str, got: Any, want: Any) -> CorruptIndexError:
        return CorruptIndexError(
            f"{self.path}: FAISS header field {fld} is {got}, expected {want}", self.path, fld
        )

    def check(self, params: IVFPQParams, *, ntotal: int | None = None, buf: Any = None) -> None:
        """Compare every header field with ``params`` (and the manifest's count ``ntotal``).

        With ``buf`` (the file's bytes) the centroids must also be finite.
        """
        metric = 0 if params.metric == "ip" else 1
        want: list[tuple[str, Any, Any]] = [
            ("kind.nbits", self.nbits, params.nbits),
            ("d", self.d, params.d),
            ("is_trained", self.is_trained, True),
            ("metric", self.metric, metric),
            ("nlist", self.nlist, params.nlist),
            ("quantizer.metric", self.quantizer_metric, metric),
            ("quantizer.d", self.quantizer_d, params.d),
            ("quantizer.ntotal", self.quantizer_ntotal, params.nlist),
            # fastface's 8-bit codec encodes residuals; FAISS's fast-scan defaults to raw vectors
            ("by_residual", self.by_residual, params.nbits == 8),
            ("code_size", self.code_size, params.code_size),
            ("pq.d", self.pq_d, params.d),
            ("pq.M", self.pq_M, params.M),
            ("pq.nbits", self.pq_nbits, params.nbits),
            ("lists.total", int(self.sizes.sum()), self.ntotal),
        ]
        if ntotal is not None:
            want.append(("ntotal", self.ntotal, ntotal))
        opq = getattr(params, "opq", None)
        hnsw_m = getattr(params, "coarse_hnsw", None)
        top = getattr(params, "coarse_ivf", None)
        want.append(("opq", self.transform is not None, opq is not None))
        want.append(("quantizer.hnsw", self.hnsw is not None, hnsw_m is not None))
        want.append(("quantizer.ivf", self.nested is not None, top is not None))
        if self.nested is not None:
            want.append(("quantizer.ivf.nlist", self.nested["top"], top))
        if self.transform is not None:
            want += [
                ("opq.d_in", self.transform["d_in"], params.d),
                ("opq.d_out", self.transform["d_out"], params.d),
                ("opq.have_bias", self.transform["have_bias"], 0),
            ]
        if self.hnsw is not None:
            want += [
                ("quantizer.hnsw.M", self.hnsw["M"], hnsw_m),
                ("quantizer.hnsw.ntotal", self.hnsw["ntotal"], params.nlist),
            ]
        for fld, got, expected in want:
            if got != expected:
                raise self._fail(fld, got, expected)
        if not 1 <= self.nprobe <= max(params.nlist, 1):
            raise self._fail("nprobe", self.nprobe, f"1..{params.nlist}")
        if self.nbits == 4:  # what fastface's fast-scan indexes hold (FAISS's defaults)
            for fld, want_v in (("bbs", 32), ("implem", 0), ("qbs2", 0)):
                if self.fastscan.get(fld) != want_v:
                    raise self._fail(f"fastscan.{fld}", self.fastscan.get(fld), want_v)
        if self.nested is not None and not 1 <= self.nested["nprobe"] <= self.nested["top"]:
            raise self._fail("quantizer.ivf.nprobe", self.nested["nprobe"], f"1..{top}")
        if buf is not None:
            checks = [("pq.centroids", self.pq_off, self.pq_d << self.pq_nbits)]
            if self.nested is None:
                checks.append(
                    (
                        "quantizer.centroids",
                        self.centroids_off,
                        self.quantizer_d * self.quantizer_ntotal,
                    )
                )
            else:  # the centroids are the top level's lists, one contiguous run per list
                nested = self.nested
                checks.append(
                    ("quantizer.ivf.centroids", nested["top_off"], nested["top"] * self.d)
                )
                for off, size in zip(nested["codes_off"], nested["sizes"], strict=True):
                    if size:
                        checks.append(("quantizer.centroids", int(off), int(size) * self.d))
            if self.transform is not None:
                checks.append(("opq.A", self.transform["A_off"], params.d * params.d))
            for fld, off, count in checks:
                vals = np.frombuffer(buf, np.float32, count, off)
                if not np.isfinite(vals).all():
                    raise self._fail(fld, "not finite", "finite floats")


def _index_header(r: _Reader, prefix: str) -> tuple[int, int, bool, int]:
    d = r.unpack("<i", f"{prefix}d")
    ntotal = r.unpack("<q", f"{prefix}ntotal")
    r.skip(16, f"{prefix}reserved")
    is_trained = r.unpack("<B", f"{prefix}is_trained")
    metric = r.unpack("<i", f"{prefix}metric")
    if d <= 0 or d > 1 << 16:
        raise r.fail(f"{prefix}d", f"{d} is not a dimension (1..65536)")
    if ntotal < 0:
        raise r.fail(f"{prefix}ntotal", f"negative count {ntotal}")
    if is_trained not in (0, 1):
        raise r.fail(f"{prefix}is_trained", f"{is_trained} is not a bool")
    if metric not in (0, 1):
        raise r.fail(f"{prefix}metric", f"{metric} is neither inner product (0) nor L2 (1)")
    return d, ntotal, bool(is_trained), metric


def parse(buf: Any, path: str) -> IVFPQLayout:
    """Walk an ``IwPQ`` / ``IwPf`` file held in ``buf`` (bytes, mmap, uint8 array).

    Checks the structure (every length fits the file, the file ends where the
    last list ends, sizes are consistent); :meth:`IVFPQLayout.check` then
    checks the values against the expected parameters.
    """
    r = _Reader(buf, path)
    kind = r.fourcc("kind")
    transform = None
    if kind == _PRETRANSFORM:
        transform = _parse_pretransform(r)
        kind = r.fourcc("kind")
    if kind not in _KINDS:
        raise r.fail("kind", f"{kind!r} is not an IVF-PQ index written by fastface (IwPQ/IwPf)")
    nbits = _KINDS[kind]
    d, ntotal, is_trained, metric = _index_header(r, "")
    if transform is not None:
        if transform["d_out"] != d or transform["outer_d"] != d:
            raise r.fail("opq.d_out", f"{transform['d_out']} does not match the index's d={d}")
        if transform["outer_ntotal"] != ntotal:
            raise r.fail("ntotal", "the rotation's header and the index disagree on ntotal")
    nlist = r.u64("nlist")
    if not 1 <= nlist <= 1 << 26:
        raise r.fail("nlist", f"{nlist} is out of range (1..2**26)")
    nprobe = r.u64("nprobe")
    qkind = r.fourcc("quantizer.kind")
    hnsw = None
    nested = None
    if qkind == _IVF_FLAT:
        nested = _parse_nested(r)
        qd, qn, qmetric = nested["d"], nested["ntotal"], nested["metric"]
        centroids_off = -1
    elif qkind == _HNSW_FLAT:
        hnsw = _parse_hnsw(r)
        qkind = r.fourcc("quantizer.storage.kind")
        if qkind not in _QUANTIZERS:
            raise r.fail("quantizer.storage.kind", f"{qkind!r} is not a flat storage (IxFI/IxF2)")
    elif qkind not in _QUANTIZERS:
        raise r.fail("quantizer.kind", f"{qkind!r} is not a flat, HNSW or two-level quantizer")
    if nested is None:
        qd, qn, centroids_off, qmetric = _parse_flat_quantizer(r, qkind, "quantizer.")
    if hnsw is not None and (qn != hnsw["ntotal"] or qd != hnsw["d"] or qmetric != hnsw["metric"]):
        raise r.fail("quantizer.hnsw", "the graph and its storage disagree on d, size or metric")
    dm_type = r.unpack("<B", "direct_map.type")
    if dm_type != 0:
        raise r.fail("direct_map.type", f"{dm_type} (fastface writes no direct map)")
    dm_n = r.count("direct_map.size", 8)
    if dm_n:
        raise r.fail("direct_map.size", f"{dm_n} entries (fastface writes none)")
    by_residual = r.unpack("<B", "by_residual")
    if by_residual not in (0, 1):
        raise r.fail("by_residual", f"{by_residual} is not a bool")
    code_size = r.u64("code_size")
    fastscan: dict[str, int] = {}
    if nbits == 4:
        fastscan["bbs"] = r.unpack("<i", "fastscan.bbs")
        fastscan["M2"] = r.u64("fastscan.M2")
        fastscan["implem"] = r.unpack("<i", "fastscan.implem")
        fastscan["qbs2"] = r.u64("fastscan.qbs2")
    pq_d = r.u64("pq.d")
    pq_M = r.u64("pq.M")
    pq_nbits = r.u64("pq.nbits")
    if pq_d != d or pq_M < 1 or pq_M > d or d % pq_M or pq_nbits != nbits:
        raise r.fail("pq", f"d={pq_d}, M={pq_M}, nbits={pq_nbits} do not fit d={d}, {nbits} bits")
    pq_n = r.count("pq.centroids", 4)
    if pq_n != pq_d * (1 << pq_nbits):
        raise r.fail("pq.centroids", f"{pq_n} floats, expected d x 2**nbits = {pq_d << pq_nbits}")
    pq_off = r.skip(4 * pq_n, "pq.centroids")
    lists_off = r.pos
    lkind = r.fourcc("lists.kind")
    if lkind == _ILAR and nbits == 8:
        sizes, codes_off, ids_off = _parse_ilar(r, nlist, code_size)
    elif lkind == _ILBL and nbits == 4:
        sizes, codes_off, ids_off = _parse_ilbl(r, nlist, fastscan, pq_M, code_size)
    else:
        raise r.fail("lists.kind", f"{lkind!r} is not the list layout of a {nbits}-bit index")
    if r.pos != r.n:
        raise r.fail("size", f"{r.n - r.pos} trailing bytes after the last list")
    return IVFPQLayout(
        path=path,
        nbits=nbits,
        d=d,
        ntotal=ntotal,
        is_trained=is_trained,
        metric=metric,
        nlist=nlist,
        nprobe=nprobe,
        quantizer_metric=qmetric,
        quantizer_d=qd,
        quantizer_ntotal=qn,
        centroids_off=centroids_off,
        by_residual=bool(by_residual),
        code_size=code_size,
        pq_d=pq_d,
        pq_M=pq_M,
        pq_nbits=pq_nbits,
        pq_off=pq_off,
        lists_off=lists_off,
        sizes=sizes,
        codes_off=codes_off,
        ids_off=ids_off,
        size=r.n,
        fastscan=fastscan,
        transform=transform,
        hnsw=hnsw,
        nested=nested,
    )


def _parse_flat_quantizer(r: _Reader, qkind: bytes, prefix: str) -> tuple[int, int, int, int]:
    """A flat quantizer after its fourcc: ``(d, ntotal, offset of the vectors, metric)``."""
    qd, qn, _, qmetric = _index_header(r, prefix)
    if _QUANTIZERS[qkind] != qmetric:
        raise r.fail(f"{prefix}metric", f"{qmetric} disagrees with its kind {qkind!r}")
    words = r.count(f"{prefix}centroids", 4)
    if words != qd * qn:
        raise r.fail(f"{prefix}centroids", f"{words} floats, expected {qd} x {qn}")
    return qd, qn, r.skip(4 * words, f"{prefix}centroids"), qmetric


def _parse_nested(r: _Reader) -> dict[str, Any]:
    """``IwFl``: the two-level quantizer, every number FAISS follows when searching it or
    reconstructing a centroid checked (the lists hold each centroid once, the map finds it)."""
    p = "quantizer.ivf."
    d, n, is_trained, metric = _index_header(r, p)
    if not is_trained:
        raise r.fail(f"{p}is_trained", "an untrained top level")
    top = r.u64(f"{p}nlist")
    if not 1 <= top <= 1 << 26:
        raise r.fail(f"{p}nlist", f"{top} is out of range (1..2**26)")
    nprobe = r.u64(f"{p}nprobe")
    qkind = r.fourcc(f"{p}quantizer.kind")
    if qkind not in _QUANTIZERS:
        raise r.fail(f"{p}quantizer.kind", f"{qkind!r} is not a flat quantizer (IxFI/IxF2)")
    td, tn, top_off, tmetric = _parse_flat_quantizer(r, qkind, f"{p}quantizer.")
    if td != d or tn != top or tmetric != metric:
        raise r.fail(f"{p}quantizer", f"{tn} x {td} centroids do not fit {top} lists of d={d}")
    dm_type = r.unpack("<B", f"{p}direct_map.type")
    if dm_type != 1:
        raise r.fail(f"{p}direct_map.type", f"{dm_type}, expected 1 (an array)")
    dmap_off = r.pos + 8  # past the count
    dmap = r.vector("<i8", f"{p}direct_map")
    if dmap.size != n:
        raise r.fail(f"{p}direct_map", f"{dmap.size} entries for {n} centroids")
    if r.fourcc(f"{p}lists.kind") != _ILAR:
        raise r.fail(f"{p}lists.kind", "not array lists (ilar)")
    sizes, codes_off, ids_off = _parse_ilar(r, top, 4 * d)
    if int(sizes.sum()) != n:
        raise r.fail(f"{p}lists.total", f"{int(sizes.sum())} centroids, the header says {n}")
    ids = np.concatenate(
        [np.frombuffer(r.mv, "<i8", int(c), int(o)) for o, c in zip(ids_off, sizes, strict=True)]
        or [np.empty(0, np.int64)]
    )
    if not np.array_equal(np.sort(ids), np.arange(n)):
        raise r.fail(f"{p}lists.ids", "the centroid numbers are not each stored once")
    where = np.empty(n, np.int64)  # list << 32 | offset of each centroid, as the map says
    owner = np.repeat(np.arange(top, dtype=np.int64), sizes)
    offset = np.arange(n, dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    where[ids] = (owner << 32) | offset
    if not np.array_equal(where, dmap):
        raise r.fail(f"{p}direct_map", "does not point at the stored centroids")
    return {
        "d": d,
        "ntotal": n,
        "metric": metric,
        "top": top,
        "nprobe": nprobe,
        "top_off": top_off,
        "direct_map_off": dmap_off,
        "sizes": sizes,
        "codes_off": codes_off,
    }


def _parse_pretransform(r: _Reader) -> dict[str, int]:
    """``IxPT`` header and its one ``LTra`` rotation; returns the transform's fields."""
    outer_d, outer_ntotal, _, _ = _index_header(r, "opq.index.")
    nt = r.i32("opq.chain")
    if nt != 1:
        raise r.fail("opq.chain", f"{nt} transforms (fastface writes one rotation)")
    lkind = r.fourcc("opq.kind")
    if lkind != _LINEAR:
        raise r.fail("opq.kind", f"{lkind!r} is not a linear transform (LTra)")
    have_bias = r.unpack("<B", "opq.have_bias")
    if have_bias not in (0, 1):
        raise r.fail("opq.have_bias", f"{have_bias} is not a bool")
    na = r.count("opq.A", 4)
    a_off = r.skip(4 * na, "opq.A")
    nb = r.count("opq.b", 4)
    r.skip(4 * nb, "opq.b")
    d_in = r.i32("opq.d_in")
    d_out = r.i32("opq.d_out")
    is_trained = r.unpack("<B", "opq.is_trained")
    if not (0 < d_in <= 1 << 16 and 0 < d_out <= 1 << 16):
        raise r.fail("opq.d_in", f"{d_in} x {d_out} is not a rotation size")
    if na != d_in * d_out or nb not in (0, d_out) or (have_bias and nb != d_out):
        raise r.fail("opq.A", f"{na} + {nb} floats do not fit {d_out} x {d_in}")
    if is_trained != 1:
        raise r.fail("opq.is_trained", f"{is_trained} (an untrained rotation)")
    if d_in != outer_d:
        raise r.fail("opq.d_in", f"{d_in} does not match the index header's d={outer_d}")
    return {
        "d_in": d_in,
        "d_out": d_out,
        "have_bias": int(have_bias),
        "A_off": a_off,
        "outer_d": outer_d,
        "outer_ntotal": outer_ntotal,
    }


def _parse_hnsw(r: _Reader) -> dict[str, int]:
    """``IHNf`` header and graph, every number FAISS's search follows checked."""
    d, n, _, metric = _index_header(r, "quantizer.hnsw.")
    probas = r.vector("<f8", "quantizer.hnsw.assign_probas")
    cum = r.vector("<i4", "quantizer.hnsw.cum_nneighbor_per_level").astype(np.int64)
    levels = r.vector("<i4", "quantizer.hnsw.levels").astype(np.int64)
    offsets = r.vector("<u8", "quantizer.hnsw.offsets")
    neighbors = r.vector("<i4", "quantizer.hnsw.neighbors")
    entry = r.i32("quantizer.hnsw.entry_point")
    max_level = r.i32("quantizer.hnsw.max_level")
    ef_c = r.i32("quantizer.hnsw.efConstruction")
    ef_s = r.i32("quantizer.hnsw.efSearch")
    r.i32("quantizer.hnsw.upper_beam")
    nlev = cum.size - 1
    if not 1 <= nlev <= _MAX_HNSW_LEVELS or probas.size != nlev or int(cum[0]) != 0:
        raise r.fail(
            "quantizer.hnsw.cum_nneighbor_per_level",
            f"{cum.size} entries do not fit {probas.size} levels",
        )
    per_level = np.diff(cum)
    if (per_level <= 0).any() or int(cum[-1]) > 1 << 16:
        raise r.fail("quantizer.hnsw.cum_nneighbor_per_level", "neighbour counts must grow")
    M = int(per_level[1]) if nlev > 1 else int(per_level[0]) // 2
    if int(per_level[0]) != 2 * M or (per_level[1:] != M).any():
        raise r.fail(
            "quantizer.hnsw.cum_nneighbor_per_level", "not the layout of HNSW<M> (2M, M, M, ...)"
        )
    if levels.size != n:
        raise r.fail("quantizer.hnsw.levels", f"{levels.size} levels for {n} nodes")
    if n and (int(levels.min()) < 1 or int(levels.max()) > nlev):
        raise r.fail("quantizer.hnsw.levels", f"a node level is outside 1..{nlev}")
    if offsets.size != n + 1 or (n and int(offsets[0]) != 0):
        raise r.fail("quantizer.hnsw.offsets", f"{offsets.size} offsets for {n} nodes")
    if n:
        steps = np.diff(offsets.astype(np.int64))
        if not np.array_equal(steps, cum[levels]):
            raise r.fail("quantizer.hnsw.offsets", "do not match the nodes' levels")
    if int(offsets[-1]) != neighbors.size:
        raise r.fail(
            "quantizer.hnsw.neighbors", f"{neighbors.size} entries, offsets say {int(offsets[-1])}"
        )
    if neighbors.size and (int(neighbors.min()) < -1 or int(neighbors.max()) >= n):
        raise r.fail("quantizer.hnsw.neighbors", f"a neighbour is outside -1..{n - 1}")
    if n == 0:
        if entry != -1:
            raise r.fail("quantizer.hnsw.entry_point", f"{entry} in an empty graph")
    elif (
        not 0 <= entry < n
        or int(levels[entry]) - 1 != max_level
        or max_level != int(levels.max()) - 1
    ):
        raise r.fail(
            "quantizer.hnsw.entry_point", f"{entry} (max_level {max_level}) is not a top node"
        )
    if ef_c <= 0 or ef_s <= 0:
        raise r.fail(
            "quantizer.hnsw.efSearch", f"efConstruction {ef_c}, efSearch {ef_s} must be > 0"
        )
    return {"M": M, "levels": nlev, "ntotal": n, "d": d, "metric": metric}


@dataclass
class FlatLayout:
    """The header of a flat index's codec file (an ``IndexFlat`` with no vectors)."""

    path: str
    d: int
    ntotal: int
    metric: int

    def check(self, params: Any, *, ntotal: int | None = 0, buf: Any = None) -> None:
        metric = 0 if params.metric == "ip" else 1
        for fld, got, want in (
            ("d", self.d, params.d),
            ("metric", self.metric, metric),
            ("ntotal", self.ntotal, 0 if ntotal is None else ntotal),
        ):
            if got != want:
                raise CorruptIndexError(
                    f"{self.path}: FAISS header field {fld} is {got}, expected {want}",
                    self.path,
                    fld,
                )


def parse_flat(buf: Any, path: str) -> FlatLayout:
    """Walk an ``IxFI`` / ``IxF2`` file (a flat index's codec: no vectors)."""
    r = _Reader(buf, path)
    kind = r.fourcc("kind")
    if kind not in _QUANTIZERS:
        raise r.fail("kind", f"{kind!r} is not a flat index (IxFI/IxF2)")
    d, n, is_trained, metric = _index_header(r, "")
    if _QUANTIZERS[kind] != metric:
        raise r.fail("metric", f"{metric} disagrees with its kind {kind!r}")
    if not is_trained:
        raise r.fail("is_trained", "a flat index is always trained")
    words = r.count("vectors", 4)
    if words != d * n:
        raise r.fail("vectors", f"{words} floats, expected {d} x {n}")
    r.skip(4 * words, "vectors")
    if r.pos != r.n:
        raise r.fail("size", f"{r.n - r.pos} trailing bytes")
    return FlatLayout(path, d, n, metric)


def _parse_ilar(
    r: _Reader, nlist: int, code_size: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    if r.u64("lists.nlist") != nlist:
        raise r.fail("lists.nlist", "disagrees with the index header's nlist")
    if r.u64("lists.code_size") != code_size or not 1 <= code_size <= 1 << 16:
        raise r.fail("lists.code_size", f"disagrees with the header's code_size {code_size}")
    ltype = r.fourcc("lists.type")
    sizes = np.zeros(nlist, np.int64)
    if ltype == _FULL:
        n = r.count("lists.sizes", 8)
        if n != nlist:
            raise r.fail("lists.sizes", f"{n} sizes for {nlist} lists")
        raw = r.array("<u8", n, "lists.sizes")
        if raw.size and int(raw.max()) > r.n:
            raise r.fail("lists.sizes", f"a list of {int(raw.max())} entries exceeds the file")
        sizes[:] = raw
    elif ltype == _SPRS:
        n = r.count("lists.sizes", 8)
        if n % 2:
            raise r.fail("lists.sizes", "sparse sizes must come in (list, size) pairs")
        raw = r.array("<u8", n, "lists.sizes").reshape(-1, 2)
        if raw.size:
            lists, counts = raw[:, 0], raw[:, 1]
            if int(lists.max()) >= nlist or (lists.size > 1 and (np.diff(lists) <= 0).any()):
                raise r.fail("lists.sizes", "sparse list numbers out of range or not ascending")
            if int(counts.max()) > r.n:
                raise r.fail(
                    "lists.sizes", f"a list of {int(counts.max())} entries exceeds the file"
                )
            sizes[lists.astype(np.int64)] = counts
    else:
        raise r.fail("lists.type", f"{ltype!r} is neither 'full' nor 'sprs'")
    per = sizes * (code_size + 8)  # each size <= file length: no overflow
    total = int(per.sum())
    start = r.skip(total, "lists.data")
    ends = np.cumsum(per)
    codes_off = start + ends - per
    ids_off = codes_off + sizes * code_size
    return sizes, codes_off.astype(np.int64), ids_off.astype(np.int64)


def _parse_ilbl(
    r: _Reader, nlist: int, fastscan: dict[str, int], M: int, code_size: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    if r.u64("lists.nlist") != nlist:
        raise r.fail("lists.nlist", "disagrees with the index header's nlist")
    cs = r.u64("lists.code_size")  # FAISS writes an invalid-size marker for block lists
    if cs not in (2**64 - 1, code_size):
        raise r.fail("lists.code_size", f"{cs} is neither the block marker nor {code_size}")
    per_block = r.u64("lists.n_per_block")
    block_size = r.u64("lists.block_size")
    bbs, M2 = fastscan["bbs"], fastscan["M2"]
    if bbs <= 0 or bbs % 32 or per_block != bbs:
        raise r.fail("lists.n_per_block", f"{per_block} (bbs {bbs}) is not a multiple of 32")
    if M2 != (M + 1) // 2 * 2 or block_size != bbs * M2 // 2:
        raise r.fail("lists.block_size", f"{block_size} does not fit bbs={bbs}, M2={M2}")
    sizes = np.zeros(nlist, np.int64)
    codes_off = np.zeros(nlist, np.int64)
    ids_off = np.zeros(nlist, np.int64)
    for lst in range(nlist):
        n = r.count(f"lists[{lst}].ids", 8)
        ids_off[lst] = r.skip(8 * n, f"lists[{lst}].ids")
        nb = r.count(f"lists[{lst}].codes", 1)
        if nb != (n + per_block - 1) // per_block * block_size:
            raise r.fail(f"lists[{lst}].codes", f"{nb} bytes for {n} codes")
        codes_off[lst] = r.skip(nb, f"lists[{lst}].codes")
        sizes[lst] = n
    return sizes, codes_off, ids_off


def ilar_section(
    nlist: int, code_size: int, sizes: npt.NDArray[np.int64]
) -> tuple[bytes, npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
    """Head of an ``ilar`` lists section as FAISS writes it, and where each list goes.

    Returns ``(head, codes_at, ids_at, total)``: the bytes up to the list
    data, each list's codes and ids offsets relative to the data start, and
    the data length. FAISS picks ``full`` sizes when more than half the lists
    are non-empty, else ``sprs`` pairs; so does this, byte for byte.
    """
    sizes = np.asarray(sizes, np.int64)
    nonempty = np.flatnonzero(sizes)
    head = [_ILAR, struct.pack("<QQ", nlist, code_size)]
    if nonempty.size > nlist // 2:
        head += [_FULL, struct.pack("<Q", nlist), sizes.astype("<u8").tobytes()]
    else:
        pairs = np.stack([nonempty, sizes[nonempty]], axis=1).astype("<u8")
        head += [_SPRS, struct.pack("<Q", pairs.size), pairs.tobytes()]
    per = sizes * (code_size + 8)
    codes_at = np.cumsum(per) - per
    ids_at = codes_at + sizes * code_size
    return b"".join(head), codes_at.astype(np.int64), ids_at.astype(np.int64), int(per.sum())


def iter_lists(layout: IVFPQLayout) -> Iterator[tuple[int, int, int, int]]:
    """``(list, count, codes_offset, ids_offset)`` of every non-empty list."""
    for lst in np.flatnonzero(layout.sizes):
        yield int(lst), int(layout.sizes[lst]), int(layout.codes_off[lst]), int(layout.ids_off[lst])
