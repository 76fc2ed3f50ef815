// What the native module was built with.
#pragma once

#include <string>

namespace fastface {

struct BuildInfo {
  std::string compiler;
  std::string cxx_flags;
  std::string build_type;
  std::string simd;           // SIMD level of the module's baseline (compile time)
  std::string simd_variants;  // levels the hot kernels were compiled for
  std::string simd_selected;  // the level dispatched to on this CPU
  int openmp_version;         // _OPENMP macro, 0 without OpenMP
  int omp_max_threads;        // omp_get_max_threads() at the time of the call
  bool cuda_built;            // whether the separate CUDA module (fastface._cuda) was built
  std::string cuda_version;   // nvcc version the kernels were built with, empty otherwise
  std::string cuda_archs;     // CMAKE_CUDA_ARCHITECTURES of that build, comma-separated
};

BuildInfo build_info();

}  // namespace fastface
