// IVF-PQ scan: one block per (query, split); the block scans the lists of
// its share of the query's probes, with the look-up table in shared memory,
// and keeps the top-k in shared memory (topk.cuh).
//
// Codes are laid out for coalesced loads: the vectors of each inverted list
// are padded to blocks of 32 (one per lane of a warp) and each block stores
// word w of its 32 codes contiguously, so that load w of a warp reads 128
// consecutive bytes. A code of M sub-quantizer indices is packed little-endian
// into words: 8-bit codes four per word, 4-bit codes eight per word (FAISS's
// flat 4-bit order: sub-quantizer m in nibble m % 8 of word m / 8). One
// 32-bit mask word per block says which of its slots are live: padding and
// removed vectors (tombstones) have their bit cleared and are skipped inside
// the scan.
//
// Distances follow FAISS's IndexIVFPQ, residual encoding included:
//   inner product:   <q, c_l> + sum_m <q_m, C_m[code_m]>    (table per query)
//   squared L2:      sum_m |(q - c_l)_m - C_m[code_m]|^2      (table per list)
// and without residual encoding c_l drops out of both.
#pragma once

#include "common.cuh"
#include "topk.cuh"

namespace fastface {
namespace cuda {

struct ScanArgs {
  const float* q;             // (nq, d)
  const int64_t* coarse_I;    // (nq, nprobe) list of each probe, -1: none
  const float* coarse_D;      // (nq, nprobe) <q, c_l> (used for inner product with residuals)
  const float* centroids;     // (nlist, d)
  const float* codebook;      // (M, ksub, dsub)
  const uint32_t* codes;      // (nblocks, W, 32) words
  const uint32_t* live;       // (nblocks,) bit lane: slot is live
  const int64_t* slot_ids;    // (nblocks * 32,) id of each slot, -1 for padding
  const int64_t* list_block;  // (nlist + 1,) first block of each list
  int64_t nq, d;
  int M, ksub, dsub, W, nprobe, nsplit, k;
  bool ip, by_residual;
  float* out_D;  // (nq, nsplit, k)
  int64_t* out_I;
};

template <bool HALF>
struct LutT;
template <>
struct LutT<false> {
  using type = float;
  FF_HD static float store(float v) { return v; }
  FF_HD static float load(float v) { return v; }
};
template <>
struct LutT<true> {
  using type = uint16_t;
  FF_HD static uint16_t store(float v) { return float_to_half_bits(v); }
  FF_HD static float load(uint16_t v) { return half_bits_to_float(v); }
};

FF_HD size_t scan_shared_bytes(int M, int ksub, int64_t d, bool half, int k, int nthreads) {
  size_t lut = static_cast<size_t>(M) * ksub * (half ? 2 : 4);
  lut = (lut + 15) / 16 * 16;
  const size_t vec = (static_cast<size_t>(d) * 4 + 15) / 16 * 16;
  return topk_shared_bytes(k, nthreads) + lut + vec;
}

// One table entry: sub-quantizer m, centroid j, against the vector r (shared).
FF_HD float lut_entry(const ScanArgs& a, const float* r, int m, int j) {
  const float* c = a.codebook + (static_cast<int64_t>(m) * a.ksub + j) * a.dsub;
  const float* x = r + m * a.dsub;
  float acc = 0.f;
  if (a.ip) {
    for (int t = 0; t < a.dsub; ++t) acc = fmaf(x[t], c[t], acc);
  } else {
    for (int t = 0; t < a.dsub; ++t) {
      const float diff = x[t] - c[t];
      acc = fmaf(diff, diff, acc);
    }
  }
  return acc;
}

// Sum of the table entries of one code (W words of packed indices).
template <int NBITS, bool HALF>
FF_HD float code_distance(const ScanArgs& a, const typename LutT<HALF>::type* lut,
                          const uint32_t* words, int stride) {
  constexpr int per_word = 32 / NBITS;
  constexpr uint32_t mask = (1u << NBITS) - 1u;
  float acc = 0.f;
  int m = 0;
  for (int w = 0; w < a.W; ++w) {
    const uint32_t word = words[w * stride];
    for (int i = 0; i < per_word && m < a.M; ++i, ++m) {
      const uint32_t c = (word >> (NBITS * i)) & mask;
      acc += LutT<HALF>::load(lut[m * a.ksub + static_cast<int>(c)]);
    }
  }
  return acc;
}

template <int NBITS, bool HALF, class Exec>
FF_HD void scan_block(const Exec& ex, const ScanArgs& a, int64_t qi, int split,
                      unsigned char* smem) {
  using L = LutT<HALF>;
  const int nt = ex.nthreads();
  const bool larger = a.ip;
  const TopKShared s = topk_carve(smem, a.k, nt);
  unsigned char* rest = smem + topk_shared_bytes(a.k, nt);
  size_t lut_bytes = static_cast<size_t>(a.M) * a.ksub * sizeof(typename L::type);
  lut_bytes = (lut_bytes + 15) / 16 * 16;
  typename L::type* lut = reinterpret_cast<typename L::type*>(rest);
  float* r = reinterpret_cast<float*>(rest + lut_bytes);
  const float* q = a.q + qi * a.d;
  const int n_entries = a.M * a.ksub;
  const bool per_list = a.by_residual && !a.ip;

  topk_init(ex, s, a.k, larger);
  bool have_table = false;
  for (int p = split; p < a.nprobe; p += a.nsplit) {
    const int64_t list = a.coarse_I[qi * a.nprobe + p];
    if (list < 0) continue;
    if (per_list || !have_table) {
      const float* c = a.centroids + list * a.d;
      ex.threads([&](int t) {
        for (int64_t i = t; i < a.d; i += nt) r[i] = per_list ? q[i] - c[i] : q[i];
      });
      ex.threads([&](int t) {
        for (int e = t; e < n_entries; e += nt) {
          lut[e] = L::store(lut_entry(a, r, e / a.ksub, e % a.ksub));
        }
      });
      have_table = true;
    }
    const float base = (a.ip && a.by_residual) ? a.coarse_D[qi * a.nprobe + p] : 0.f;
    const int64_t b0 = a.list_block[list], b1 = a.list_block[list + 1];
    const int64_t slots = (b1 - b0) * 32;
    for (int64_t off = 0; off < slots; off += nt) {
      ex.threads([&](int t) {
        const int64_t slot = off + t;
        if (slot >= slots) return;
        const int64_t blk = b0 + slot / 32;
        const int lane = static_cast<int>(slot % 32);
        if (((a.live[blk] >> lane) & 1u) == 0) return;
        const uint32_t* words = a.codes + blk * a.W * 32 + lane;
        const float dis = base + code_distance<NBITS, HALF>(a, lut, words, 32);
        topk_offer(ex, s, a.k, dis, a.slot_ids[blk * 32 + lane], larger);
      });
      topk_after_round(ex, s, a.k, larger);
    }
  }
  topk_finish(ex, s, a.k, larger);
  float* oD = a.out_D + (qi * a.nsplit + split) * a.k;
  int64_t* oI = a.out_I + (qi * a.nsplit + split) * a.k;
  ex.threads([&](int t) {
    for (int i = t; i < a.k; i += nt) {
      oD[i] = s.key[i];
      oI[i] = s.val[i];
    }
  });
}

}  // namespace cuda
}  // namespace fastface
