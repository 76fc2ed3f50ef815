#include "rerank.h"

#include <cstring>
#include <vector>

#include "topk.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

// Compiled once per instruction-set level (FASTFACE_ISA_NS names the variant);
// csrc/dispatch.cpp picks one at run time. Every level computes the same bits:
// each of the 32 lanes is a sequence of float32 multiplies and adds in the same
// order (no fused multiply-add; the build uses -ffp-contract=off), whatever
// registers hold the lanes.
#ifndef FASTFACE_ISA_NS
#define FASTFACE_ISA_NS native
#endif

namespace fastface {
namespace FASTFACE_ISA_NS {

namespace {

constexpr int64_t kLanes = 32;
constexpr int64_t kPrefetchAhead = 16;  // candidates whose rows are fetched ahead

// float16 bits to float32, exactly, with integer operations only (subnormals are
// normalised here, so the result does not depend on the CPU's denormal modes).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // mant * 2^-24: shift until the leading bit reaches bit 10
      uint32_t e = 113;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --e;
      }
      bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// 32 float32 lanes and the operations the score needs, one implementation per level.
#if defined(__AVX512F__) && defined(__AVX512DQ__)
struct Lanes {
  __m512 a0, a1;
};
inline Lanes lanes_zero() { return {_mm512_setzero_ps(), _mm512_setzero_ps()}; }
inline Lanes load(const float* p) { return {_mm512_loadu_ps(p), _mm512_loadu_ps(p + 16)}; }
inline Lanes load(const uint16_t* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
          _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)))};
}
inline void mul_add(Lanes& acc, const Lanes& x, const Lanes& y) {
  acc.a0 = _mm512_add_ps(acc.a0, _mm512_mul_ps(x.a0, y.a0));
  acc.a1 = _mm512_add_ps(acc.a1, _mm512_mul_ps(x.a1, y.a1));
}
inline float reduce8(__m256 u) {
  __m128 w = _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));  // h = 4
  w = _mm_add_ps(w, _mm_movehl_ps(w, w));                                         // h = 2
  w = _mm_add_ss(w, _mm_shuffle_ps(w, w, 1));                                     // h = 1
  return _mm_cvtss_f32(w);
}
inline float reduce(const Lanes& acc) {
  const __m512 t = _mm512_add_ps(acc.a0, acc.a1);  // h = 16
  return reduce8(_mm256_add_ps(_mm512_castps512_ps256(t), _mm512_extractf32x8_ps(t, 1)));
}
#elif defined(__AVX2__) && defined(__F16C__)
struct Lanes {
  __m256 a0, a1, a2, a3;
};
inline Lanes lanes_zero() {
  const __m256 z = _mm256_setzero_ps();
  return {z, z, z, z};
}
inline Lanes load(const float* p) {
  return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8), _mm256_loadu_ps(p + 16),
          _mm256_loadu_ps(p + 24)};
}
inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline Lanes load(const uint16_t* p) {
  return {load8(p), load8(p + 8), load8(p + 16), load8(p + 24)};
}
inline void mul_add(Lanes& acc, const Lanes& x, const Lanes& y) {
  acc.a0 = _mm256_add_ps(acc.a0, _mm256_mul_ps(x.a0, y.a0));
  acc.a1 = _mm256_add_ps(acc.a1, _mm256_mul_ps(x.a1, y.a1));
  acc.a2 = _mm256_add_ps(acc.a2, _mm256_mul_ps(x.a2, y.a2));
  acc.a3 = _mm256_add_ps(acc.a3, _mm256_mul_ps(x.a3, y.a3));
}
inline float reduce(const Lanes& acc) {
  // h = 16: lanes 0-7 + 16-23 and 8-15 + 24-31; h = 8: those two added
  const __m256 u = _mm256_add_ps(_mm256_add_ps(acc.a0, acc.a2), _mm256_add_ps(acc.a1, acc.a3));
  __m128 w = _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));  // h = 4
  w = _mm_add_ps(w, _mm_movehl_ps(w, w));                                         // h = 2
  w = _mm_add_ss(w, _mm_shuffle_ps(w, w, 1));                                     // h = 1
  return _mm_cvtss_f32(w);
}
#else
struct Lanes {
  float a[kLanes];
};
inline Lanes lanes_zero() {
  Lanes z;
  for (int64_t l = 0; l < kLanes; ++l) z.a[l] = 0.0f;
  return z;
}
inline Lanes load(const float* p) {
  Lanes v;
  for (int64_t l = 0; l < kLanes; ++l) v.a[l] = p[l];
  return v;
}
inline Lanes load(const uint16_t* p) {
  Lanes v;
  for (int64_t l = 0; l < kLanes; ++l) v.a[l] = half_to_float(p[l]);
  return v;
}
inline void mul_add(Lanes& acc, const Lanes& x, const Lanes& y) {
  for (int64_t l = 0; l < kLanes; ++l) acc.a[l] = acc.a[l] + x.a[l] * y.a[l];
}
inline float reduce(const Lanes& acc) {
  float a[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) a[l] = acc.a[l];
  for (int64_t h = kLanes / 2; h >= 1; h /= 2) {
    for (int64_t l = 0; l < h; ++l) a[l] = a[l] + a[l + h];
  }
  return a[0];
}
#endif

