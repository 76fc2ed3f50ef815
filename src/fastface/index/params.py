"""Codec parameters, index specs, and the trained codec that every shard of an index shares.

Two kinds of codec:

- :class:`IVFPQParams`: inverted lists of product-quantized codes. The coarse
  quantizer is flat (every query is compared with every centroid), an HNSW
  graph over the centroids (``coarse_hnsw``: large ``nlist``, 2**14 lists and
  more), or a two-level IVF over the centroids (``coarse_ivf``: the largest
  ``nlist``, measured at 262,144 lists); an optional OPQ rotation (``opq``) is
  applied before everything else.
- :class:`FlatParams`: no codes at all; the shards keep ids and raw vectors
  and are searched exactly. For small galleries (no training; re-encode to
  IVF-PQ later with :meth:`ShardedIndex.reencode <fastface.ShardedIndex.reencode>`).

An **index spec** names a whole codec in one string (:func:`parse_spec`,
``params.spec``), in a grammar close to FAISS's factory strings::

    spec     := "Flat" ["," storage]
              | [rotation ","] coarse "," codes ["," storage]
    rotation := "OPQ" M                 OPQ rotation trained for M sub-quantizers
    coarse   := "IVF" nlist             flat coarse quantizer
              | "IVF" nlist "_HNSW" m   HNSW graph (m links per node) over the centroids
              | "IVF" nlist "_IVF" top  two levels: the centroids grouped under top
                                        centroids (FAISS: IVF<nlist>(IVF<top>,Flat))
    codes    := "PQ" M                  M codes of 8 bits (the native scan)
              | "PQ" M "x8"
              | "PQ" M "x4fs"           M codes of 4 bits, FAISS's fast-scan layout
    storage  := "F16" | "F32"           raw vectors kept for exact re-ranking

Without a storage token an IVF-PQ index keeps only its codes (as FAISS's
``IndexIVFPQ``); ``Flat`` keeps float32 vectors unless ``F16`` is given.
The metric is not part of the spec (``metric="ip"`` or ``"l2"``, as FAISS's
factory takes it separately).

:class:`Codec` is a trained codec: the rotation, the coarse centroids (and
their HNSW graph or top level), the PQ codebooks, and the operations that depend only on
them (coarse assignment, encoding). A codec never changes once trained, so
one object is shared, read-only, by every shard and every thread.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import KW_ONLY, dataclass
from typing import Any, Literal, TypeAlias

import faiss
import numpy as np
import numpy.typing as npt

from .._validation import check_positive_int

__all__ = [
    "STORE_DTYPES",
    "Codec",
    "CodecParams",
    "FlatParams",
    "IVFPQParams",
    "SpecError",
    "params_from_dict",
    "parse_spec",
]

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
STORE_DTYPES: dict[str, type] = {"float16": np.float16, "float32": np.float32}
_STORE_TOKENS = {"F16": "float16", "F32": "float32"}
_TOKEN_OF_STORE = {v: k for k, v in _STORE_TOKENS.items()}
#: HNSW links per node accepted for the coarse quantizer.
HNSW_M_RANGE = (4, 256)
#: Largest number of inverted lists (the FAISS header check accepts up to 2**26).
MAX_NLIST = 1 << 24


def _check_metric(metric: Any) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")


def _check_store(store: Any, allowed_none: bool = True) -> None:
    if store is None and allowed_none:
        return
    if store not in STORE_DTYPES:
        choices = "'float16', 'float32'" + (" or None" if allowed_none else "")
        raise ValueError(f"store_vectors must be {choices}, got {store!r}")


def _divisors(d: int) -> str:
    return ", ".join(str(m) for m in range(1, d + 1) if d % m == 0)


@dataclass(frozen=True)
class IVFPQParams:
    """Parameters of an IVF-PQ codec.

    Parameters
    ----------
    d : int
        Vector dimension.
    nlist : int
        Number of inverted lists (coarse k-means centroids).
    M : int
        Number of PQ sub-quantizers; must divide ``d``.
    nbits : {8, 4}
        Bits per sub-quantizer code; 4 selects FAISS's fast-scan layout.
    metric : {"ip", "l2"}
        Inner product (the face metric, on unit vectors) or squared L2.
    store_vectors : {"float16", "float32", None}
        Keep the raw vectors beside the codes, in this precision, for exact
        re-ranking (``search(..., rerank=f)``) and :func:`fastface.dedup`.
        ``None`` keeps only the PQ codes, like a plain FAISS ``IndexIVFPQ``.
        A record written before this option existed reads as ``None``.
    coarse_hnsw : int or None
        Links per node of an HNSW graph over the coarse centroids (FAISS's
        ``IVF65536_HNSW32``); ``None`` compares queries with every centroid.
        Use it for large ``nlist`` (2**14 and up): assignment then costs
        O(log nlist) instead of O(nlist).
    coarse_ivf : int or None
        Lists of a small IVF index over the coarse centroids: a two-level
        quantizer (FAISS's ``IVF262144(IVF4096,Flat)``, written
        ``IVF262144_IVF4096`` in a spec). The centroids are grouped under
        ``coarse_ivf`` top centroids (k-means over the centroids); a vector
        is added to its nearest centroid among the groups of its
        :data:`NEST_PROBE_ADD` nearest top centroids, and a query probes the
        best lists among the groups of its :func:`nest_probe` nearest ones.
        Exact within those groups, so adds and queries agree on where a
        vector lies: at 262,144 lists over 100M vectors it covers the true
        neighbours far better than an HNSW walk at the same cost (see
        ``docs/scaling.md``). Excludes ``coarse_hnsw``; needs
        ``2 <= coarse_ivf < nlist``.
    opq : int or None
        Train an OPQ rotation for this many sub-quantizers (usually ``M``) and
        rotate every vector and query with it first (FAISS's ``OPQ32,...``).
    soar_lambda : float or None
        Spilled assignment (SOAR): every vector is also stored in a second
        list, chosen among its nearest lists to minimise
        ``|r'|^2 + soar_lambda * <r', r / |r|>^2`` (``r``, ``r'``: its
        residuals to the first and the second list's centroid, in the codec's
        rotated space with OPQ), so that the second residual is nearly
        orthogonal to the first: a query whose nearest lists miss a
        neighbour's first list tends to find its second. Fewer lists are
        probed for the same recall, at the cost of twice the list entries
        (codes and ids); raw vectors are stored once. A search returns each
        id once, with the better score of its two entries. ``None``
        (default): one list per vector, as FAISS. Needs ``nlist >= 2`` and
        8-bit codes (fastface's own scan; FAISS's fast-scan lists cannot hold
        a vector twice).

    Examples
    --------
    >>> IVFPQParams(512, 1024, 64).nbits
    8
    >>> IVFPQParams(512, 1024, 60)
    Traceback (most recent call last):
    ...
    ValueError: M=60 must divide d=512; pick one of 1, 2, 4, 8, 16, 32, 64, 128, 256, 512
    >>> IVFPQParams.from_spec("OPQ16,IVF4096_HNSW32,PQ16,F16", 128).spec
    'OPQ16,IVF4096_HNSW32,PQ16,F16'
    """

    d: int
    nlist: int
    M: int
    _: KW_ONLY
    nbits: int = 8
    metric: Literal["ip", "l2"] = "ip"
    store_vectors: Literal["float16", "float32"] | None = "float16"
    coarse_hnsw: int | None = None
    coarse_ivf: int | None = None
    opq: int | None = None
    soar_lambda: float | None = None

    def __post_init__(self) -> None:
        check_positive_int(self.d, "d")
        check_positive_int(self.nlist, "nlist")
        check_positive_int(self.M, "M")
        if self.nlist > MAX_NLIST:
            raise ValueError(f"nlist={self.nlist} exceeds {MAX_NLIST}; use fewer lists")
        if self.d % self.M:
            raise ValueError(f"M={self.M} must divide d={self.d}; pick one of {_divisors(self.d)}")
        if isinstance(self.nbits, bool) or self.nbits not in (4, 8):
            raise ValueError(f"nbits must be 8 or 4 (fast-scan), got {self.nbits!r}")
        _check_metric(self.metric)
        _check_store(self.store_vectors)
        if self.coarse_hnsw is not None:
            check_positive_int(self.coarse_hnsw, "coarse_hnsw")
            lo, hi = HNSW_M_RANGE
            if not lo <= self.coarse_hnsw <= hi:
                raise ValueError(
                    f"coarse_hnsw={self.coarse_hnsw}: HNSW links per node must be in {lo}..{hi} "
                    "(32 is usual)"
                )
        if self.coarse_ivf is not None:
            check_positive_int(self.coarse_ivf, "coarse_ivf")
            if self.coarse_hnsw is not None:
                raise ValueError(
                    "coarse_ivf and coarse_hnsw: a coarse quantizer is either an HNSW graph or "
                    "a two-level IVF over the centroids, not both"
                )
            if not 2 <= self.coarse_ivf < self.nlist:
                raise ValueError(
                    f"coarse_ivf={self.coarse_ivf}: the top level must have 2..nlist-1 "
                    f"({self.nlist - 1}) lists (auto_spec uses nlist / 64)"
                )
        if self.opq is not None:
            check_positive_int(self.opq, "opq")
            if self.d % self.opq:
                raise ValueError(
                    f"opq={self.opq} must divide d={self.d}; pick one of {_divisors(self.d)}"
                )
        if self.soar_lambda is not None:
            lam = self.soar_lambda
            if isinstance(lam, bool) or not isinstance(lam, (int, float)):
                raise TypeError(
                    f"soar_lambda: expected a float >= 0 or None, got {type(lam).__name__}"
                )
            if not math.isfinite(lam) or lam < 0:
                raise ValueError(f"soar_lambda: expected a finite float >= 0, got {lam!r}")
            if self.nbits != 8:
                raise ValueError(
                    "soar_lambda: spilled assignment needs 8-bit codes (nbits=8); FAISS's "
                    "fast-scan lists (nbits=4) cannot hold a vector in two lists"
                )
            if self.nlist < 2:
                raise ValueError(
                    "soar_lambda: spilled assignment needs a second list (nlist >= 2), got "
                    f"nlist={self.nlist}"
                )
            object.__setattr__(self, "soar_lambda", float(lam))

    kind: Literal["ivfpq"] = dataclasses.field(default="ivfpq", init=False, repr=False)

    @property
    def larger_is_better(self) -> bool:
        """True for the inner product (scores), false for L2 (distances)."""
        return self.metric == "ip"

    @property
    def dsub(self) -> int:
        return self.d // self.M

    @property
    def code_size(self) -> int:
        """Bytes of one PQ code as FAISS stores it (``ceil(M * nbits / 8)``)."""
        return (self.M * self.nbits + 7) // 8

    @property
    def max_copies(self) -> int:
        """List entries per vector: 2 with spilled assignment (``soar_lambda``), else 1."""
        return 1 if self.soar_lambda is None else 2

    @property
    def pad_score(self) -> float:
        """Score of a missing result: ``-inf`` for the inner product, ``+inf`` for L2."""
        return float("-inf") if self.larger_is_better else float("inf")

    @property
    def plain(self) -> bool:
        """True when the codec is a plain FAISS ``IndexIVFPQ``: flat coarse quantizer, no OPQ."""
        return self.coarse_flat and self.opq is None

    @property
    def coarse_flat(self) -> bool:
        """True when queries are compared with every centroid (no HNSW graph, no top level)."""
        return self.coarse_hnsw is None and self.coarse_ivf is None

    @property
    def spec(self) -> str:
        """The index spec naming this codec (see the module docstring)."""
        parts = [] if self.opq is None else [f"OPQ{self.opq}"]
        coarse = f"IVF{self.nlist}"
        if self.coarse_hnsw is not None:
            coarse += f"_HNSW{self.coarse_hnsw}"
        if self.coarse_ivf is not None:
            coarse += f"_IVF{self.coarse_ivf}"
        parts.append(coarse)
        parts.append(f"PQ{self.M}" if self.nbits == 8 else f"PQ{self.M}x4fs")
        if self.store_vectors is not None:
            parts.append(_TOKEN_OF_STORE[self.store_vectors])
        return ",".join(parts)

    @classmethod
    def from_spec(cls, spec: str, d: int, *, metric: Literal["ip", "l2"] = "ip") -> IVFPQParams:
        """Parameters named by an IVF-PQ ``spec`` for dimension ``d`` (``Flat`` raises)."""
        p = parse_spec(spec, d, metric=metric)
        if not isinstance(p, IVFPQParams):
            raise SpecError(spec, 0, "Flat", "names a flat index; use FlatParams.from_spec")
        return p

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; options at their default ``None`` are left out."""
        out = dataclasses.asdict(self)
        out.pop("kind", None)
        for name in ("coarse_hnsw", "coarse_ivf", "opq", "soar_lambda"):
            if out[name] is None:
                del out[name]
        return out

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> IVFPQParams:
        """Parameters from :meth:`to_dict`; unknown keys and wrong types raise."""
        if not isinstance(obj, dict):
            raise TypeError(f"params: expected a dict, got {type(obj).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)} - {"_", "kind"}
        kw = dict(obj)
        if kw.get("kind", "ivfpq") != "ivfpq":
            raise ValueError(f"params: kind {kw['kind']!r} is not 'ivfpq'")
        kw.pop("kind", None)
        unknown = set(kw) - fields
        if unknown:
            raise ValueError(f"params: unknown field(s) {sorted(unknown)}")
        missing = {"d", "nlist", "M"} - set(kw)
        if missing:
            raise ValueError(f"params: missing field(s) {sorted(missing)}")
        kw.setdefault("store_vectors", None)  # written before vectors were stored
        for name in ("nbits", "metric", "store_vectors", "coarse_hnsw", "coarse_ivf", "opq"):
            if name in kw and kw[name] is not None and not isinstance(kw[name], (int, str)):
                raise TypeError(f"params: {name} has type {type(kw[name]).__name__}")
        lam = kw.get("soar_lambda")
        if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float))):
            raise TypeError(f"params: soar_lambda has type {type(lam).__name__}")
        for name in ("coarse_hnsw", "coarse_ivf", "opq"):
            if isinstance(kw.get(name), str):
                raise TypeError(f"params: {name} must be an integer or null")
        if not isinstance(kw.get("metric", "ip"), str):
            raise TypeError("params: metric must be a string")
        return cls(**kw)

    def new_faiss_index(self, quantizer: Any = None) -> Any:
        """An untrained FAISS IVF index with these parameters, without the OPQ rotation.

        ``IndexIVFPQ`` (8 bits) or ``IndexIVFPQFastScan`` (4 bits) over
        ``quantizer`` (default: a new flat quantizer); the index owns it.
        """
        metric = METRICS[self.metric]
        if quantizer is None:
            quantizer = (
                faiss.IndexFlatIP(self.d) if self.metric == "ip" else faiss.IndexFlatL2(self.d)
            )
        index: Any
        if self.nbits == 4:
            index = faiss.IndexIVFPQFastScan(quantizer, self.d, self.nlist, self.M, 4, metric)
        else:
            index = faiss.IndexIVFPQ(quantizer, self.d, self.nlist, self.M, 8, metric)
        index.own_fields = True
        quantizer.this.disown()
        return index


