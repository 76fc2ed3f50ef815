"""From a CPU index to the arrays of :class:`GpuIVFPQ`.

Only the shard contract is used: :func:`_codec_of` takes a FAISS copy of a
shard (``IVFPQIndex.to_faiss()``), everything else uses FAISS's public API on
that object (quantizer vectors, PQ centroids, inverted lists, code packer) and
the public members of ``IVFPQIndex`` and ``ShardedIndex`` (``shards()``,
``ids``, ``vectors``, ``contains``).
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

__all__ = ["add_encoded", "codec_arrays", "from_cpu", "list_arrays"]


def _codec_of(shard: Any) -> Any:
    """A FAISS ``IndexIVFPQ`` / ``IndexIVFPQFastScan`` with the codec, codes and ids of a shard."""
    return shard.to_faiss()


def codec_arrays(ivf: Any) -> dict[str, Any]:
    """Centroids, codebook and codec flags of a FAISS IVF-PQ index (public FAISS API)."""
    nlist, d = ivf.nlist, ivf.d
    centroids = ivf.quantizer.reconstruct_n(0, nlist).astype(np.float32)
    pq = ivf.pq
    codebook = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
    return {
        "centroids": np.ascontiguousarray(centroids).reshape(nlist, d),
        "codebook": np.ascontiguousarray(codebook, dtype=np.float32),
        "metric": "ip" if ivf.metric_type == faiss.METRIC_INNER_PRODUCT else "l2",
        "by_residual": bool(ivf.by_residual),
        "nbits": int(pq.nbits),
    }


def list_arrays(ivf: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Flat codes ``(n_l, code_bytes)`` and ids of every inverted list (public FAISS API).

    Fast-scan (4-bit) lists are stored in packed blocks of 32; FAISS's code
    packer unpacks them to the flat order (two codes per byte, low nibble first).
    """
    invlists = ivf.invlists
    code_bytes = (ivf.pq.M * ivf.pq.nbits + 7) // 8
    packer = ivf.get_CodePacker() if ivf.pq.nbits == 4 else None
    codes, ids = [], []
    for lst in range(ivf.nlist):
        n = invlists.list_size(lst)
        if n == 0:
            codes.append(np.empty((0, code_bytes), np.uint8))
            ids.append(np.empty(0, np.int64))
            continue
        ptr = invlists.get_ids(lst)
        ids.append(faiss.rev_swig_ptr(ptr, n).copy())
        invlists.release_ids(lst, ptr)
        cptr = invlists.get_codes(lst)
        if packer is None:
            codes.append(faiss.rev_swig_ptr(cptr, n * code_bytes).copy().reshape(n, code_bytes))
        else:
            nblocks = (n + packer.nvec - 1) // packer.nvec
            packed = faiss.rev_swig_ptr(cptr, nblocks * packer.block_size).copy()
            flat = np.empty(nblocks * packer.nvec * code_bytes, np.uint8)
            for b in range(nblocks):
                packer.unpack_all(
                    faiss.swig_ptr(packed[b * packer.block_size :]),
                    faiss.swig_ptr(flat[b * packer.nvec * code_bytes :]),
                )
            codes.append(flat.reshape(-1, code_bytes)[:n].copy())
        invlists.release_codes(lst, cptr)
    return codes, ids


