"""IVF-PQ search and encoding on the GPU over the codec and lists of a CPU index.

:class:`GpuIVFPQ` takes plain arrays (coarse centroids, PQ codebooks, the
codes and ids of each inverted list, removed ids, stored vectors), so it owes
nothing to how the CPU index keeps them; :func:`fastface.gpu.from_cpu` extracts
them from an ``IVFPQIndex`` or ``ShardedIndex``. No retraining: the codes are
the CPU index's codes and distances are FAISS's ``IndexIVFPQ`` distances.

Search, per batch of queries:

1. coarse assignment: one GEMM ``q @ centroids.T`` (cuBLAS through CuPy) and a
   block top-``nprobe`` per query (the selection kernel);
2. scan: one thread block per (query, split of its probes) builds the look-up
   table in shared memory (float32, or float16 with ``lut="float16"``), scans
   the lists' codes (interleaved in 32-vector blocks for coalesced loads),
   skips removed vectors by a live-bit per slot, and keeps its top-k in shared
   memory;
3. the splits' lists are merged by the selection kernel;
4. with ``rerank=f`` the ``k * f`` candidates are re-scored exactly against the
   stored vectors (Numba CUDA kernel, :mod:`fastface.gpu.rerank`).

Queries go in batches whose scratch memory stays under ``memory_budget`` bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ._arrays import kind_of, to_backend, to_kind
from ._backend import Backend, get_backend

__all__ = ["GpuIVFPQ", "encode"]

#: Default scratch budget for one batch of queries on the device (bytes).
DEFAULT_MEMORY_BUDGET = 1 << 30


def _words_per_code(M: int, nbits: int) -> int:
    return (M * nbits + 31) // 32


def interleave_lists(
    codes: Sequence[np.ndarray], ids: Sequence[np.ndarray], M: int, nbits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lists of flat codes and ids -> (words (nblocks, W, 32), slot ids, list_block (nlist + 1)).

    Each list is padded to whole blocks of 32 slots; padding slots have id -1.
    """
    W = _words_per_code(M, nbits)
    code_bytes = (M * nbits + 7) // 8
    sizes = np.array([len(i) for i in ids], np.int64)
    nblk = (sizes + 31) // 32
    list_block = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(nblk, out=list_block[1:])
    total = int(list_block[-1])
    words = np.zeros((total * 32, W * 4), np.uint8)
    slot_ids = np.full(total * 32, -1, np.int64)
    for lst, (c, i) in enumerate(zip(codes, ids, strict=True)):
        n = len(i)
        if n == 0:
            continue
        c = np.asarray(c, np.uint8).reshape(n, -1)
        if c.shape[1] != code_bytes:
            raise ValueError(
                f"codes[{lst}]: expected {code_bytes} bytes per code, got {c.shape[1]}"
            )
        s = int(list_block[lst]) * 32
        words[s : s + n, :code_bytes] = c
        slot_ids[s : s + n] = i
    w32 = words.view("<u4").reshape(total, 32, W).transpose(0, 2, 1)
    return np.ascontiguousarray(w32), slot_ids, list_block


def live_mask(slot_ids: np.ndarray, removed: np.ndarray | None) -> np.ndarray:
    """One uint32 per 32-slot block; bit ``lane`` set where the slot holds a live vector."""
    live = slot_ids >= 0
    if removed is not None and len(removed):
        live &= ~np.isin(slot_ids, removed)
    bits = live.reshape(-1, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)
    return bits.sum(axis=1).astype(np.uint32)


def _select(backend: Backend, scores: Any, ids: Any, k: int, larger: bool, stream: Any) -> Any:
    """Top-``k`` of each row (ties: lower id) by the selection kernel."""
    xp = backend.xp
    rows, n = scores.shape
    out_D = xp.empty((rows, k), np.float32)
    out_I = xp.empty((rows, k), np.int64)
    backend.native.select(
        backend.ptr(scores),
        backend.ptr(ids),
        rows,
        n,
        k,
        larger,
        backend.ptr(out_D),
        backend.ptr(out_I),
        backend.stream_ptr(stream),
    )
    return out_D, out_I


