#include <cuda_runtime.h>

#include "build_info.h"

namespace fastface {

int cuda_device_count() {
  int n = 0;
  // a machine without a driver or device answers with an error: report none
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace fastface
