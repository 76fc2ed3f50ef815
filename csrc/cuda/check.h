// One check for every CUDA runtime call: a failure throws with the call's
// file and line. Out-of-memory becomes std::bad_alloc (MemoryError in
// Python); everything else CudaError (fastface.gpu.CudaError, a RuntimeError).
#pragma once

#include <stdexcept>
#include <string>

namespace fastface {
namespace cuda {

class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Throws for `code` != 0 (cudaSuccess); `what` names the call.
void throw_cuda_error(int code, const char* name, const char* message, const char* what,
                      const char* file, int line);

}  // namespace cuda
}  // namespace fastface

#define FF_CUDA_CHECK(call)                                                                       \
  do {                                                                                            \
    const cudaError_t ff_err_ = (call);                                                           \
    if (ff_err_ != cudaSuccess) {                                                                 \
      ::fastface::cuda::throw_cuda_error(static_cast<int>(ff_err_), cudaGetErrorName(ff_err_),    \
                                         cudaGetErrorString(ff_err_), #call, __FILE__, __LINE__); \
    }                                                                                             \
  } while (0)
