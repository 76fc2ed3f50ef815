// Run-time choice among the SIMD kernels (alignment, coarse assignment, the IVF-PQ scan,
// re-ranking)
// compiled for several x86-64 levels (see CMakeLists.txt). A portable build carries v2 (the
// baseline every x86-64 CPU since 2009 has), v3 (AVX2 + FMA) and v4 (AVX-512); the first call picks
// the highest level the CPU supports, or a lower one named by the environment variable FASTFACE_ISA
// (for tests and comparisons). Every variant is compiled with -ffp-contract=off, so all give the
// same bytes: the kernels' fused multiply-adds are explicit (std::fma or FMA intrinsics, which
// round alike).
#include "dispatch.h"

#include <cstdlib>
#include <cstring>

#include "align.h"
#include "coarse.h"
#include "ivfpq.h"
#include "rerank.h"

#define FASTFACE_DECLARE_ALIGN(NS)                                                                 \
  namespace NS {                                                                                   \
  void warp_affine_u8(const ImageView* images, const int64_t* image_index, const double* M,        \
                      int64_t F, int64_t out_h, int64_t out_w, bool fixed_point, int threads,      \
                      uint8_t* out);                                                               \
  void warp_affine_f32_nchw(const ImageView* images, const int64_t* image_index, const double* M,  \
                            int64_t F, int64_t out_h, int64_t out_w, const float* mean,            \
                            const float* std, const int* channel, bool fixed_point, int threads,   \
                            float* out);                                                           \
  std::string check_list_run(const ListRun& run, int64_t nlist, int64_t code_size,                 \
                             int64_t codes_bytes, int64_t ids_bytes);                              \
  void ivfpq8_search(const PQCodec& codec, const float* q, int64_t nq, const float* assign_D,      \
                     const int64_t* assign_I, int64_t nprobe, const ListRun* runs, int64_t nruns,  \
                     const int64_t* exclude, int64_t n_exclude, int64_t k, int64_t max_copies,     \
                     float* D, int64_t* I);                                                        \
  void rerank(const float* q, int64_t nq, const VectorTable& base, const int64_t* cand, int64_t m, \
              const RowMap& map, bool l2, int64_t k, float* D, int64_t* I);                        \
  void copy_segments(const uint8_t* src, uint8_t* dst, const int64_t* src_off,                     \
                     const int64_t* dst_off, const int64_t* nbytes, int64_t nseg);                 \
  void coarse_topk(const float* q, int64_t nq, int64_t d, const float* ct, int64_t n,              \
                   const float* cnorms, int64_t k, float* D, int64_t* I);                          \
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
using Search8 = decltype(&ivfpq8_search);
using Rerank = decltype(&rerank);
using Coarse = decltype(&coarse_topk);

struct Variant {
  const char* name;
  WarpU8 u8;
  WarpF32 f32;
  Search8 search8;
  Rerank rerank;
  Coarse coarse;
};

#define FASTFACE_VARIANT(NAME, NS)                                                         \
  Variant {                                                                                \
    NAME, &NS::warp_affine_u8, &NS::warp_affine_f32_nchw, &NS::ivfpq8_search, &NS::rerank, \
        &NS::coarse_topk                                                                   \
  }

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
  if (level >= 4) return FASTFACE_VARIANT("x86-64-v4", v4);
  if (level == 3) return FASTFACE_VARIANT("x86-64-v3", v3);
  return FASTFACE_VARIANT("x86-64-v2", v2);
}
#else
Variant choose() { return FASTFACE_VARIANT(FASTFACE_ISA_NAME, FASTFACE_ISA_NS); }
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

void warp_affine_u8(const ImageView* images, const int64_t* image_index, const double* M, int64_t F,
                    int64_t out_h, int64_t out_w, bool fixed_point, int threads, uint8_t* out) {
  selected().u8(images, image_index, M, F, out_h, out_w, fixed_point, threads, out);
}

void warp_affine_f32_nchw(const ImageView* images, const int64_t* image_index, const double* M,
                          int64_t F, int64_t out_h, int64_t out_w, const float* mean,
                          const float* std, const int* channel, bool fixed_point, int threads,
                          float* out) {
  selected().f32(images, image_index, M, F, out_h, out_w, mean, std, channel, fixed_point, threads,
                 out);
}

void ivfpq8_search(const PQCodec& codec, const float* q, int64_t nq, const float* assign_D,
                   const int64_t* assign_I, int64_t nprobe, const ListRun* runs, int64_t nruns,
                   const int64_t* exclude, int64_t n_exclude, int64_t k, int64_t max_copies,
                   float* D, int64_t* I) {
  selected().search8(codec, q, nq, assign_D, assign_I, nprobe, runs, nruns, exclude, n_exclude, k,
                     max_copies, D, I);
}

void rerank(const float* q, int64_t nq, const VectorTable& base, const int64_t* cand, int64_t m,
            const RowMap& map, bool l2, int64_t k, float* D, int64_t* I) {
  selected().rerank(q, nq, base, cand, m, map, l2, k, D, I);
}

void coarse_topk(const float* q, int64_t nq, int64_t d, const float* ct, int64_t n,
                 const float* cnorms, int64_t k, float* D, int64_t* I) {
  selected().coarse(q, nq, d, ct, n, cnorms, k, D, I);
}

// No SIMD in these two: the baseline variant serves every CPU.
#if FASTFACE_DISPATCH
std::string check_list_run(const ListRun& run, int64_t nlist, int64_t code_size,
                           int64_t codes_bytes, int64_t ids_bytes) {
  return v2::check_list_run(run, nlist, code_size, codes_bytes, ids_bytes);
}

void copy_segments(const uint8_t* src, uint8_t* dst, const int64_t* src_off, const int64_t* dst_off,
                   const int64_t* nbytes, int64_t nseg) {
  v2::copy_segments(src, dst, src_off, dst_off, nbytes, nseg);
}
#else
std::string check_list_run(const ListRun& run, int64_t nlist, int64_t code_size,
                           int64_t codes_bytes, int64_t ids_bytes) {
  return FASTFACE_ISA_NS::check_list_run(run, nlist, code_size, codes_bytes, ids_bytes);
}

void copy_segments(const uint8_t* src, uint8_t* dst, const int64_t* src_off, const int64_t* dst_off,
                   const int64_t* nbytes, int64_t nseg) {
  FASTFACE_ISA_NS::copy_segments(src, dst, src_off, dst_off, nbytes, nseg);
}
#endif

}  // namespace fastface
