"""Choosing an index spec from the size of the data and a RAM budget (:func:`auto_spec`).

The rules, in the order they are applied (the figures behind them are in
``docs/scaling.md``):

1. **Flat** when an exact scan is cheap: ``n * d <= 2**24`` (131,072 vectors
   of 128 dimensions, 32,768 of 512): no training, exact results, and the
   index can be re-encoded later (:meth:`ShardedIndex.reencode
   <fastface.ShardedIndex.reencode>`). ``Flat,F16`` when float32 vectors
   would not fit the budget.
2. Otherwise **IVF-PQ** with ``nlist`` the power of two nearest
   ``8 * sqrt(n)`` (at least 64, at most ``n / 39`` so that k-means gets
   its 39 points per list), and an **HNSW coarse quantizer** from 16,384
   lists on (a flat one compares every query with every centroid). From
   50M vectors on, at least 262,144 lists under a **two-level quantizer**
   of ``nlist / 64`` top centroids (``IVF262144_IVF4096``): at 100M an HNSW
   walk over that many centroids put 31% of the vectors it added outside
   their nearest list, the two-level search 5%, five times faster.
3. **Codes** as large as the budget allows, up to ``min(d / 4, 64)`` bytes of
   8-bit codes per vector; a vector costs its code plus 16 bytes of ids in
   RAM (the list's and the row order's). When 8-bit codes of at least
   ``d / 16`` bytes do not fit, 4-bit fast-scan codes (``PQ<M>x4fs``, half a
   byte per sub-quantizer); when nothing fits, ``ValueError`` says how much
   is needed.
4. **OPQ** when a sub-quantizer covers 8 or more dimensions, or with 4-bit
   codes: the rotation spreads the variance over the sub-quantizers.
5. Re-rank vectors in **float16 on disk** (``F16``): exact scores for the
   candidates, read from memory-mapped files, never counted in the budget.

Search settings are returned with the spec (``nprobe``, ``rerank``) as a
starting point: on fastface's identity-clustered synthetic faces they reach
R@10 0.95 at 1M vectors (flat coarse quantizer) and at 10M (HNSW coarse
quantizer, nprobe 64) and at 100M (``IVF262144_IVF4096,PQ32,F16``: R@10
0.953 at nprobe 128, 1,725 queries per second on 2 cores; ``docs/scaling.md``).
Measure on your own data (``fastface.eval``) before relying on a recall
figure.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from .._validation import check_positive_int
from .params import CodecParams, FlatParams, IVFPQParams

__all__ = ["AutoSpec", "auto_spec", "parse_bytes"]

#: Exact search while ``n * d`` is at most this (about 2 ms per query on one core).
FLAT_MAX_WORK = 1 << 24
#: From this many lists on, the coarse quantizer is an HNSW graph.
HNSW_FROM = 1 << 14
#: From this many vectors on: ``NEST_NLIST`` lists (or more) under a two-level quantizer.
NEST_FROM_N = 50_000_000
NEST_NLIST = 1 << 18
#: Centroids per top-level list of the two-level quantizer (measured: 64 beat 128 and 256).
NEST_CHILDREN = 64
_IDS_BYTES = 16  # int64 id in the list + int64 id in row order
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(value: int | str) -> int:
    """A size in bytes from an int or a string such as ``"8G"``, ``"512MiB"``, ``"1.5GB"``.

    Units are binary (``G`` = 2**30), with or without ``B``/``iB``.

    Examples
    --------
    >>> parse_bytes("8G"), parse_bytes("512MiB"), parse_bytes(1000)
    (8589934592, 536870912, 1000)
    """
    if isinstance(value, bool):
        raise TypeError("memory_budget: expected bytes (int) or a size such as '8G', got bool")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"memory_budget: expected a positive size, got {value}")
        return value
    if not isinstance(value, str):
        raise TypeError(
            "memory_budget: expected bytes (int) or a size such as '8G', got "
            f"{type(value).__name__}"
        )
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", value)
    if not m:
        raise ValueError(f"memory_budget: {value!r} is not a size such as '8G', '512MiB', '2.5GB'")
    out = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if out <= 0:
        raise ValueError(f"memory_budget: expected a positive size, got {value!r}")
    return out


def _gib(b: float) -> str:
    return f"{b / (1 << 30):.1f} GiB" if b >= 1 << 28 else f"{b / (1 << 20):.0f} MiB"


@dataclass(frozen=True)
class AutoSpec:
    """What :func:`auto_spec` chose, and why.

    Attributes
    ----------
    spec : str
        The index spec (pass it to ``ShardedIndex.build`` or ``create``).
    params : IVFPQParams or FlatParams
        The same, as parameters.
    reason : str
        One paragraph: the sizes, the rule that picked each part, the costs.
    ram_bytes : int
        Estimated RAM of the searchable index (codes, ids, codec).
    disk_bytes : int
        Estimated size on disk (codes, ids, re-rank vectors).
    nprobe, rerank : int or None
        Search settings expected to reach ``target_recall`` (``None`` for Flat).
    """

    spec: str
    params: CodecParams
    reason: str
    ram_bytes: int
    disk_bytes: int
    nprobe: int | None
    rerank: int | None

    def __str__(self) -> str:
        return f"{self.spec}: {self.reason}"


def _pow2_near(x: float) -> int:
    return 1 << max(0, round(math.log2(max(x, 1.0))))


def auto_spec(
    n: int,
    d: int,
    *,
    memory_budget: int | str | None = None,
    target_recall: float = 0.95,
    metric: Literal["ip", "l2"] = "ip",
) -> AutoSpec:
    """Choose an index spec for ``n`` vectors of dimension ``d`` (see the module docstring).

    Parameters
    ----------
    n, d : int
        Number of vectors (expected) and their dimension.
    memory_budget : int or str, optional
        RAM the searchable index may use (``"8G"``, bytes); re-rank vectors
        stay on disk and are not counted. Default: no limit (the largest codes).
    target_recall : float
        R@10 to aim for (0 < target < 1): sets the suggested ``nprobe`` and
        ``rerank``, and above 0.98 rules out 4-bit codes while 8-bit fit.
    metric : {"ip", "l2"}

    Examples
    --------
    >>> auto_spec(10_000, 128).spec
    'Flat'
    >>> choice = auto_spec(100_000_000, 128, memory_budget="8G")
    >>> choice.spec
    'IVF262144_IVF4096,PQ32,F16'
    >>> choice.ram_bytes < 8 * 2**30
    True
    """
    n = check_positive_int(n, "n")
    d = check_positive_int(d, "d")
    if not isinstance(target_recall, (int, float)) or not 0.0 < float(target_recall) < 1.0:
        raise ValueError(f"target_recall must be in (0, 1), got {target_recall!r}")
    budget = None if memory_budget is None else parse_bytes(memory_budget)
    sizes = f"n={n:,} vectors of d={d}" + (f", RAM budget {_gib(budget)}" if budget else "")
    # 1. flat
    if n * d <= FLAT_MAX_WORK:
        f32 = n * d * 4
        store: Any = "float32" if budget is None or f32 <= budget else "float16"
        params_f = FlatParams(d, metric=metric, store_vectors=store)
        ram = n * d * (4 if store == "float32" else 2) + n * 8
        why = (
            f"{sizes}: n * d = {n * d:,} <= 2**24, so an exact scan costs at most ~2 ms per "
            f"query: Flat (no training, exact results"
            + ("" if store == "float32" else "; float16 because float32 exceeds the budget")
            + "); reencode() to IVF-PQ when it grows"
        )
        return AutoSpec(params_f.spec, params_f, why, ram, ram, None, None)
    # 2. coarse quantizer
    nlist = min(_pow2_near(8 * math.sqrt(n)), 1 << int(math.log2(max(n // 39, 64))))
    nlist = max(nlist, 64)
    top = None
    if n >= NEST_FROM_N:
        nlist = max(nlist, NEST_NLIST)
        top = nlist // NEST_CHILDREN
    hnsw = 32 if nlist >= HNSW_FROM and top is None else None
    coarse_why = f"IVF{nlist} (the power of two nearest 8 * sqrt(n) = {8 * math.sqrt(n):,.0f})" + (
        f" with an HNSW32 coarse quantizer (from {HNSW_FROM:,} lists on, a flat one costs "
        f"nlist * d = {nlist * d:,} per query)"
        if hnsw
        else ", flat coarse quantizer (nlist < 16,384)"
    )
    if top is not None:
        coarse_why = (
            f"IVF{nlist}_IVF{top} (from {NEST_FROM_N:,} vectors on: at least {NEST_NLIST:,} "
            f"lists grouped under {top:,} top centroids, searched exactly inside the nearest "
            "groups; at 100M an HNSW walk over that many centroids misplaced 31% of the "
            "vectors it added)"
        )
    codec_bytes = nlist * d * 4 * (2 if hnsw or top else 1) + (d * d * 4)
    # 3. codes
    divisors = [m for m in range(1, d + 1) if d % m == 0]
    pref = max(m for m in divisors if m <= max(1, min(d // 4, 64)))
    per_vec = None if budget is None else (budget - codec_bytes) / n
    M, nbits = pref, 8
    codes_why = f"PQ{pref} (the preferred {pref} bytes: min(d / 4, 64))"
    if per_vec is not None and pref + _IDS_BYTES > per_vec:
        fits8 = [m for m in divisors if m + _IDS_BYTES <= per_vec and m >= max(1, d // 16)]
        fits4 = [
            m
            for m in divisors
            if (m + 1) // 2 + _IDS_BYTES <= per_vec and m % 2 == 0 and m <= d // 2
        ]
        if fits8:
            M = max(fits8)
            codes_why = (
                f"PQ{M}: the largest 8-bit code that fits {per_vec:.0f} B/vector "
                f"(code + {_IDS_BYTES} B of ids)"
            )
        elif fits4 and not (target_recall > 0.98 and fits8):
            M, nbits = max(fits4), 4
            codes_why = (
                f"PQ{M}x4fs: 8-bit codes of >= d/16 bytes do not fit {per_vec:.0f} B/vector, "
                f"4-bit fast-scan codes of {M // 2} B do"
            )
        else:
            need = codec_bytes + n * (max(1, d // 32) + _IDS_BYTES)
            raise ValueError(
                f"memory_budget: {_gib(budget or 0)} cannot hold an index of {n:,} vectors of "
                f"d={d}: even the smallest codes need about {_gib(need)}; raise the budget or "
                "split the data over machines"
            )
    dsub = d // M
    opq = M if (dsub >= 8 or nbits == 4) else None
    opq_why = (
        f"OPQ{M} (a sub-quantizer covers {dsub} dimensions: the rotation balances them)"
        if opq
        else f"no OPQ ({dsub} dimensions per sub-quantizer)"
    )
    params = IVFPQParams(
        d,
        nlist,
        M,
        nbits=nbits,
        metric=metric,
        store_vectors="float16",
        coarse_hnsw=hnsw,
        coarse_ivf=top,
        opq=opq,
    )
    code = params.code_size
    ram = n * (code + _IDS_BYTES) + codec_bytes
    disk = n * (code + _IDS_BYTES + 2 * d) + 2 * codec_bytes
    if target_recall >= 0.98:
        nprobe, rerank = 64, 10
    elif target_recall >= 0.9:
        # an HNSW coarse quantizer means many lists: 10M x 128 synthetic faces on
        # IVF32768_HNSW32 measured R@10 0.951 at nprobe 64 (0.93 would need ~32)
        nprobe, rerank = (64 if hnsw else 32), 4 if nbits == 8 else 10
    else:
        nprobe, rerank = 16, 2 if nbits == 8 else 4
    if top is not None:
        # 100M x 128 synthetic faces, IVF262144_IVF4096,PQ32,F16: R@10 0.884 / 0.953 / 0.977
        # at nprobe 64 / 128 / 256 (rerank 4); the true top-10 in the probed lists 0.983 at 512
        nprobe = 512 if target_recall >= 0.98 else 128 if target_recall >= 0.9 else 64
    where = (
        "at 100M with a two-level coarse quantizer; "
        if top is not None
        else "at 10M with an HNSW coarse quantizer; "
        if hnsw
        else "at 1M; "
    )
    why = (
        f"{sizes}: {coarse_why}; {codes_why}; {opq_why}; F16 re-rank vectors on disk "
        f"({_gib(n * 2 * d)}, not counted in RAM). Index in RAM about {_gib(ram)} "
        f"({code + _IDS_BYTES} B/vector); start searching with nprobe={nprobe}, "
        f"rerank={rerank} (aimed at R@10 ~{target_recall:g}, as measured on synthetic faces "
        + where
        + "measure on your data)"
    )
    return AutoSpec(params.spec, params, why, ram, disk, nprobe, rerank)