@dataclass(frozen=True)
class FlatParams:
    """Parameters of a flat (exact) index: shards hold ids and raw vectors, no codes.

    Searched exactly (every stored vector is scored, :mod:`fastface.kernels.exact`);
    needs no training. Right for small galleries (up to ~100k vectors: the cost of
    a query grows with ``n``); :meth:`ShardedIndex.reencode
    <fastface.ShardedIndex.reencode>` turns it into IVF-PQ when it grows.

    Parameters
    ----------
    d : int
        Vector dimension.
    metric : {"ip", "l2"}
        Inner product or squared L2.
    store_vectors : {"float32", "float16"}
        Precision of the stored vectors (``Flat`` / ``Flat,F16``).

    Examples
    --------
    >>> FlatParams(128).spec, FlatParams(128, store_vectors="float16").spec
    ('Flat', 'Flat,F16')
    """

    d: int
    _: KW_ONLY
    metric: Literal["ip", "l2"] = "ip"
    store_vectors: Literal["float16", "float32"] = "float32"
    kind: Literal["flat"] = dataclasses.field(default="flat", init=False, repr=False)

    def __post_init__(self) -> None:
        check_positive_int(self.d, "d")
        _check_metric(self.metric)
        _check_store(self.store_vectors, allowed_none=False)

    #: A flat index is one list holding everything: ``assign`` returns list 0.
    nlist = 1
    #: No codes: searches are exact.
    nbits = 0
    code_size = 0

    @property
    def larger_is_better(self) -> bool:
        return self.metric == "ip"

    @property
    def pad_score(self) -> float:
        return float("-inf") if self.larger_is_better else float("inf")

    @property
    def plain(self) -> bool:
        return True

    @property
    def soar_lambda(self) -> None:
        """A flat index has no lists: never spilled."""
        return None

    @property
    def max_copies(self) -> int:
        """Entries per vector: one (a flat shard stores each vector once)."""
        return 1

    @property
    def spec(self) -> str:
        return "Flat" if self.store_vectors == "float32" else "Flat,F16"

    @classmethod
    def from_spec(cls, spec: str, d: int, *, metric: Literal["ip", "l2"] = "ip") -> FlatParams:
        p = parse_spec(spec, d, metric=metric)
        if not isinstance(p, FlatParams):
            raise SpecError(spec, 0, spec.split(",")[0], "names an IVF-PQ index, not Flat")
        return p

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "flat",
            "d": self.d,
            "metric": self.metric,
            "store_vectors": self.store_vectors,
        }

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> FlatParams:
        if not isinstance(obj, dict):
            raise TypeError(f"params: expected a dict, got {type(obj).__name__}")
        if set(obj) != {"kind", "d", "metric", "store_vectors"} or obj["kind"] != "flat":
            raise ValueError(
                f"params: a flat index records kind, d, metric, store_vectors; got {sorted(obj)}"
            )
        for name in ("metric", "store_vectors"):
            if not isinstance(obj[name], str):
                raise TypeError(f"params: {name} must be a string")
        return cls(obj["d"], metric=obj["metric"], store_vectors=obj["store_vectors"])


