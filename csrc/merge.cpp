#include "merge.h"

#include <algorithm>
#include <cstddef>
#include <limits>
#include <utility>
#include <vector>

namespace fastface {

namespace {

using Entry = std::pair<float, int64_t>;

template <bool kLarger>
bool better(const Entry& a, const Entry& b) {
  if (a.first != b.first) return kLarger ? a.first > b.first : a.first < b.first;
  return a.second < b.second;
}

template <bool kLarger>
void merge_one(const float* D, const int64_t* I, int64_t nparts, int64_t nq, int64_t k_in,
               int64_t k_out, int64_t q, std::vector<Entry>& buf, float* out_D, int64_t* out_I) {
  buf.clear();
  const int64_t stride = nq * k_in;
  for (int64_t s = 0; s < nparts; ++s) {
    const int64_t base = s * stride + q * k_in;
    for (int64_t r = 0; r < k_in; ++r) {
      if (I[base + r] >= 0) buf.emplace_back(D[base + r], I[base + r]);
    }
  }
  const int64_t size = static_cast<int64_t>(buf.size());
  const int64_t n = std::min<int64_t>(k_out, size);
  // One part sorted by score, ties in any order (FAISS's fast-scan rows, whose 4-bit
  // scores tie often): only each run of equal scores needs sorting, by id.
  const auto by_score = [](const Entry& a, const Entry& b) {
    return kLarger ? a.first > b.first : a.first < b.first;
  };
  if (std::is_sorted(buf.begin(), buf.end(), by_score)) {
    for (int64_t lo = 0; lo < n;) {
      int64_t hi = lo + 1;
      while (hi < size && buf[hi].first == buf[lo].first) ++hi;
      if (hi - lo > 1) std::sort(buf.begin() + lo, buf.begin() + hi, better<kLarger>);
      lo = hi;
    }
  } else if (4 * n >= size) {
    // partial_sort is a heap sort: slow and branchy when most of the input is kept
    std::sort(buf.begin(), buf.end(), better<kLarger>);
  } else {
    std::partial_sort(buf.begin(), buf.begin() + n, buf.end(), better<kLarger>);
  }
  const float pad =
      kLarger ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < k_out; ++t) {
    out_D[q * k_out + t] = t < n ? buf[t].first : pad;
    out_I[q * k_out + t] = t < n ? buf[t].second : -1;
  }
}

}  // namespace

void merge_topk(const float* D, const int64_t* I, int64_t nparts, int64_t nq, int64_t k_in,
                int64_t k_out, bool larger_is_better, float* out_D, int64_t* out_I) {
#pragma omp parallel if (nq > 64)
  {
    std::vector<Entry> buf;
    buf.reserve(static_cast<size_t>(nparts * k_in));
#pragma omp for schedule(static)
    for (int64_t q = 0; q < nq; ++q) {
      if (larger_is_better) {
        merge_one<true>(D, I, nparts, nq, k_in, k_out, q, buf, out_D, out_I);
      } else {
        merge_one<false>(D, I, nparts, nq, k_in, k_out, q, buf, out_D, out_I);
      }
    }
  }
}

}  // namespace fastface