def from_cpu(
    index: Any,
    *,
    device: str = "cuda",
    vectors: bool = True,
    vectors_on: str = "device",
    memory_budget: int | None = None,
) -> Any:
    """A :class:`GpuIVFPQ` holding the codec, lists, removals and stored vectors of ``index``.

    ``index`` is an ``IVFPQIndex`` or a ``ShardedIndex`` (all shards, one
    codec). Removed vectors (tombstones not yet compacted) stay skipped.
    ``vectors=False`` leaves the stored vectors behind (no re-ranking).
    """
    from ..index import IVFPQIndex, ShardedIndex
    from .ivfpq import DEFAULT_MEMORY_BUDGET, GpuIVFPQ

    if isinstance(index, ShardedIndex):
        shards = [s for s in index.shards() if s.ntotal > 0]
        if not shards:
            raise ValueError("from_cpu: the index holds no vectors")
    elif isinstance(index, IVFPQIndex):
        shards = [index]
    else:
        raise TypeError(
            f"from_cpu: expected an IVFPQIndex or ShardedIndex, got {type(index).__name__}"
        )
    params = shards[0].params
    if params.kind == "flat":
        raise ValueError(
            "from_cpu: a flat index has no codes to search on the GPU; use an IVF-PQ spec "
            "(e.g. reencode the index with 'IVF1024,PQ32')"
        )
    if params.opq is not None:
        raise ValueError(
            "from_cpu: the GPU kernels do not apply an OPQ rotation yet; "
            "use a spec without 'OPQ' for an index searched on the GPU"
        )
    codec = codec_arrays(_codec_of(shards[0]))
    nlist = codec["centroids"].shape[0]
    per_list_codes: list[list[np.ndarray]] = [[] for _ in range(nlist)]
    per_list_ids: list[list[np.ndarray]] = [[] for _ in range(nlist)]
    removed, vecs, vec_ids = [], [], []
    for s in shards:
        c, i = list_arrays(_codec_of(s))
        for lst in range(nlist):
            per_list_codes[lst].append(c[lst])
            per_list_ids[lst].append(i[lst])
        ids = np.asarray(s.ids)
        if isinstance(index, ShardedIndex) and ids.size:
            removed.append(ids[~index.contains(ids)])
        if vectors and s.vectors is not None:
            vecs.append(np.asarray(s.vectors))
            vec_ids.append(ids)
    list_codes = [np.concatenate(p) for p in per_list_codes]
    list_ids = [np.concatenate(p) for p in per_list_ids]
    return GpuIVFPQ(
        codec["centroids"],
        codec["codebook"],
        list_codes,
        list_ids,
        metric=codec["metric"],
        by_residual=codec["by_residual"],
        nbits=codec["nbits"],
        removed=np.concatenate(removed) if removed else None,
        vectors=np.concatenate(vecs) if vecs else None,
        vector_ids=np.concatenate(vec_ids) if vec_ids else None,
        vectors_on=vectors_on,  # type: ignore[arg-type]
        device=device,
        memory_budget=DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget,
    )


def add_encoded(ivf: Any, lists: Any, codes: Any, ids: Any) -> None:
    """Append pre-encoded vectors to a FAISS ``IndexIVFPQ`` (8-bit codes), public FAISS API.

    ``lists`` and ``codes`` come from :func:`fastface.gpu.encode`: the result
    is the index FAISS's own ``add_with_ids`` would have made from the same
    codes, so shards filled from GPU encodings are ordinary shards.
    """
    if ivf.pq.nbits != 8:
        raise ValueError("add_encoded: 8-bit codes only (fast-scan lists are packed in blocks)")
    lists = np.asarray(lists, np.int64)
    codes = np.ascontiguousarray(codes, np.uint8)
    ids = np.ascontiguousarray(ids, np.int64)
    if codes.shape != (lists.size, ivf.code_size) or ids.shape != lists.shape:
        raise ValueError(
            f"add_encoded: expected lists (n,), codes (n, {ivf.code_size}), ids (n,); got "
            f"{lists.shape}, {codes.shape}, {ids.shape}"
        )
    if lists.size and (lists.min() < 0 or lists.max() >= ivf.nlist):
        raise ValueError(f"add_encoded: list numbers must lie in [0, {ivf.nlist})")
    order = np.argsort(lists, kind="stable")
    bounds = np.searchsorted(lists[order], np.arange(ivf.nlist + 1))
    for lst in range(ivf.nlist):
        sel = order[bounds[lst] : bounds[lst + 1]]
        if sel.size:
            c = np.ascontiguousarray(codes[sel])
            i = np.ascontiguousarray(ids[sel])
            ivf.invlists.add_entries(lst, sel.size, faiss.swig_ptr(i), faiss.swig_ptr(c))
    ivf.ntotal += lists.size
