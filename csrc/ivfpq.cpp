#include "ivfpq.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "topk.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

// Compiled once per instruction-set level (FASTFACE_ISA_NS names the
// variant); csrc/dispatch.cpp picks one at run time.
#ifndef FASTFACE_ISA_NS
#define FASTFACE_ISA_NS native
#endif

namespace fastface {
namespace FASTFACE_ISA_NS {

namespace {

constexpr int64_t kKsub = 256;

// Look-up table of one query (inner product) or one residual (L2) against
// every PQ centroid: lut[m * 256 + j] = sum over t of x[t] * C[t][j] (inner
// product) or (x[t] - C[t][j])^2 (L2), accumulated in order of t with a fused
// multiply-add per term. The SIMD path computes each lane exactly as the
// scalar one does (std::fma is exact wherever it runs), so every build agrees.
template <bool kL2>
void make_lut_scalar(const PQCodec& c, const float* x, float* lut) {
  for (int64_t m = 0; m < c.M; ++m) {
    const float* xm = x + m * c.dsub;
    for (int64_t j = 0; j < kKsub; ++j) {
      float a = 0.0f;
      for (int64_t t = 0; t < c.dsub; ++t) {
        const float cv = c.pq[(m * c.dsub + t) * kKsub + j];
        if (kL2) {
          const float diff = xm[t] - cv;
          a = std::fma(diff, diff, a);
        } else {
          a = std::fma(xm[t], cv, a);
        }
      }
      lut[m * kKsub + j] = a;
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// Eight accumulators of eight lanes: 64 table entries per pass over t, in registers.
template <bool kL2>
void make_lut(const PQCodec& c, const float* x, float* lut) {
  for (int64_t m = 0; m < c.M; ++m) {
    const float* xm = x + m * c.dsub;
    const float* Cm = c.pq + m * c.dsub * kKsub;
    for (int64_t jb = 0; jb < kKsub; jb += 64) {
      __m256 a[8];
      for (int u = 0; u < 8; ++u) a[u] = _mm256_setzero_ps();
      for (int64_t t = 0; t < c.dsub; ++t) {
        const __m256 xv = _mm256_set1_ps(xm[t]);
        const float* C = Cm + t * kKsub + jb;
        for (int u = 0; u < 8; ++u) {
          const __m256 cv = _mm256_loadu_ps(C + 8 * u);
          if (kL2) {
            const __m256 diff = _mm256_sub_ps(xv, cv);
            a[u] = _mm256_fmadd_ps(diff, diff, a[u]);
          } else {
            a[u] = _mm256_fmadd_ps(xv, cv, a[u]);
          }
        }
      }
      float* L = lut + m * kKsub + jb;
      for (int u = 0; u < 8; ++u) _mm256_storeu_ps(L + 8 * u, a[u]);
    }
  }
}
#else
template <bool kL2>
void make_lut(const PQCodec& c, const float* x, float* lut) {
  make_lut_scalar<kL2>(c, x, lut);
}
#endif

// The 8-lane reduction every build uses.
inline float reduce_lanes(const float* a) {
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

// Sum of the table entries of one code, scalar twin of the SIMD version.
inline float code_sum_scalar(const float* lut, int64_t M, const uint8_t* code) {
  float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t m = 0; m < M; ++m) a[m & 7] += lut[m * kKsub + code[m]];
  return reduce_lanes(a);
}

#if defined(__AVX2__)
inline float reduce_lanes(__m256 v) {
  alignas(32) float a[8];
  _mm256_store_ps(a, v);
  return reduce_lanes(a);
}

inline __m256i lane_index(const uint8_t* code, int64_t m, __m256i step) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(code + m));
  return _mm256_add_epi32(_mm256_cvtepu8_epi32(bytes), step);
}

// Entries m >= M8 (M not a multiple of 8) go to lane m % 8, after the others.
inline float finish(__m256 v, const float* lut, int64_t M8, int64_t M, const uint8_t* code) {
  alignas(32) float a[8];
  _mm256_store_ps(a, v);
  for (int64_t m = M8; m < M; ++m) a[m & 7] += lut[m * kKsub + code[m]];
  return reduce_lanes(a);
}

// Four codes at once: eight table entries per gather, four independent chains.
inline void code_sums4(const float* lut, int64_t M, const uint8_t* c0, const uint8_t* c1,
                       const uint8_t* c2, const uint8_t* c3, float* out) {
  const __m256i step = _mm256_setr_epi32(0, 256, 512, 768, 1024, 1280, 1536, 1792);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const int64_t M8 = M & ~int64_t{7};
  for (int64_t m = 0; m < M8; m += 8) {
    const float* L = lut + m * kKsub;
    a0 = _mm256_add_ps(a0, _mm256_i32gather_ps(L, lane_index(c0, m, step), 4));
    a1 = _mm256_add_ps(a1, _mm256_i32gather_ps(L, lane_index(c1, m, step), 4));
    a2 = _mm256_add_ps(a2, _mm256_i32gather_ps(L, lane_index(c2, m, step), 4));
    a3 = _mm256_add_ps(a3, _mm256_i32gather_ps(L, lane_index(c3, m, step), 4));
  }
  out[0] = finish(a0, lut, M8, M, c0);
  out[1] = finish(a1, lut, M8, M, c1);
  out[2] = finish(a2, lut, M8, M, c2);
  out[3] = finish(a3, lut, M8, M, c3);
}

inline float code_sum(const float* lut, int64_t M, const uint8_t* c0) {
  const __m256i step = _mm256_setr_epi32(0, 256, 512, 768, 1024, 1280, 1536, 1792);
  __m256 a0 = _mm256_setzero_ps();
  const int64_t M8 = M & ~int64_t{7};
  for (int64_t m = 0; m < M8; m += 8) {
    a0 = _mm256_add_ps(a0, _mm256_i32gather_ps(lut + m * kKsub, lane_index(c0, m, step), 4));
  }
  return finish(a0, lut, M8, M, c0);
}
#else
inline void code_sums4(const float* lut, int64_t M, const uint8_t* c0, const uint8_t* c1,
                       const uint8_t* c2, const uint8_t* c3, float* out) {
  out[0] = code_sum_scalar(lut, M, c0);
  out[1] = code_sum_scalar(lut, M, c1);
  out[2] = code_sum_scalar(lut, M, c2);
  out[3] = code_sum_scalar(lut, M, c3);
}

inline float code_sum(const float* lut, int64_t M, const uint8_t* c0) {
  return code_sum_scalar(lut, M, c0);
}
#endif

inline int64_t load_id(const uint8_t* ids, int64_t j) {
  int64_t v;
  std::memcpy(&v, ids + 8 * j, sizeof v);
  return v;
}

inline bool excluded(const int64_t* exclude, int64_t n_exclude, int64_t id) {
  return n_exclude > 0 && std::binary_search(exclude, exclude + n_exclude, id);
}

// Scans one list segment of n codes into the heap; base is added to each sum.
template <bool kIP>
void scan_segment(const float* lut, int64_t M, const uint8_t* codes, const uint8_t* ids, int64_t n,
                  float base, const int64_t* exclude, int64_t n_exclude, TopK<kIP>& heap) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const uint8_t* c = codes + j * M;
    float s[4];
    code_sums4(lut, M, c, c + M, c + 2 * M, c + 3 * M, s);
    for (int u = 0; u < 4; ++u) {
      const float v = base + s[u];
      const int64_t id = load_id(ids, j + u);
      // the exclusion test runs only for the few codes that would enter
      if (heap.admits(v, id) && !excluded(exclude, n_exclude, id)) heap.push(v, id);
    }
  }
  for (; j < n; ++j) {
    const float v = base + code_sum(lut, M, codes + j * M);
    const int64_t id = load_id(ids, j);
    if (heap.admits(v, id) && !excluded(exclude, n_exclude, id)) heap.push(v, id);
  }
}

template <bool kIP>
void search_impl(const PQCodec& c, const float* q, int64_t nq, const float* assign_D,
                 const int64_t* assign_I, int64_t nprobe, const ListRun* runs, int64_t nruns,
                 const int64_t* exclude, int64_t n_exclude, int64_t k, int64_t max_copies, float* D,
                 int64_t* I) {
  // an id held max_copies times: the best entry of each of the k best ids is among
  // the max_copies * (k - 1) + 1 best entries
  const int64_t kh = max_copies * (k - 1) + 1;
#pragma omp parallel if (nq > 1)
  {
    std::vector<float> lut(static_cast<size_t>(c.M * kKsub));
    std::vector<float> residual(static_cast<size_t>(c.d));
    std::vector<float> heap_D(static_cast<size_t>(kh));
    std::vector<int64_t> heap_I(static_cast<size_t>(kh));
    SortScratch scratch;
#pragma omp for schedule(dynamic, 2)
    for (int64_t i = 0; i < nq; ++i) {
      const float* qi = q + i * c.d;
      TopK<kIP> heap(heap_D.data(), heap_I.data(), kh);
      if (kIP) make_lut<false>(c, qi, lut.data());
      for (int64_t p = 0; p < nprobe; ++p) {
        const int64_t l = assign_I[i * nprobe + p];
        if (l < 0) continue;
        float base = 0.0f;
        if (kIP) {
          base = assign_D[i * nprobe + p];
        } else {
          const float* cl = c.coarse + l * c.d;
          for (int64_t t = 0; t < c.d; ++t) residual[t] = qi[t] - cl[t];
          make_lut<true>(c, residual.data(), lut.data());
        }
        for (int64_t r = 0; r < nruns; ++r) {
          const ListRun& run = runs[r];
          const int64_t n = run.count[l];
          if (n == 0) continue;
          scan_segment<kIP>(lut.data(), c.M, run.codes + run.codes_off[l], run.ids + run.ids_off[l],
                            n, base, exclude, n_exclude, heap);
        }
      }
      heap.sorted(D + i * k, I + i * k, k, max_copies > 1, scratch);
    }
  }
}

}  // namespace

std::string check_list_run(const ListRun& run, int64_t nlist, int64_t code_size,
                           int64_t codes_bytes, int64_t ids_bytes) {
  for (int64_t l = 0; l < nlist; ++l) {
    const int64_t n = run.count[l], co = run.codes_off[l], io = run.ids_off[l];
    if (n < 0 || co < 0 || io < 0)
      return "list " + std::to_string(l) + ": negative count or offset";
    if (n > 0 && (n > (codes_bytes - co) / code_size || n > (ids_bytes - io) / 8 ||
                  co > codes_bytes || io > ids_bytes)) {
      return "list " + std::to_string(l) + ": " + std::to_string(n) +
             " entries run past the end of the buffers";
    }
  }
  return "";
}

void ivfpq8_search(const PQCodec& codec, const float* q, int64_t nq, const float* assign_D,
                   const int64_t* assign_I, int64_t nprobe, const ListRun* runs, int64_t nruns,
                   const int64_t* exclude, int64_t n_exclude, int64_t k, int64_t max_copies,
                   float* D, int64_t* I) {
  if (codec.inner_product) {
    search_impl<true>(codec, q, nq, assign_D, assign_I, nprobe, runs, nruns, exclude, n_exclude, k,
                      max_copies, D, I);
  } else {
    search_impl<false>(codec, q, nq, assign_D, assign_I, nprobe, runs, nruns, exclude, n_exclude, k,
                       max_copies, D, I);
  }
}

void copy_segments(const uint8_t* src, uint8_t* dst, const int64_t* src_off, const int64_t* dst_off,
                   const int64_t* nbytes, int64_t nseg) {
  for (int64_t i = 0; i < nseg; ++i) {
    if (nbytes[i] > 0)
      std::memcpy(dst + dst_off[i], src + src_off[i], static_cast<size_t>(nbytes[i]));
  }
}

}  // namespace FASTFACE_ISA_NS
}  // namespace fastface
