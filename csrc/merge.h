// Top-k merge of per-part result lists under one total order.
#pragma once

#include <cstdint>

namespace fastface {

// Merges `nparts` result lists per query into one top-`k_out` list.
//
// `D` and `I` hold `nparts * nq * k_in` values laid out as (part, query,
// rank); entries with id -1 are padding and are skipped. The result is the
// best `k_out` entries of all parts under one total order: the better score
// first (larger if `larger_is_better`, the inner product; smaller for L2),
// and equal scores by lower id. The input lists need not be sorted, and the
// result is the same whatever the order of the parts. Missing results are
// written as id -1 with score -inf (larger_is_better) or +inf. Parallel
// over queries; the caller must not hold the GIL.
void merge_topk(const float* D, const int64_t* I, int64_t nparts, int64_t nq, int64_t k_in,
                int64_t k_out, bool larger_is_better, float* out_D, int64_t* out_I);

// Top-`k` columns of each row of a dense score matrix `S` (`nq` rows of `n`
// scores): column numbers in `out_I` and scores in `out_D`, `nq * k` each, best
// first under the same total order as merge_topk (better score, then lower
// column). With `col_norms` (and `row_norms`) non-null, `S` holds inner products
// and the scores are squared L2 distances `max(row_norms[i] + col_norms[j] -
// 2 S[i, j], 0)` (FAISS's flat search computes them so). Rows with fewer than
// `k` columns are padded with id -1 and -inf (larger_is_better) or +inf. Parallel
// over rows; the caller must not hold the GIL.
void select_topk(const float* S, int64_t nq, int64_t n, int64_t k, bool larger_is_better,
                 const float* row_norms, const float* col_norms, float* out_D, int64_t* out_I);

}  // namespace fastface