def encode(
    x: Any,
    centroids: Any,
    codebook: Any,
    *,
    metric: Literal["ip", "l2"] = "ip",
    by_residual: bool = True,
    nbits: int = 8,
    device: str = "cuda",
    batch_size: int = 1 << 18,
    stream: Any = None,
) -> tuple[Any, Any]:
    """List numbers and flat PQ codes of ``x``, computed with GEMMs on the device.

    The same codes as FAISS's CPU codec (``IndexIVFPQ.sa_encode``), ties aside:
    each vector goes to its best centroid (largest inner product, or nearest in
    L2), its residual (or the vector itself without residual encoding) to the
    nearest sub-centroid of each sub-quantizer. Returns ``(lists (n,) int64,
    codes (n, code_bytes) uint8)`` as the array kind of ``x``; 4-bit codes are
    packed two per byte, low nibble first (FAISS's flat order).
    """
    backend = get_backend(device)
    xp = backend.xp
    kind = kind_of(x)
    with backend.stream_context(stream):
        xb = to_backend(backend, x, np.float32)
        C = to_backend(backend, centroids, np.float32)
        B = to_backend(backend, codebook, np.float32)
        M, _, dsub = B.shape
        n = xb.shape[0]
        c_norm = (C * C).sum(axis=1)
        b_norm = (B * B).sum(axis=2)  # (M, ksub)
        lists = xp.empty(n, np.int64)
        code_idx = xp.empty((n, M), np.uint8)
        for s in range(0, n, batch_size):
            xs = xb[s : s + batch_size]
            dots = xs @ C.T
            lst = (
                xp.argmax(dots, axis=1) if metric == "ip" else xp.argmin(c_norm - 2 * dots, axis=1)
            )
            lists[s : s + len(xs)] = lst
            r = xs - C[lst] if by_residual else xs
            rs = r.reshape(len(xs), M, dsub).transpose(1, 0, 2)  # (M, n, dsub)
            dist = b_norm[:, None, :] - 2 * xp.matmul(rs, B.transpose(0, 2, 1))  # (M, n, ksub)
            code_idx[s : s + len(xs)] = xp.argmin(dist, axis=2).T.astype(np.uint8)
        if nbits == 4:
            pad = code_idx if M % 2 == 0 else xp.pad(code_idx, ((0, 0), (0, 1)))
            codes = (pad[:, 0::2] | (pad[:, 1::2] << 4)).astype(np.uint8)
        else:
            codes = code_idx
    return to_kind(backend, lists, kind), to_kind(backend, codes, kind)


