// k-way merge of per-shard top-k lists.
#pragma once

#include <cstdint>

namespace fastface {

// Merges `nshards` sorted result lists per query into one top-`k_out` list.
//
// `D` and `I` hold `nshards * nq * k_in` values laid out as (shard, query, rank).
// Each (shard, query) list is sorted best first; entries with id -1 are padding
// and are skipped. Scores are better when larger if `larger_is_better` (inner
// product), smaller otherwise (L2). Equal scores keep the order (lower shard,
// then lower rank) so that the result equals a stable sort of the
// concatenated lists. Missing results are written as id -1 with score -inf
// (larger_is_better) or +inf. Parallel over queries; the caller must not hold
// the GIL.
void merge_topk(const float* D, const int64_t* I, int64_t nshards, int64_t nq, int64_t k_in,
                int64_t k_out, bool larger_is_better, float* out_D, int64_t* out_I);

}  // namespace fastface