CodecParams: TypeAlias = IVFPQParams | FlatParams


def params_from_dict(obj: Any) -> CodecParams:
    """:class:`IVFPQParams` or :class:`FlatParams` from their ``to_dict()`` (by ``kind``)."""
    if isinstance(obj, dict) and obj.get("kind") == "flat":
        return FlatParams.from_dict(obj)
    return IVFPQParams.from_dict(obj)


# --- index specs ---------------------------------------------------------------------------------


class SpecError(ValueError):
    """An index spec that cannot be parsed; names the spec, the token and why."""

    def __init__(self, spec: str, position: int, token: str, why: str) -> None:
        self.spec = spec
        self.position = position
        self.token = token
        super().__init__(f"index spec {spec!r}: token {position + 1} {token!r} {why}")


_OPQ = re.compile(r"^OPQ(\d+)$")
_IVF = re.compile(r"^IVF(\d+)(?:_HNSW(\d+)|_IVF(\d+))?$")
_PQ = re.compile(r"^PQ(\d+)(?:x(\d+))?(fs)?$")
_GRAMMAR = (
    "expected [OPQ<M>,]IVF<nlist>[_HNSW<m>|_IVF<top>],PQ<M>[x4fs][,F16|F32] or "
    "Flat[,F16|F32], "
    "e.g. 'OPQ32,IVF65536_HNSW32,PQ32,F16'"
)


