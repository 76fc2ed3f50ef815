// IVF-PQ scan of 8-bit product-quantizer codes over inverted lists held in
// place (memory, memory maps, several runs per list), with an exact top-k.
#pragma once

#include <cstdint>
#include <string>

namespace fastface {

// One run of inverted lists. Entry j of list l has its code_size code bytes
// at codes + codes_off[l] + j * code_size and its id (int64, native byte
// order, any alignment) at ids + ids_off[l] + 8 * j, for j < count[l].
// Several runs may hold entries of the same list (shards, appended batches);
// a search scans every run's part of each probed list.
struct ListRun {
  const uint8_t* codes;
  const uint8_t* ids;
  const int64_t* codes_off;
  const int64_t* ids_off;
  const int64_t* count;
};

// Checks that every list of a run lies inside its buffers (sizes in bytes).
// Returns an empty string when it does, else what is wrong.
std::string check_list_run(const ListRun& run, int64_t nlist, int64_t code_size,
                           int64_t codes_bytes, int64_t ids_bytes);

// The codec's numbers a scan needs.
struct PQCodec {
  int64_t d;            // vector dimension
  int64_t nlist;        // inverted lists
  int64_t M;            // sub-quantizers, code_size = M bytes (8 bits each)
  int64_t dsub;         // d / M
  const float* pq;      // PQ centroids transposed: (M, dsub, 256), pq[(m * dsub + t) * 256 + j]
  const float* coarse;  // coarse centroids (nlist, d); read for L2 only
  bool inner_product;   // true: scores are inner products (larger is better); false: squared L2
};

// Top-k of each query over the probed lists of every run.
//
// q: (nq, d) queries. assign_D / assign_I: (nq, nprobe) coarse assignment
// (list numbers, -1 skipped) and its scores (the query-centroid inner product,
// read for the inner product only). exclude: n_exclude ids sorted ascending,
// never returned. Results D / I: (nq, k), best first under one total order:
// better score first, equal scores by lower id; fewer than k results are
// padded with id -1 and score -inf (inner product) or +inf (L2).
// max_copies: the most entries one id has over all runs (2 with spilled
// assignment: a vector in two lists). Each id is returned once, with the best
// score of its entries in the probed lists.
//
// Scores are computed one way on every build: each look-up table entry is a
// float32 chain of fused multiply-adds over the sub-vector's components in
// order (fma(x_t, c_t, acc); for L2 fma(x_t - c_t, x_t - c_t, acc)), and
// each code's table entries are summed into 8 lanes (entry m into lane
// m % 8, in order of m) then added ((l0 + l4) + (l2 + l6)) + ((l1 + l5) +
// (l3 + l7)); the inner product adds that to the coarse score. SIMD and
// scalar builds therefore return the same bits (a build without hardware
// FMA computes the same values, slowly, with std::fma). Parallel over queries (OpenMP); the
// caller must not hold the GIL. Arguments are checked by the caller.
void ivfpq8_search(const PQCodec& codec, const float* q, int64_t nq, const float* assign_D,
                   const int64_t* assign_I, int64_t nprobe, const ListRun* runs, int64_t nruns,
                   const int64_t* exclude, int64_t n_exclude, int64_t k, int64_t max_copies,
                   float* D, int64_t* I);

// Copies nseg byte ranges: nbytes[i] bytes from src + src_off[i] to
// dst + dst_off[i]. Ranges must lie inside both buffers (checked by the
// caller). Used to lay inverted lists out (file -> memory, merging runs).
void copy_segments(const uint8_t* src, uint8_t* dst, const int64_t* src_off, const int64_t* dst_off,
                   const int64_t* nbytes, int64_t nseg);

}  // namespace fastface
