#include "coarse.h"

#include <algorithm>
#include <vector>

#include "merge.h"

// Compiled once per instruction-set level (FASTFACE_ISA_NS names the variant), like
// the other SIMD kernels: the loops below are plain C++ that the compiler
// vectorises over centroids (each lane one centroid, its sum in order of t), so
// every level computes the same bits (-ffp-contract=off).
#ifndef FASTFACE_ISA_NS
#define FASTFACE_ISA_NS native
#endif

namespace fastface {
namespace FASTFACE_ISA_NS {

namespace {

constexpr int64_t kRows = 4;   // queries scored together (each centroid value loaded once)
constexpr int64_t kCols = 64;  // centroids per block (the accumulators stay in registers)

// Inner products of kRows queries (rows qr[r]; the caller repeats the last when
// fewer) with the centroids j0 .. j0 + cols - 1 (cols == kCols when kFull: a loop
// count fixed at compile time), into S (kRows x n).
template <bool kFull>
inline void dot_block(const float* const* qr, int64_t d, const float* ct, int64_t n, int64_t j0,
                      int64_t cols, float* S) {
  float acc[kRows][kCols];
  const int64_t w = kFull ? kCols : cols;
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t l = 0; l < w; ++l) acc[r][l] = 0.0f;
  }
  for (int64_t t = 0; t < d; ++t) {
    const float* c = ct + t * n + j0;
    for (int64_t r = 0; r < kRows; ++r) {
      const float qv = qr[r][t];
      for (int64_t l = 0; l < w; ++l) acc[r][l] = acc[r][l] + qv * c[l];
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t l = 0; l < w; ++l) S[r * n + j0 + l] = acc[r][l];
  }
}

}  // namespace

void coarse_topk(const float* q, int64_t nq, int64_t d, const float* ct, int64_t n,
                 const float* cnorms, int64_t k, float* D, int64_t* I) {
  const int64_t nblocks = (nq + kRows - 1) / kRows;
#pragma omp parallel if (nblocks > 1)
  {
    std::vector<float> S(static_cast<size_t>(kRows * n));
    float qn[kRows];
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t i0 = b * kRows;
      const int64_t rows = std::min(kRows, nq - i0);
      const float* qr[kRows];
      for (int64_t r = 0; r < kRows; ++r) qr[r] = q + (i0 + std::min(r, rows - 1)) * d;
      int64_t j0 = 0;
      for (; j0 + kCols <= n; j0 += kCols) dot_block<true>(qr, d, ct, n, j0, kCols, S.data());
      if (j0 < n) dot_block<false>(qr, d, ct, n, j0, n - j0, S.data());
      if (cnorms != nullptr) {
        for (int64_t r = 0; r < rows; ++r) {
          float s = 0.0f;
          for (int64_t t = 0; t < d; ++t) s = s + qr[r][t] * qr[r][t];
          qn[r] = s;
        }
      }
      // the one selection (merge.h): better score, then lower centroid
      select_topk(S.data(), rows, n, k, cnorms == nullptr, cnorms != nullptr ? qn : nullptr, cnorms,
                  D + i0 * k, I + i0 * k);
    }
  }
}

}  // namespace FASTFACE_ISA_NS
}  // namespace fastface
