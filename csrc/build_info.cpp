#include "build_info.h"

#include <omp.h>

#include "dispatch.h"

namespace fastface {

namespace {

const char* simd_level() {
#if defined(__AVX512F__)
  return "AVX512";
#elif defined(__AVX2__)
  return "AVX2";
#elif defined(__AVX__)
  return "AVX";
#elif defined(__SSE4_2__)
  return "SSE4.2";
#elif defined(__ARM_NEON)
  return "NEON";
#else
  return "generic";
#endif
}

}  // namespace

BuildInfo build_info() {
  BuildInfo info;
  info.compiler = FASTFACE_COMPILER;
  info.cxx_flags = FASTFACE_CXX_FLAGS;
  info.build_type = FASTFACE_BUILD_TYPE;
  info.simd = simd_level();
  info.simd_variants = align_isa_variants();
  info.simd_selected = align_isa();
#ifdef _OPENMP
  info.openmp_version = _OPENMP;
#else
  info.openmp_version = 0;
#endif
  info.omp_max_threads = omp_get_max_threads();
  // The CUDA kernels live in their own module; CMake tells this one whether
  // it built them, so that _C never links the CUDA runtime.
  info.cuda_built = FASTFACE_WITH_CUDA != 0;
  info.cuda_version = FASTFACE_CUDA_VERSION;
  info.cuda_archs = FASTFACE_CUDA_ARCHS;
  return info;
}

}  // namespace fastface
