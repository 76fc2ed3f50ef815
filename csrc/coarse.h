// Exhaustive coarse assignment: each query's k best of n centroids, scored in
// blocks without a BLAS (whose idle worker threads would spin against the scan's
// OpenMP threads that run next).
#pragma once

#include <cstdint>

namespace fastface {

// The k best of n centroids for each of nq queries (q: nq x d, row-major; ct: the
// centroids transposed, d x n). The inner product of a query and a centroid is
// computed one way on every build: products q[t] * c[t] rounded to float32 (no
// fused multiply-add) and added in order of t from 0. Inner product (cnorms ==
// nullptr): that sum, larger is better. L2 (cnorms: n squared centroid norms):
// max((|q|^2 + cnorms[j]) - 2 * dot, 0), with |q|^2 summed the same way, smaller
// is better. Results in D and I (nq x k), best first, equal scores by lower
// centroid, padded with -1 when k > n. Parallel over queries (OpenMP); the caller
// must not hold the GIL. Arguments are checked by the caller.
void coarse_topk(const float* q, int64_t nq, int64_t d, const float* ct, int64_t n,
                 const float* cnorms, int64_t k, float* D, int64_t* I);

}  // namespace fastface
