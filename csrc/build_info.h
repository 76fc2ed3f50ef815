// What the native module was built with.
#pragma once

#include <string>

namespace fastface {

struct BuildInfo {
  std::string compiler;
  std::string cxx_flags;
  std::string build_type;
  std::string simd;          // SIMD level of the module's baseline (compile time)
  std::string simd_variants;  // levels the hot kernels were compiled for
  std::string simd_selected;  // the level dispatched to on this CPU
  int openmp_version;        // _OPENMP macro, 0 without OpenMP
  int omp_max_threads;       // omp_get_max_threads() at the time of the call
  bool cuda_built;
  std::string cuda_version;  // nvcc version the kernels were built with, empty otherwise
  int cuda_device_count;     // -1 when CUDA was not built
};

BuildInfo build_info();

// Defined in csrc/cuda/ when CUDA is built; returns the number of visible
// devices, 0 when the driver or devices are missing.
int cuda_device_count();

}  // namespace fastface
