#include "merge.h"

#include <cstddef>
#include <limits>
#include <vector>

namespace fastface {

namespace {

template <bool kLarger>
void merge_one(const float* D, const int64_t* I, int64_t nshards, int64_t nq, int64_t k_in,
               int64_t k_out, int64_t q, int64_t* pos, float* out_D, int64_t* out_I) {
  const float pad = kLarger ? -std::numeric_limits<float>::infinity()
                            : std::numeric_limits<float>::infinity();
  const int64_t stride = nq * k_in;
  for (int64_t s = 0; s < nshards; ++s) pos[s] = 0;
  int64_t filled = 0;
  while (filled < k_out) {
    int64_t best = -1;
    float best_v = 0.0f;
    for (int64_t s = 0; s < nshards; ++s) {
      const int64_t base = s * stride + q * k_in;
      // padding can only be skipped, it never wins
      while (pos[s] < k_in && I[base + pos[s]] < 0) ++pos[s];
      if (pos[s] >= k_in) continue;
      const float v = D[base + pos[s]];
      // strict comparison: on ties the lower shard keeps its place
      if (best < 0 || (kLarger ? v > best_v : v < best_v)) {
        best = s;
        best_v = v;
      }
    }
    if (best < 0) break;
    const int64_t base = best * stride + q * k_in;
    out_D[q * k_out + filled] = best_v;
    out_I[q * k_out + filled] = I[base + pos[best]];
    ++pos[best];
    ++filled;
  }
  for (; filled < k_out; ++filled) {
    out_D[q * k_out + filled] = pad;
    out_I[q * k_out + filled] = -1;
  }
}

}  // namespace

void merge_topk(const float* D, const int64_t* I, int64_t nshards, int64_t nq, int64_t k_in,
                int64_t k_out, bool larger_is_better, float* out_D, int64_t* out_I) {
#pragma omp parallel
  {
    std::vector<int64_t> pos(static_cast<size_t>(nshards > 0 ? nshards : 1));
#pragma omp for schedule(static)
    for (int64_t q = 0; q < nq; ++q) {
      if (larger_is_better) {
        merge_one<true>(D, I, nshards, nq, k_in, k_out, q, pos.data(), out_D, out_I);
      } else {
        merge_one<false>(D, I, nshards, nq, k_in, k_out, q, pos.data(), out_D, out_I);
      }
    }
  }
}

}  // namespace fastface
