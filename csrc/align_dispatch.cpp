// Run-time choice among the align kernels compiled for several x86-64
// levels (see CMakeLists.txt). A portable build carries v2 (the baseline
// every x86-64 CPU since 2009 has), v3 (AVX2 + FMA) and v4 (AVX-512); the
// first call picks the highest level the CPU supports, or a lower one named
// by the environment variable FASTFACE_ISA (for tests and comparisons).
// Every variant is compiled with -ffp-contract=off, so all give the same
// bytes: the float kernel's fused multiply-adds are explicit std::fma calls.
#include <cstdlib>
#include <cstring>

#include "align.h"
#include "dispatch.h"

#define FASTFACE_DECLARE_ALIGN(NS)                                                               \
  namespace NS {                                                                                 \
  void warp_affine_u8(const ImageView* images, const int64_t* image_index, const double* M,      \
                      int64_t F, int64_t out_h, int64_t out_w, bool fixed_point, int threads,    \
                      uint8_t* out);                                                             \
  void warp_affine_f32_nchw(const ImageView* images, const int64_t* image_index, const double* M, \
                            int64_t F, int64_t out_h, int64_t out_w, const float* mean,          \
                            const float* std, const int* channel, bool fixed_point, int threads, \
                            float* out);                                                         \
  }

namespace fastface {

#if FASTFACE_DISPATCH
FASTFACE_DECLARE_ALIGN(v2)
FASTFACE_DECLARE_ALIGN(v3)
FASTFACE_DECLARE_ALIGN(v4)
#else
FASTFACE_DECLARE_ALIGN(FASTFACE_ISA_NS)
#endif

namespace {

using WarpU8 = decltype(&warp_affine_u8);
using WarpF32 = decltype(&warp_affine_f32_nchw);

struct Variant {
  const char* name;
  WarpU8 u8;
  WarpF32 f32;
};

#if FASTFACE_DISPATCH
int cpu_level() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return 4;
  if (__builtin_cpu_supports("x86-64-v3")) return 3;
  return 2;
}

Variant choose() {
  int level = cpu_level();
  const char* want = std::getenv("FASTFACE_ISA");
  if (want != nullptr) {
    // only ever lowers the level: a variant the CPU cannot run is never taken
    if (std::strcmp(want, "v2") == 0 && level > 2) level = 2;
    if (std::strcmp(want, "v3") == 0 && level > 3) level = 3;
  }
  if (level >= 4) return {"x86-64-v4", &v4::warp_affine_u8, &v4::warp_affine_f32_nchw};
  if (level == 3) return {"x86-64-v3", &v3::warp_affine_u8, &v3::warp_affine_f32_nchw};
  return {"x86-64-v2", &v2::warp_affine_u8, &v2::warp_affine_f32_nchw};
}
#else
Variant choose() {
  return {FASTFACE_ISA_NAME, &FASTFACE_ISA_NS::warp_affine_u8,
          &FASTFACE_ISA_NS::warp_affine_f32_nchw};
}
#endif

const Variant& selected() {
  static const Variant v = choose();  // thread-safe initialisation (C++11)
  return v;
}

}  // namespace

const char* align_isa() { return selected().name; }

const char* align_isa_variants() {
#if FASTFACE_DISPATCH
  return "x86-64-v2,x86-64-v3,x86-64-v4";
#else
  return FASTFACE_ISA_NAME;
#endif
}

void warp_affine_u8(const ImageView* images, const int64_t* image_index, const double* M,
                    int64_t F, int64_t out_h, int64_t out_w, bool fixed_point, int threads,
                    uint8_t* out) {
  selected().u8(images, image_index, M, F, out_h, out_w, fixed_point, threads, out);
}

void warp_affine_f32_nchw(const ImageView* images, const int64_t* image_index, const double* M,
                          int64_t F, int64_t out_h, int64_t out_w, const float* mean,
                          const float* std, const int* channel, bool fixed_point, int threads,
                          float* out) {
  selected().f32(images, image_index, M, F, out_h, out_w, mean, std, channel, fixed_point,
                 threads, out);
}

}  // namespace fastface