def parse_spec(
    spec: str, d: int, *, metric: Literal["ip", "l2"] = "ip"
) -> IVFPQParams | FlatParams:
    """The codec parameters an index spec names, for vectors of dimension ``d``.

    Raises :class:`SpecError` (a ``ValueError``) naming the token at fault.

    Examples
    --------
    >>> parse_spec("IVF1024,PQ32x4fs,F16", 128)
    IVFPQParams(d=128, nlist=1024, M=32, nbits=4, metric='ip', store_vectors='float16', \
coarse_hnsw=None, coarse_ivf=None, opq=None, soar_lambda=None)
    >>> parse_spec("Flat,F16", 64, metric="l2")
    FlatParams(d=64, metric='l2', store_vectors='float16')
    >>> parse_spec("IVF1024,PQ30", 128)
    Traceback (most recent call last):
    ...
    fastface.index.params.SpecError: index spec 'IVF1024,PQ30': token 2 'PQ30' names 30 \
sub-quantizers, which must divide the dimension 128; pick one of 1, 2, 4, 8, 16, 32, 64, 128
    """
    if not isinstance(spec, str):
        raise TypeError(
            f"spec: expected a string such as 'IVF1024,PQ32,F16', got {type(spec).__name__}"
        )
    check_positive_int(d, "d")
    _check_metric(metric)
    tokens = [t.strip() for t in spec.split(",")]
    if not spec.strip() or any(not t for t in tokens):
        bad = next((i for i, t in enumerate(tokens) if not t), 0)
        raise SpecError(spec, bad, "", f"is empty; {_GRAMMAR}")
    pos = 0

    def fail(why: str) -> SpecError:
        return SpecError(spec, pos, tokens[pos] if pos < len(tokens) else "", why)

    def storage(default: str | None, allow_none: bool) -> str | None:
        nonlocal pos
        if pos == len(tokens):
            return default
        tok = tokens[pos]
        if tok not in _STORE_TOKENS:
            raise fail(f"is not a storage token (F16 or F32); {_GRAMMAR}")
        pos += 1
        return _STORE_TOKENS[tok]

    if tokens[0] == "Flat":
        pos = 1
        store = storage("float32", False)
        if pos != len(tokens):
            raise fail("follows the storage token; nothing may come after it")
        assert store is not None
        return FlatParams(d, metric=metric, store_vectors=store)  # type: ignore[arg-type]
    opq = None
    m = _OPQ.match(tokens[0])
    if m:
        opq = int(m.group(1))
        if opq < 1 or d % opq:
            raise fail(
                f"names {opq} sub-quantizers, which must divide the dimension {d}; "
                f"pick one of {_divisors(d)}"
            )
        pos = 1
    elif tokens[0].startswith("OPQ"):
        raise fail(
            "is not OPQ<M> (a rotation with a changed dimension, OPQ<M>_<d>, is not supported)"
        )
    if pos >= len(tokens):
        raise SpecError(spec, pos, "", f"is missing: a coarse quantizer IVF<nlist>; {_GRAMMAR}")
    m = _IVF.match(tokens[pos])
    if not m:
        hint = (
            " (use IVF<nlist>_HNSW<m> for an HNSW coarse quantizer)"
            if "HNSW" in tokens[pos]
            else ""
        )
        raise fail(f"is not a coarse quantizer IVF<nlist>[_HNSW<m>|_IVF<top>]{hint}; {_GRAMMAR}")
    nlist = int(m.group(1))
    hnsw = None if m.group(2) is None else int(m.group(2))
    top = None if m.group(3) is None else int(m.group(3))
    if not 1 <= nlist <= MAX_NLIST:
        raise fail(f"names {nlist} lists; the number must be in 1..{MAX_NLIST}")
    if hnsw is not None and not HNSW_M_RANGE[0] <= hnsw <= HNSW_M_RANGE[1]:
        raise fail(
            f"HNSW links per node must be in {HNSW_M_RANGE[0]}..{HNSW_M_RANGE[1]}, got {hnsw}"
        )
    if top is not None and not 2 <= top < nlist:
        raise fail(f"names a top level of {top} lists; it must have 2..{nlist - 1} (nlist - 1)")
    pos += 1
    if pos >= len(tokens):
        raise SpecError(spec, pos, "", f"is missing: the codes PQ<M>[x4fs]; {_GRAMMAR}")
    m = _PQ.match(tokens[pos])
    if not m:
        raise fail(f"is not PQ<M>, PQ<M>x8 or PQ<M>x4fs; {_GRAMMAR}")
    M = int(m.group(1))
    nbits = 8 if m.group(2) is None else int(m.group(2))
    fs = m.group(3) is not None
    if M < 1 or d % M:
        raise fail(
            f"names {M} sub-quantizers, which must divide the dimension {d}; "
            f"pick one of {_divisors(d)}"
        )
    if nbits not in (4, 8):
        raise fail(f"{nbits} bits per code: fastface supports 8 (PQ<M>) and 4 (PQ<M>x4fs)")
    if nbits == 4 and not fs:
        raise fail("4-bit codes are scanned in FAISS's fast-scan layout: write PQ<M>x4fs")
    if nbits == 8 and fs:
        raise fail("fast-scan codes have 4 bits: write PQ<M>x4fs, or PQ<M> for 8 bits")
    pos += 1
    store = storage(None, True)
    if pos != len(tokens):
        raise fail(f"is unexpected after the codes and storage; {_GRAMMAR}")
    return IVFPQParams(
        d,
        nlist,
        M,
        nbits=nbits,
        metric=metric,
        store_vectors=store,  # type: ignore[arg-type]
        coarse_hnsw=hnsw,
        coarse_ivf=top,
        opq=opq,
    )


