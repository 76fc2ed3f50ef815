// Exact re-ranking: each query against its own candidate rows of a stored
// vector table (float32 or float16, in memory or memory-mapped), best k kept.
#pragma once

#include <cstdint>

namespace fastface {

// Where candidate ids' rows are. For candidate id x: row = rows[i * m + c] when
// rows is given; else, with t = x - lo, row = table ? table[t] : t when
// 0 <= t < span, and no row otherwise. A row < 0 or >= n (no row) skips the
// candidate.
struct RowMap {
  const int64_t* rows;   // (nq, m) or nullptr
  int64_t lo;            // smallest id covered by the map
  int64_t span;          // ids lo .. lo + span - 1
  const int64_t* table;  // (span,) rows, -1 for none; nullptr: row = id - lo
};

// The stored vectors: n rows of d values, float32 (f16 = false) or the bit
// patterns of float16 values (f16 = true), rows back to back.
struct VectorTable {
  const void* data;
  int64_t n;
  int64_t d;
  bool f16;
};

// Exact top-k of each query's m candidates (ids cand, (nq, m); -1 skipped).
//
// The score is computed one way on every build: products q[j] * v[j] rounded
// to float32 (no fused multiply-add), summed into 32 lanes (term j into lane
// j % 32, in order of j; the vectors count as zero-padded to a multiple of 32),
// lanes added pairwise a[l] + a[l + h] for h = 16, 8, 4, 2, 1. float16 values
// are widened exactly. Inner product: that sum. L2: (|q|^2 - 2 * dot) + |v|^2,
// each norm summed the same way. Results best first, equal scores by lower id,
// padded with id -1 and -inf (inner product) or +inf (L2). Parallel over
// queries (OpenMP); the caller must not hold the GIL. Arguments are checked by
// the caller.
void rerank(const float* q, int64_t nq, const VectorTable& base, const int64_t* cand, int64_t m,
            const RowMap& map, bool l2, int64_t k, float* D, int64_t* I);

}  // namespace fastface
