"""Codec parameters and the trained codec that every shard of an index shares.

:class:`IVFPQParams` names a codec (dimension, lists, sub-quantizers, bits,
metric, raw-vector storage); :class:`Codec` is a trained one: the coarse
centroids, the PQ codebooks, and the operations that depend only on them
(coarse assignment, encoding). A codec never changes once trained, so one
object is shared, read-only, by every shard and every thread.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import KW_ONLY, dataclass
from typing import Any, Literal

import faiss
import numpy as np
import numpy.typing as npt

from .._validation import check_positive_int

__all__ = ["STORE_DTYPES", "Codec", "IVFPQParams"]

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
STORE_DTYPES: dict[str, type] = {"float16": np.float16, "float32": np.float32}


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
    soar_lambda : float or None
        Spilled assignment (SOAR): every vector is also stored in a second
        list, chosen among its nearest lists to minimise
        ``|r'|^2 + soar_lambda * <r', r / |r|>^2`` (``r``, ``r'``: its
        residuals to the first and the second list's centroid), so that the
        second residual is nearly orthogonal to the first: a query whose
        nearest lists miss a neighbour's first list tends to find its second.
        Fewer lists are probed for the same recall, at the cost of twice the
        list entries (codes and ids); raw vectors are stored once. A search
        returns each id once, with the better score of its two entries.
        ``None`` (default): one list per vector, as FAISS. Needs ``nlist >= 2``
        and 8-bit codes (fastface's own scan; FAISS's fast-scan lists cannot
        hold a vector twice).

    Examples
    --------
    >>> IVFPQParams(512, 1024, 64).nbits
    8
    >>> IVFPQParams(512, 1024, 60)
    Traceback (most recent call last):
    ...
    ValueError: M=60 must divide d=512; pick one of 1, 2, 4, 8, 16, 32, 64, 128, 256, 512
    """

    d: int
    nlist: int
    M: int
    _: KW_ONLY
    nbits: int = 8
    metric: Literal["ip", "l2"] = "ip"
    store_vectors: Literal["float16", "float32"] | None = "float16"
    soar_lambda: float | None = None

    def __post_init__(self) -> None:
        check_positive_int(self.d, "d")
        check_positive_int(self.nlist, "nlist")
        check_positive_int(self.M, "M")
        if self.d % self.M:
            divisors = ", ".join(str(m) for m in range(1, self.d + 1) if self.d % m == 0)
            raise ValueError(f"M={self.M} must divide d={self.d}; pick one of {divisors}")
        if isinstance(self.nbits, bool) or self.nbits not in (4, 8):
            raise ValueError(f"nbits must be 8 or 4 (fast-scan), got {self.nbits!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be 'ip' or 'l2', got {self.metric!r}")
        if self.store_vectors is not None and self.store_vectors not in STORE_DTYPES:
            raise ValueError(
                f"store_vectors must be 'float16', 'float32' or None, got {self.store_vectors!r}"
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

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["soar_lambda"] is None:  # records of indexes without spilling stay as they were
            del out["soar_lambda"]
        return out

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> IVFPQParams:
        """Parameters from :meth:`to_dict`; unknown keys and wrong types raise."""
        if not isinstance(obj, dict):
            raise TypeError(f"params: expected a dict, got {type(obj).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)} - {"_"}
        unknown = set(obj) - fields
        if unknown:
            raise ValueError(f"params: unknown field(s) {sorted(unknown)}")
        missing = {"d", "nlist", "M"} - set(obj)
        if missing:
            raise ValueError(f"params: missing field(s) {sorted(missing)}")
        kw = dict(obj)
        kw.setdefault("store_vectors", None)  # written before vectors were stored
        for name in ("nbits", "metric", "store_vectors"):
            if name in kw and kw[name] is not None and not isinstance(kw[name], (int, str)):
                raise TypeError(f"params: {name} has type {type(kw[name]).__name__}")
        lam = kw.get("soar_lambda")
        if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float))):
            raise TypeError(f"params: soar_lambda has type {type(lam).__name__}")
        if not isinstance(kw.get("metric", "ip"), str):
            raise TypeError("params: metric must be a string")
        return cls(**kw)

    def new_faiss_index(self) -> Any:
        """An untrained FAISS index with these parameters (``IndexIVFPQ`` or its fast-scan twin)."""
        metric = METRICS[self.metric]
        quantizer: Any = (
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


def _readonly(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    v = a.view()
    v.flags.writeable = False
    return v


class Codec:
    """A trained IVF-PQ codec: coarse centroids and PQ codebooks, read-only.

    Get one from :attr:`IVFPQIndex.codec <fastface.IVFPQIndex.codec>` or
    :attr:`ShardedIndex.codec <fastface.ShardedIndex.codec>`. Every method is
    safe to call from several threads at once.

    Attributes
    ----------
    params : IVFPQParams
    centroids : ndarray of float32, shape (nlist, d)
        Coarse centroids (read-only).
    pq_centroids : ndarray of float32, shape (M, 2**nbits, d // M)
        PQ codebooks (read-only); sub-vector ``m`` of a vector's residual is
        encoded as the nearest of ``pq_centroids[m]``.
    """

    __slots__ = ("_bytes", "_faiss", "_pq_t", "centroids", "params", "pq_centroids")

    def __init__(self, params: IVFPQParams, faiss_index: Any) -> None:
        """Wrap a trained FAISS index (its lists are ignored); use :meth:`train` to make one."""
        if not faiss_index.is_trained:
            raise ValueError("codec: the FAISS index is not trained")
        self.params = params
        index: Any = faiss.clone_index(faiss_index)
        index.reset()  # a codec holds no vectors
        self._faiss: Any = index
        quantizer: Any = faiss.downcast_index(index.quantizer)
        self.centroids = _readonly(
            faiss.rev_swig_ptr(quantizer.get_xb(), params.nlist * params.d)
            .reshape(params.nlist, params.d)
            .copy()
        )
        ksub = 1 << params.nbits
        self.pq_centroids = _readonly(
            faiss.vector_to_array(index.pq.centroids).reshape(params.M, ksub, params.dsub).copy()
        )
        self._pq_t: npt.NDArray[np.float32] | None = None
        self._bytes: bytes | None = None

    @classmethod
    def train(cls, params: IVFPQParams, x: npt.NDArray[np.float32], *, seed: int = 0) -> Codec:
        """Train the coarse quantizer and the PQ codebooks (FAISS k-means) on ``x``."""
        index = params.new_faiss_index()
        index.cp.seed = seed
        index.pq.cp.seed = seed
        index.train(x)
        return cls(params, index)

    @property
    def code_size(self) -> int:
        return self.params.code_size

    def with_storage(self, store_vectors: Literal["float16", "float32"] | None) -> Codec:
        """This codec with another raw-vector storage option (the codec itself is shared)."""
        return self._with_params(dataclasses.replace(self.params, store_vectors=store_vectors))

    def with_soar(self, soar_lambda: float | None) -> Codec:
        """This codec with spilled assignment on (``soar_lambda``) or off (``None``).

        Spilling changes how vectors are added, not the codec: the centroids
        and codebooks are shared.
        """
        return self._with_params(dataclasses.replace(self.params, soar_lambda=soar_lambda))

    def _with_params(self, params: IVFPQParams) -> Codec:
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

    def assign(
        self, x: npt.NDArray[np.float32], nprobe: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """The ``nprobe`` nearest lists of each row of ``x`` (float32, C-contiguous, checked).

        Returns ``(Dq, Iq)`` shaped ``(n, nprobe)``: coarse scores (inner
        product or squared L2 to the centroid) and list numbers, best first.
        """
        Dq, Iq = self._faiss.quantizer.search(x, nprobe)
        return np.ascontiguousarray(Dq, np.float32), np.ascontiguousarray(Iq, np.int64)

    def encode(
        self, x: npt.NDArray[np.float32], lists: npt.NDArray[np.int64] | None = None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
        """List number and PQ code of each row, exactly as FAISS's ``add`` computes them.

        ``lists`` (int64, one per row, in ``0..nlist-1``) encodes each row for
        the given list instead of its nearest one (e.g. its spilled list).
        """
        n = x.shape[0]
        given = lists
        lists = np.empty(n, np.int64)
        codes = np.empty((n, self.code_size), np.uint8)
        if n and given is not None:
            lists[:] = given
        elif n:
            _, assigned = self._faiss.quantizer.search(x, 1)
            lists[:] = assigned[:, 0]
        if n:
            self._faiss.encode_vectors(
                n, faiss.swig_ptr(x), faiss.swig_ptr(lists), faiss.swig_ptr(codes), False
            )
        return lists, codes

    def faiss_index(self) -> Any:
        """A new, empty FAISS index with this codec (``IndexIVFPQ`` / ``IndexIVFPQFastScan``)."""
        return faiss.clone_index(self._faiss)

    def to_bytes(self) -> bytes:
        """The codec in FAISS's serialization format (an index with no vectors)."""
        if self._bytes is None:
            self._bytes = bytes(faiss.serialize_index(self._faiss))
        return self._bytes

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Codec):
            return NotImplemented
        return (
            dataclasses.replace(self.params, store_vectors=None, soar_lambda=None)
            == dataclasses.replace(other.params, store_vectors=None, soar_lambda=None)
            and np.array_equal(self.centroids, other.centroids)
            and np.array_equal(self.pq_centroids, other.pq_centroids)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        p = self.params
        return f"Codec(d={p.d}, nlist={p.nlist}, M={p.M}, nbits={p.nbits}, metric={p.metric!r})"