class GpuIVFPQ:
    """An IVF-PQ index held on the device (or in the CPU emulation), searchable like the CPU one.

    Parameters
    ----------
    centroids : (nlist, d) float32
        Coarse centroids.
    codebook : (M, ksub, dsub) float32
        PQ sub-centroids (``ksub`` = 256 for 8-bit, 16 for 4-bit codes).
    list_codes, list_ids : sequences of nlist arrays
        Flat codes ``(n_l, code_bytes)`` uint8 and ids ``(n_l,)`` int64 of each
        inverted list (4-bit codes: two per byte, low nibble first).
    metric : {"ip", "l2"}
    by_residual : bool
        Whether codes encode ``x - centroid`` (FAISS's default for ``IndexIVFPQ``).
    nbits : {8, 4}
    removed : (r,) int64, optional
        Ids to skip in the scan (tombstones); :meth:`remove` adds more.
    vectors, vector_ids : optional
        Stored raw vectors ``(n, d)`` (float16 or float32) and their ids, for
        ``search(..., rerank=f)``.
    vectors_on : {"device", "host"}
        Keep the stored vectors in GPU memory, or in pinned host memory and
        copy only the candidates' rows per batch.
    device : str
        ``"cuda"`` (default), ``"cuda:N"``, or ``"emulate"`` (CPU emulation).
    memory_budget : int
        Bytes of device scratch memory one batch of queries may use.
    """

    def __init__(
        self,
        centroids: npt.ArrayLike,
        codebook: npt.ArrayLike,
        list_codes: Sequence[np.ndarray],
        list_ids: Sequence[np.ndarray],
        *,
        metric: Literal["ip", "l2"] = "ip",
        by_residual: bool = True,
        nbits: int = 8,
        removed: npt.ArrayLike | None = None,
        vectors: Any = None,
        vector_ids: npt.ArrayLike | None = None,
        vectors_on: Literal["device", "host"] = "device",
        device: str = "cuda",
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        if metric not in ("ip", "l2"):
            raise ValueError(f"metric: expected 'ip' or 'l2', got {metric!r}")
        if nbits not in (4, 8):
            raise ValueError(f"nbits: expected 8 or 4, got {nbits!r}")
        cent = np.ascontiguousarray(centroids, dtype=np.float32)
        book = np.ascontiguousarray(codebook, dtype=np.float32)
        if cent.ndim != 2 or book.ndim != 3:
            raise ValueError(
                f"centroids (nlist, d) and codebook (M, ksub, dsub) expected, got "
                f"{cent.shape} and {book.shape}"
            )
        M, ksub, dsub = book.shape
        if M * dsub != cent.shape[1] or ksub != 2**nbits:
            raise ValueError(
                f"codebook {book.shape} does not fit d={cent.shape[1]} with {nbits}-bit codes"
            )
        if len(list_codes) != cent.shape[0] or len(list_ids) != cent.shape[0]:
            raise ValueError(f"expected {cent.shape[0]} lists of codes and ids")
        self.backend = get_backend(device)
        self.device = device
        self.metric = metric
        self.by_residual = bool(by_residual)
        self.nbits = nbits
        self.d, self.nlist, self.M, self.ksub, self.dsub = (
            cent.shape[1],
            cent.shape[0],
            M,
            ksub,
            dsub,
        )
        self.W = _words_per_code(M, nbits)
        self.memory_budget = int(memory_budget)
        words, slot_ids, list_block = interleave_lists(list_codes, list_ids, M, nbits)
        self._slot_ids_host = slot_ids
        self._removed = np.unique(np.asarray([] if removed is None else removed, np.int64))
        be = self.backend
        self.centroids = be.asarray(cent)
        self.codebook = be.asarray(book)
        self.codes = be.asarray(words)
        self.slot_ids = be.asarray(slot_ids)
        self.list_block = be.asarray(list_block)
        self.live = be.asarray(live_mask(slot_ids, self._removed))
        self.ntotal = int((slot_ids >= 0).sum()) - int(np.isin(self._removed, slot_ids).sum())
        self._c_norm = (self.centroids * self.centroids).sum(axis=1)
        self.vectors_on = vectors_on
        self._vec: Any = None
        self._vec_sorted_ids: Any = None
        self._vec_order: Any = None
        if vectors is not None:
            self._set_vectors(vectors, vector_ids, vectors_on)

    # --- state --------------------------------------------------------------------------------
    @property
    def larger_is_better(self) -> bool:
        return self.metric == "ip"

    def __repr__(self) -> str:
        return (
            f"GpuIVFPQ(d={self.d}, nlist={self.nlist}, M={self.M}, nbits={self.nbits}, "
            f"metric={self.metric!r}, ntotal={self.ntotal}, device={self.device!r})"
        )

    def _set_vectors(self, vectors: Any, vector_ids: Any, where: str) -> None:
        if vector_ids is None:
            raise ValueError("vector_ids: required with vectors (the id of each row)")
        ids = np.ascontiguousarray(vector_ids, dtype=np.int64)
        v = vectors
        if kind_of(v) == "numpy":
            v = np.asarray(v)
            if v.dtype not in (np.float16, np.float32) or v.shape != (ids.size, self.d):
                raise ValueError(
                    f"vectors: expected float16/float32 ({ids.size}, {self.d}), got "
                    f"{v.dtype} {v.shape}"
                )
        order = np.argsort(ids, kind="stable")
        be = self.backend
        if where == "device":
            self._vec = to_backend(be, v)
        elif where == "host":
            self._vec = np.ascontiguousarray(
                be.to_host(to_backend(be, v)) if kind_of(v) != "numpy" else v
            )
        else:
            raise ValueError(f"vectors_on: expected 'device' or 'host', got {where!r}")
        self._vec_sorted_ids = be.asarray(ids[order])
        self._vec_order = be.asarray(order.astype(np.int64))
        self._vec_sorted_host = ids[order]
        self._vec_order_host = order.astype(np.int64)

    def remove(self, ids: npt.ArrayLike) -> int:
        """Skip ``ids`` in every later scan (tombstones); returns how many were live here."""
        arr = np.unique(np.asarray(ids, dtype=np.int64).ravel())
        before = self.ntotal
        self._removed = np.union1d(self._removed, arr)
        self.live = self.backend.asarray(live_mask(self._slot_ids_host, self._removed))
        present = self._slot_ids_host[self._slot_ids_host >= 0]
        self.ntotal = int(present.size) - int(np.isin(self._removed, present).sum())
        return before - self.ntotal

    # --- search -------------------------------------------------------------------------------
    def coarse(self, q: Any, nprobe: int, stream: Any = None) -> tuple[Any, Any]:
        """``(D, I)`` ``(nq, nprobe)``: the best lists of each query (inner products for "ip",
        ``|c|^2 - 2 <q, c>`` for "l2"), on the backend."""
        be = self.backend
        dots = q @ self.centroids.T
        scores = dots if self.metric == "ip" else self._c_norm[None, :] - 2 * dots
        return _select(
            be, be.asarray(scores, np.float32), None, nprobe, self.metric == "ip", stream
        )

    def _batch_size(self, k_scan: int, nsplit: int) -> int:
        per_query = 4 * self.nlist + 4 * self.d + nsplit * k_scan * 12 * 2 + k_scan * 12
        return max(1, self.memory_budget // per_query)

    def search(
        self,
        q: Any,
        k: int,
        *,
        nprobe: int = 16,
        rerank: int | None = None,
        lut: Literal["float32", "float16"] = "float32",
        nsplit: int | None = None,
        stream: Any = None,
    ) -> tuple[Any, Any]:
        """Top-``k`` of each query: ``(D, I)`` ``(nq, k)`` as the array kind of ``q``.

        Same conventions as ``IVFPQIndex.search``: scores best first, ties by
        lower id, padding ``-1`` with ``-inf`` (``+inf`` for L2). ``nsplit``
        splits each query's probes over that many thread blocks (default: enough
        blocks to fill the device).
        """
        be = self.backend
        xp = be.xp
        kind = kind_of(q)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k: expected a positive int, got {k!r}")
        if not 1 <= nprobe <= self.nlist:
            raise ValueError(f"nprobe: expected 1..{self.nlist}, got {nprobe}")
        if lut not in ("float32", "float16"):
            raise ValueError(f"lut: expected 'float32' or 'float16', got {lut!r}")
        factor = 1 if rerank is None else int(rerank)
        if rerank is not None and (factor < 1 or self._vec is None):
            raise ValueError(
                "rerank: needs an int >= 1 and stored vectors (pass vectors= and vector_ids=)"
            )
        k_scan = int(k) * factor
        if k_scan > be.native.MAX_K:
            raise ValueError(
                f"k * rerank = {k_scan} exceeds the kernels' limit {be.native.MAX_K}; "
                "lower k or rerank"
            )
        half = lut == "float16"
        with be.stream_context(stream):
            qd = to_backend(be, q, np.float32)
            if qd.ndim != 2 or qd.shape[1] != self.d:
                raise ValueError(f"q: expected (nq, {self.d}) float32, got {tuple(qd.shape)}")
            nq = qd.shape[0]
            if nsplit is None:
                nsplit = 1
                if be.is_device:
                    sms = be.sm_count()
                    while nq * nsplit < 4 * sms and nsplit * 2 <= nprobe:
                        nsplit *= 2
            nsplit = max(1, min(int(nsplit), nprobe))
            outs_D, outs_I = [], []
            step = self._batch_size(k_scan, nsplit)
            for s in range(0, nq, step):
                D, I = self._search_batch(qd[s : s + step], k_scan, nprobe, nsplit, half, stream)
                if rerank is not None:
                    from .rerank import rerank as exact

                    D, I = exact(self, qd[s : s + step], I, int(k), stream=stream)
                outs_D.append(D)
                outs_I.append(I)
            D = outs_D[0] if len(outs_D) == 1 else xp.concatenate(outs_D)
            I = outs_I[0] if len(outs_I) == 1 else xp.concatenate(outs_I)
        return to_kind(be, D, kind), to_kind(be, I, kind)

    def _scan_args(
        self, q: Any, cD: Any, cI: Any, nprobe: int, nsplit: int, k: int
    ) -> dict[str, Any]:
        be = self.backend
        return {
            "q": be.ptr(q),
            "coarse_I": be.ptr(cI),
            "coarse_D": be.ptr(cD),
            "centroids": be.ptr(self.centroids),
            "codebook": be.ptr(self.codebook),
            "codes": be.ptr(self.codes),
            "live": be.ptr(self.live),
            "slot_ids": be.ptr(self.slot_ids),
            "list_block": be.ptr(self.list_block),
            "nq": int(q.shape[0]),
            "d": self.d,
            "M": self.M,
            "ksub": self.ksub,
            "dsub": self.dsub,
            "W": self.W,
            "nprobe": nprobe,
            "nsplit": nsplit,
            "k": k,
            "ip": self.metric == "ip",
            "by_residual": self.by_residual,
        }

    def _search_batch(
        self, q: Any, k: int, nprobe: int, nsplit: int, half: bool, stream: Any
    ) -> tuple[Any, Any]:
        be = self.backend
        xp = be.xp
        nq = q.shape[0]
        cD, cI = self.coarse(q, nprobe, stream)
        out_D = xp.empty((nq, nsplit, k), np.float32)
        out_I = xp.empty((nq, nsplit, k), np.int64)
        args = self._scan_args(q, cD, cI, nprobe, nsplit, k)
        args["out_D"] = be.ptr(out_D)
        args["out_I"] = be.ptr(out_I)
        if be.native.scan_shared_need(args, half) == 0:
            raise ValueError(
                f"k={k} with M={self.M}, d={self.d} needs more shared memory than a block has; "
                "lower k or rerank, or pass lut='float16'"
            )
        be.native.scan(args, self.nbits, half, be.stream_ptr(stream))
        if nsplit == 1:
            return out_D.reshape(nq, k), out_I.reshape(nq, k)
        return _select(
            be,
            out_D.reshape(nq, nsplit * k),
            out_I.reshape(nq, nsplit * k),
            k,
            self.metric == "ip",
            stream,
        )

    # --- encoding -----------------------------------------------------------------------------
    def encode(self, x: Any, *, stream: Any = None) -> tuple[Any, Any]:
        """List numbers and flat codes of ``x`` with this index's codec (see :func:`encode`)."""
        return encode(
            x,
            self.centroids,
            self.codebook,
            metric=self.metric,
            by_residual=self.by_residual,
            nbits=self.nbits,
            device=self.device,
            stream=stream,
        )
