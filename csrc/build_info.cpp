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
#if FASTFACE_WITH_CUDA
  info.cuda_built = true;
  info.cuda_version = FASTFACE_CUDA_VERSION;
  info.cuda_device_count = cuda_device_count();
#else
  info.cuda_built = false;
  info.cuda_version = "";
  info.cuda_device_count = -1;
#endif
  return info;
}

}  // namespace fastface