// Inner product (and |v|^2 for L2) of the zero-padded query with one row.
// NB > 0: the row has exactly NB blocks of 32 (d = 32 * NB), unrolled at compile
// time; NB == 0: nfull full blocks and, when tail > 0, a last partial block read
// through a zero-padded buffer (never past the end of the row).
template <int NB, bool kL2, class T>
inline float score_row(const float* qpad, const T* v, int64_t nfull, int64_t tail, float qq) {
  Lanes dot = lanes_zero();
  Lanes sq = lanes_zero();
  const int64_t blocks = NB > 0 ? NB : nfull;
  for (int64_t b = 0; b < blocks; ++b) {
    const Lanes x = load(v + b * kLanes);
    mul_add(dot, load(qpad + b * kLanes), x);
    if (kL2) mul_add(sq, x, x);
  }
  if (NB == 0 && tail > 0) {
    T buf[kLanes];
    std::memset(static_cast<void*>(buf), 0, sizeof buf);
    std::memcpy(static_cast<void*>(buf), v + blocks * kLanes,
                static_cast<size_t>(tail) * sizeof(T));
    const Lanes x = load(buf);
    mul_add(dot, load(qpad + blocks * kLanes), x);
    if (kL2) mul_add(sq, x, x);
  }
  const float s = reduce(dot);
  if (!kL2) return s;
  return (qq - 2.0f * s) + reduce(sq);
}

template <class T>
inline void prefetch_row(const T* row, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 3);
  __builtin_prefetch(p + bytes - 1, 0, 3);
}

template <int NB, bool kL2, class T>
void rerank_impl(const float* q, int64_t nq, const T* base, int64_t n, int64_t d,
                 const int64_t* cand, int64_t m, const RowMap& map, int64_t k, float* D,
                 int64_t* I) {
  const int64_t nfull = d / kLanes, tail = d % kLanes;
  const int64_t dpad = (nfull + (tail ? 1 : 0)) * kLanes;
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
#pragma omp parallel if (nq > 1)
  {
    std::vector<float> qpad(static_cast<size_t>(dpad), 0.0f);
    std::vector<int64_t> rows(static_cast<size_t>(m));
    std::vector<float> heap_D(static_cast<size_t>(k));
    std::vector<int64_t> heap_I(static_cast<size_t>(k));
    SortScratch scratch;
#pragma omp for schedule(dynamic, 8)
    for (int64_t i = 0; i < nq; ++i) {
      std::memcpy(qpad.data(), q + i * d, static_cast<size_t>(d) * sizeof(float));
      float qq = 0.0f;
      if (kL2) qq = score_row<0, false, float>(qpad.data(), qpad.data(), dpad / kLanes, 0, 0.0f);
      // resolve every candidate's row first: independent loads the CPU overlaps
      const int64_t* ci = cand + i * m;
      for (int64_t c = 0; c < m; ++c) {
        int64_t r = -1;
        if (map.rows != nullptr) {
          r = map.rows[i * m + c];
        } else if (ci[c] >= 0) {
          const int64_t t = ci[c] - map.lo;
          if (t >= 0 && t < map.span) r = map.table != nullptr ? map.table[t] : t;
        }
        rows[c] = (r >= 0 && r < n && ci[c] >= 0) ? r : -1;
      }
      for (int64_t c = 0; c < m && c < kPrefetchAhead; ++c) {
        if (rows[c] >= 0) prefetch_row(base + rows[c] * d, row_bytes);
      }
      TopK<!kL2> heap(heap_D.data(), heap_I.data(), k);
      for (int64_t c = 0; c < m; ++c) {
        const int64_t ahead = c + kPrefetchAhead;
        if (ahead < m && rows[ahead] >= 0) prefetch_row(base + rows[ahead] * d, row_bytes);
        const int64_t r = rows[c];
        if (r < 0) continue;
        const float s = score_row<NB, kL2, T>(qpad.data(), base + r * d, nfull, tail, qq);
        if (heap.admits(s, ci[c])) heap.push(s, ci[c]);
      }
      heap.sorted(D + i * k, I + i * k, k, false, scratch);
    }
  }
}

template <bool kL2, class T>
void rerank_d(const float* q, int64_t nq, const T* base, int64_t n, int64_t d, const int64_t* cand,
              int64_t m, const RowMap& map, int64_t k, float* D, int64_t* I) {
  // the dimensions of common embeddings get a kernel with the loop count fixed
  switch (d % kLanes == 0 ? d / kLanes : 0) {
    case 1:
      return rerank_impl<1, kL2, T>(q, nq, base, n, d, cand, m, map, k, D, I);
    case 2:
      return rerank_impl<2, kL2, T>(q, nq, base, n, d, cand, m, map, k, D, I);
    case 3:
      return rerank_impl<3, kL2, T>(q, nq, base, n, d, cand, m, map, k, D, I);
    case 4:
      return rerank_impl<4, kL2, T>(q, nq, base, n, d, cand, m, map, k, D, I);
    case 8:
      return rerank_impl<8, kL2, T>(q, nq, base, n, d, cand, m, map, k, D, I);
    case 16:
      return rerank_impl<16, kL2, T>(q, nq, base, n, d, cand, m, map, k, D, I);
    default:
      return rerank_impl<0, kL2, T>(q, nq, base, n, d, cand, m, map, k, D, I);
  }
}

}  // namespace

void rerank(const float* q, int64_t nq, const VectorTable& base, const int64_t* cand, int64_t m,
            const RowMap& map, bool l2, int64_t k, float* D, int64_t* I) {
  if (base.f16) {
    const auto* b = static_cast<const uint16_t*>(base.data);
    if (l2) return rerank_d<true>(q, nq, b, base.n, base.d, cand, m, map, k, D, I);
    return rerank_d<false>(q, nq, b, base.n, base.d, cand, m, map, k, D, I);
  }
  const auto* b = static_cast<const float*>(base.data);
  if (l2) return rerank_d<true>(q, nq, b, base.n, base.d, cand, m, map, k, D, I);
  return rerank_d<false>(q, nq, b, base.n, base.d, cand, m, map, k, D, I);
}

}  // namespace FASTFACE_ISA_NS
}  // namespace fastface
