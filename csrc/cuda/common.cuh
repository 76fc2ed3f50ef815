// Shared by the CUDA kernels and their CPU emulation.
//
// Everything a kernel's thread computes is written once, in __host__
// __device__ functions (FF_HD). nvcc compiles them into the kernels of
// fastface._cuda; g++ compiles the same headers into fastface._cuda_emu,
// which runs every block of the grid on the CPU, one thread after another.
//
// A block's program is written against an execution policy `Exec`:
//   ex.threads(f)        runs f(tid) for every thread of the block, with a
//                        barrier before and after (on the GPU: each thread
//                        runs f(threadIdx.x) between two __syncthreads()).
//   ex.atomic_add(p, v)  shared-memory atomicAdd (returns the old value).
// Control flow outside ex.threads must be block-uniform: on the GPU every
// thread executes it, in the emulation it runs once per block. Values read
// there come from shared memory written in an earlier ex.threads phase, so
// the barriers make them the same for every thread.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define FF_HD __host__ __device__ __forceinline__
#else
#define FF_HD inline
#endif
#include <cmath>

namespace fastface {
namespace cuda {

// --- float16 <-> float32, bit exact on both sides (round to nearest even) ------------------
FF_HD float half_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1Fu) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    exp = 113u;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3FFu) << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
#endif
}

FF_HD uint16_t float_to_half_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return sign | (ax > 0x7F800000u ? 0x7E00u : 0x7C00u);  // NaN / inf
  if (ax >= 0x477FF000u) return sign | 0x7C00u;  // rounds to above 65504: inf
  if (ax >= 0x38800000u) {                       // normal half
    const uint32_t mant = ax & 0x7FFFFFu;
    const uint32_t exp = (ax >> 23) - 112u;
    uint32_t h = (exp << 10) | (mant >> 13);
    const uint32_t rest = mant & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent
    return sign | static_cast<uint16_t>(h);
  }
  if (ax < 0x33000000u) return sign;  // below half the smallest subnormal: 0
  // subnormal half: value = m * 2^-24 with m = round(ax_value * 2^24)
  const uint32_t exp = ax >> 23;
  const uint32_t mant = (ax & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126u - exp;  // 14..24 bits dropped
  uint32_t h = mant >> shift;
  const uint32_t rest = mant & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  if (rest > halfway || (rest == halfway && (h & 1u))) ++h;
  return sign | static_cast<uint16_t>(h);
#endif
}

// --- ordering of (score, id) pairs: the library's one tie rule ----------------------------
// Better: the larger score (inner product) or the smaller (L2); equal scores:
// the lower id. An id < 0 is an empty slot and loses to every real entry.
FF_HD bool better(float s, int64_t i, float t, int64_t j, bool larger) {
  if (j < 0) return i >= 0;
  if (i < 0) return false;
  if (s != t) return larger ? s > t : s < t;
  return i < j;
}

FF_HD float infinity() {
#if defined(__CUDA_ARCH__)
  return __int_as_float(0x7F800000);
#else
  return HUGE_VALF;
#endif
}

FF_HD float worst_score(bool larger) { return larger ? -infinity() : infinity(); }

// --- execution policies ---------------------------------------------------------------------
#if defined(__CUDACC__)
struct DeviceExec {
  template <class F>
  __device__ __forceinline__ void threads(F&& f) const {
    __syncthreads();
    f(static_cast<int>(threadIdx.x));
    __syncthreads();
  }
  __device__ __forceinline__ int atomic_add(int* p, int v) const { return atomicAdd(p, v); }
  __device__ __forceinline__ int nthreads() const { return static_cast<int>(blockDim.x); }
};
#endif

// Runs a block's threads one after another. `perm`, when set, is the order
// (a permutation of 0..n-1): on the GPU, threads of a phase run in no fixed
// order, so a phase whose result depends on the order (a missing barrier) shows
// up as a difference between orders; the tests run forward, reversed and shuffled.
struct HostExec {
  int n;
  const int* perm = nullptr;
  template <class F>
  void threads(F&& f) const {
    for (int t = 0; t < n; ++t) f(perm != nullptr ? perm[t] : t);
  }
  int atomic_add(int* p, int v) const {
    const int old = *p;
    *p += v;
    return old;
  }
  int nthreads() const { return n; }
};

}  // namespace cuda
}  // namespace fastface