# --- the trained codec ---------------------------------------------------------------------------


def _readonly(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    v = a.view()
    v.flags.writeable = False
    return v


#: HNSW search depth for coarse assignment: ``max(EF_MIN, EF_PER_PROBE * nprobe)``.
EF_MIN = 32
EF_PER_PROBE = 2
#: HNSW search depth when encoding (the one nearest list of each added vector).
EF_ADD = 64


#: Top-level lists searched when adding through a two-level coarse quantizer (``coarse_ivf``).
NEST_PROBE_ADD = 4
#: Fewest top-level lists searched for a query (more when ``nprobe`` needs more candidates).
NEST_PROBE_MIN = 16


def nest_probe(nprobe: int, nlist: int, top: int) -> int:
    """Top-level lists a query searches to find its ``nprobe`` lists (``coarse_ivf``).

    At least :data:`NEST_PROBE_MIN`, and enough that the groups searched hold
    about four times ``nprobe`` centroids; at most ``top``. Measured at
    262,144 lists under 4,096 top centroids (100M vectors): 16 covered the
    true neighbours as well as 32 or 64 at nprobe 128-256.
    """
    want = -(-4 * int(nprobe) * top // nlist)
    return max(1, min(top, max(NEST_PROBE_MIN, want)))


def hnsw_ef(nprobe: int) -> int:
    """The HNSW search depth used to find ``nprobe`` lists (``efSearch``)."""
    return max(EF_MIN, EF_PER_PROBE * int(nprobe))


def own_coarse_kernel_pays(d: int, nlist: int, nprobe: int) -> bool:
    """Whether fastface's exhaustive coarse kernel beats FAISS's flat quantizer search.

    FAISS multiplies with BLAS (about 3x faster than fastface's kernel, which adds in a
    fixed order without fused multiply-adds so that every CPU gives the same bits) and
    keeps a heap of ``nprobe`` per query; fastface selects in linear time. Measured
    (1,000 queries, 2 cores, ``bench/results/coarse-kernel.json``): the kernel is
    faster at d <= 64 for every nprobe, and at larger d once the heap dominates, i.e.
    ``nprobe >= 2 d`` and ``nprobe >= nlist / 8`` (d = 128, 2,048 lists, nprobe 512:
    17 against 39 ms). Both give the same lists up to float32 rounding at near-ties,
    equal scores by lower list.
    """
    return d <= 64 or (nprobe >= 2 * d and 8 * nprobe >= nlist)


class Codec:
    """A trained codec: rotation, coarse centroids (and graph), PQ codebooks; read-only.

    Get one from :attr:`IVFPQIndex.codec <fastface.IVFPQIndex.codec>` or
    :attr:`ShardedIndex.codec <fastface.ShardedIndex.codec>`. Every method is
    safe to call from several threads at once.

    Attributes
    ----------
    params : IVFPQParams or FlatParams
    centroids : ndarray of float32, shape (nlist, d)
        Coarse centroids (read-only), in the rotated space when the codec has
        an OPQ rotation. A flat codec has one centroid of zeros.
    pq_centroids : ndarray of float32, shape (M, 2**nbits, d // M)
        PQ codebooks (read-only); sub-vector ``m`` of a vector's residual is
        encoded as the nearest of ``pq_centroids[m]``. Empty for a flat codec.
    rotation : ndarray of float32, shape (d, d), or None
        The OPQ rotation ``R`` (read-only): a vector ``x`` is coded as ``R @ x``.
    """

    __slots__ = (
        "_bytes",
        "_cnorms",
        "_ct",
        "_faiss",
        "_ivf",
        "_pq_t",
        "_quantizer",
        "_twin_bytes",
        "centroids",
        "params",
        "pq_centroids",
        "rotation",
    )

    def __init__(self, params: CodecParams, faiss_index: Any) -> None:
        """Wrap a trained FAISS index (its lists are ignored); use :meth:`train` to make one.

        ``faiss_index``: an ``IndexFlat`` (flat params), an ``IndexIVFPQ`` /
        ``IndexIVFPQFastScan`` (flat or HNSW quantizer), or an
        ``IndexPreTransform`` of one linear transform over such an index (OPQ).
        """
        if not faiss_index.is_trained:
            raise ValueError("codec: the FAISS index is not trained")
        self.params = params
        self._pq_t: npt.NDArray[np.float32] | None = None
        self._bytes: bytes | None = None
        self._twin_bytes: bytes | None = None
        self._cnorms: npt.NDArray[np.float32] | None = None
        self._ct: npt.NDArray[np.float32] | None = None
        index: Any = faiss.clone_index(faiss_index)
        index.reset()  # a codec holds no vectors
        self._faiss: Any = index
        self.rotation: npt.NDArray[np.float32] | None = None
        self._ivf: Any = None
        self._quantizer: Any = None
        if isinstance(params, FlatParams):
            self.centroids = _readonly(np.zeros((1, params.d), np.float32))
            self.pq_centroids = _readonly(np.zeros((0, 256, 1), np.float32))
            return
        ivf: Any = index
        if params.opq is not None:
            pt: Any = faiss.downcast_index(index)
            chain: Any = pt.chain if type(pt).__name__ == "IndexPreTransform" else None
            if chain is None or chain.size() != 1:
                raise ValueError("codec: an OPQ codec is an IndexPreTransform of one rotation")
            lt: Any = faiss.downcast_VectorTransform(chain.at(0))
            A = faiss.vector_to_array(lt.A).reshape(lt.d_out, lt.d_in)
            self.rotation = _readonly(np.ascontiguousarray(A, np.float32))
            ivf = pt.index
        self._ivf = faiss.downcast_index(ivf)
        quantizer: Any = faiss.downcast_index(self._ivf.quantizer)
        if params.coarse_hnsw is not None:
            quantizer.hnsw.efSearch = EF_ADD  # what FAISS's own calls use (fast-scan adds)
        if params.coarse_ivf is not None:
            quantizer.nprobe = NEST_PROBE_ADD  # likewise
            if quantizer.direct_map.type == 0:  # a caller's FAISS index: centroids by number
                quantizer.make_direct_map()
        self._quantizer = quantizer
        if params.coarse_ivf is not None:  # the centroids live in the top level's lists
            cent = quantizer.reconstruct_n(0, params.nlist)
        else:
            storage: Any = (
                faiss.downcast_index(quantizer.storage)
                if params.coarse_hnsw is not None
                else quantizer
            )
            cent = faiss.rev_swig_ptr(storage.get_xb(), params.nlist * params.d)
        self.centroids = _readonly(
            np.ascontiguousarray(cent, np.float32).reshape(params.nlist, params.d).copy()
        )
        ksub = 1 << params.nbits
        self.pq_centroids = _readonly(
            faiss.vector_to_array(self._ivf.pq.centroids)
            .reshape(params.M, ksub, params.dsub)
            .copy()
        )

    @classmethod
    def train(
        cls,
        params: CodecParams,
        x: npt.NDArray[np.float32],
        *,
        seed: int = 0,
        progress: bool = False,
    ) -> Codec:
        """Train the codec on ``x`` (float32, checked): OPQ, coarse k-means, PQ (FAISS).

        Large ``nlist`` is trained in two levels (``sqrt(nlist)`` clusters, then
        each split in proportion to its size), so that time stays bounded; see
        :mod:`fastface.index.train`. A flat codec needs no data.
        """
        from .train import train_faiss_codec

        if isinstance(params, FlatParams):
            return cls.flat(params)
        return cls(params, train_faiss_codec(params, x, seed=seed, progress=progress))

    @classmethod
    def flat(cls, params: FlatParams) -> Codec:
        """The codec of a flat index (nothing to train)."""
        metric = METRICS[params.metric]
        return cls(params, faiss.IndexFlat(params.d, metric))

    @property
    def code_size(self) -> int:
        return self.params.code_size

    @property
    def is_flat(self) -> bool:
        return isinstance(self.params, FlatParams)

    def with_storage(self, store_vectors: Literal["float16", "float32"] | None) -> Codec:
        """This codec with another raw-vector storage option (the codec itself is shared)."""
        if isinstance(self.params, FlatParams):
            _check_store(store_vectors, allowed_none=False)
        params = dataclasses.replace(self.params, store_vectors=store_vectors)  # type: ignore[arg-type]
        return self._with_params(params)

    def with_soar(self, soar_lambda: float | None) -> Codec:
        """This codec with spilled assignment on (``soar_lambda``) or off (``None``).

        Spilling changes how vectors are added, not the codec: the centroids
        and codebooks are shared. A flat codec raises ``ValueError``.
        """
        if not isinstance(self.params, IVFPQParams):
            raise ValueError("with_soar: a flat codec has no lists to spill into")
        return self._with_params(dataclasses.replace(self.params, soar_lambda=soar_lambda))

    def _with_params(self, params: CodecParams) -> Codec:
        out = Codec.__new__(Codec)
        for name in Codec.__slots__:
            setattr(out, name, getattr(self, name))
        out.params = params
        return out

    @property
    def pq_transposed(self) -> npt.NDArray[np.float32]:
        """PQ codebooks laid out ``(M, dsub, 256)`` for the native 8-bit scan."""
        if self._pq_t is None:
            self._pq_t = _readonly(np.ascontiguousarray(self.pq_centroids.transpose(0, 2, 1)))
        return self._pq_t

    def rotate(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``x`` in the codec's space: rotated by OPQ (``x @ R.T``), else ``x`` itself."""
        if self.rotation is None:
            return x
        return np.ascontiguousarray(x @ self.rotation.T, dtype=np.float32)

    def _coarse_search(
        self, xr: npt.NDArray[np.float32], k: int, ef: int | None, *, adding: bool = False
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        q: Any = self._quantizer
        sp: Any
        if getattr(self.params, "coarse_hnsw", None) is not None:
            sp = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
            sp.efSearch = max(int(ef if ef is not None else hnsw_ef(k)), k)
            D, I = q.search(xr, k, params=sp)
        elif (top := getattr(self.params, "coarse_ivf", None)) is not None:
            sp = faiss.SearchParametersIVF()
            sp.nprobe = NEST_PROBE_ADD if adding else nest_probe(k, self.params.nlist, top)
            D, I = q.search(xr, k, params=sp)
        else:
            D, I = q.search(xr, k)
        return D, I

    def assign(
        self, x: npt.NDArray[np.float32], nprobe: int, *, ef_search: int | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """The ``nprobe`` nearest lists of each row of ``x`` (float32, C-contiguous, checked).

        Returns ``(Dq, Iq)`` shaped ``(n, nprobe)``: coarse scores (inner
        product or squared L2 to the centroid, in the rotated space) and list
        numbers, best first. With an HNSW coarse quantizer the search depth
        is ``ef_search`` (default :func:`hnsw_ef`); lists it cannot reach are
        ``-1``. With a two-level quantizer (``coarse_ivf``) the lists come from
        the groups of the :func:`nest_probe` nearest top centroids
        (``ef_search`` is ignored). A flat codec returns list 0 (score 0) for
        every query.
        """
        if self._quantizer is None:
            n = x.shape[0]
            return np.zeros((n, nprobe), np.float32), np.zeros((n, nprobe), np.int64)
        if getattr(self.params, "coarse_flat", False) and own_coarse_kernel_pays(
            self.params.d, self.params.nlist, nprobe
        ):
            return self._flat_assign(self.rotate(x), nprobe)
        Dq, Iq = self._coarse_search(self.rotate(x), nprobe, ef_search)
        return np.ascontiguousarray(Dq, np.float32), np.ascontiguousarray(Iq, np.int64)

    def _flat_assign(
        self, xr: npt.NDArray[np.float32], nprobe: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Exhaustive coarse assignment in fastface's own kernel (``csrc/coarse.h``): the
        scores FAISS's flat search computes (``|x|^2 + |c|^2 - 2 x.c`` for L2, floored at
        0), the ``nprobe`` best selected in linear time (FAISS keeps a heap of
        ``nprobe``), ties by lower list. No BLAS call: the idle threads of NumPy's BLAS
        spin for a while after each product and slow the scan that follows."""
        from .._native import coarse_topk

        if self._ct is None:
            C = self.centroids.astype(np.float64)
            l2 = self._quantizer.metric_type == faiss.METRIC_L2
            self._cnorms = (C * C).sum(1).astype(np.float32) if l2 else None
            self._ct = np.ascontiguousarray(self.centroids.T)
        return coarse_topk(xr, self._ct, nprobe, centroid_norms=self._cnorms)

    def encode(
        self, x: npt.NDArray[np.float32], lists: npt.NDArray[np.int64] | None = None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
        """List number and PQ code of each row, exactly as FAISS's ``add`` computes them.

        ``lists`` (int64, one per row, in ``0..nlist-1``) encodes each row for
        the given list instead of its nearest one (e.g. its spilled list).
        """
        if self._ivf is None:
            raise ValueError("encode: a flat codec has no codes")
        n = x.shape[0]
        given = lists
        lists = np.empty(n, np.int64)
        codes = np.empty((n, self.code_size), np.uint8)
        if n:
            xr = self.rotate(x)
            if given is not None:
                lists[:] = given
            else:
                _, assigned = self._coarse_search(xr, 1, EF_ADD, adding=True)
                lists[:] = assigned[:, 0]
            self._ivf.encode_vectors(
                n, faiss.swig_ptr(xr), faiss.swig_ptr(lists), faiss.swig_ptr(codes), False
            )
        return lists, codes

    def coarse_quantizer(self) -> Any:
        """The FAISS coarse quantizer (shared: search it, never change it)."""
        return self._quantizer

    def faiss_index(self) -> Any:
        """A new, empty FAISS index with this codec (the whole codec: OPQ and HNSW included)."""
        return faiss.clone_index(self._faiss)

    def ivf_twin(self) -> Any:
        """A new, empty ``IndexIVFPQ`` / ``IndexIVFPQFastScan`` with this codec's centroids and
        codebooks over a *flat* coarse quantizer, in the rotated space: what shard files hold.
        """
        if self._ivf is None:
            raise ValueError("ivf_twin: a flat codec has no inverted lists")
        return self.with_flat_quantizer(faiss.clone_index(self._ivf))

    def with_flat_quantizer(self, ivf: Any) -> Any:
        """``ivf`` (a copy of this codec's IVF part, owned by the caller) with its HNSW graph
        or top level replaced by a flat quantizer over the same centroids; ``ivf`` as it is
        when the codec's quantizer is already flat."""
        if self.params.coarse_flat:  # type: ignore[union-attr]
            return ivf
        flat: Any = faiss.IndexFlat(self.params.d, METRICS[self.params.metric])
        flat.add(np.ascontiguousarray(self.centroids))
        old = ivf.quantizer
        ivf.quantizer = flat
        flat.this.disown()  # ivf owns its new quantizer (own_fields below)
        if ivf.own_fields:
            old.this.own(True)  # and Python frees the HNSW / two-level copy it replaced
        ivf.own_fields = True
        return ivf

    def twin_bytes(self) -> bytes:
        """:meth:`ivf_twin` in FAISS's serialization format (an index without vectors)."""
        if self._twin_bytes is None:
            self._twin_bytes = bytes(faiss.serialize_index(self.ivf_twin()))
        return self._twin_bytes

    def to_bytes(self) -> bytes:
        """The codec in FAISS's serialization format (an index with no vectors)."""
        if self._bytes is None:
            self._bytes = bytes(faiss.serialize_index(self._faiss))
        return self._bytes

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Codec):
            return NotImplemented
        a, b = self.params, other.params
        if type(a) is not type(b):
            return False
        return (
            _without_storage(a) == _without_storage(b)
            and np.array_equal(self.centroids, other.centroids)
            and np.array_equal(self.pq_centroids, other.pq_centroids)
            and (
                (self.rotation is None and other.rotation is None)
                or (
                    self.rotation is not None
                    and other.rotation is not None
                    and np.array_equal(self.rotation, other.rotation)
                )
            )
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Codec({self.params.spec!r}, d={self.params.d}, metric={self.params.metric!r})"


def _without_storage(p: CodecParams) -> dict[str, Any]:
    out = p.to_dict()
    out.pop("store_vectors", None)
    out.pop("soar_lambda", None)  # how vectors are added, not the codec
    return out
