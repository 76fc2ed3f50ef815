// CUDA kernels: thin wrappers that run the per-thread code of the headers
// with threadIdx/blockIdx (DeviceExec), and their launchers.
#include <cuda_runtime.h>

#include <new>
#include <stdexcept>
#include <string>

#include "check.h"
#include "launch.h"

namespace fastface {
namespace cuda {

void throw_cuda_error(int code, const char* name, const char* message, const char* what,
                      const char* file, int line) {
  const std::string text = std::string(name) + " (" + message + ") in " + what + " at " + file +
                           ":" + std::to_string(line);
  if (code == static_cast<int>(cudaErrorMemoryAllocation)) throw std::bad_alloc();
  throw CudaError(text);
}

namespace {

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

__global__ void align_kernel(AlignArgs a) {
  const int64_t total = a.F * a.out_h * a.out_w;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; gid < total;
       gid += step) {
    align_thread(a, gid);
  }
}

__global__ void select_kernel(SelectArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  select_block(DeviceExec{}, a, static_cast<int64_t>(blockIdx.x), smem);
}

template <int NBITS, bool HALF>
__global__ void __launch_bounds__(kThreads) scan_kernel(ScanArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t b = blockIdx.x;
  scan_block<NBITS, HALF>(DeviceExec{}, a, b / a.nsplit, static_cast<int>(b % a.nsplit), smem);
}

int current_device() {
  int dev = 0;
  FF_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

int optin_shared(int dev) {
  int v = 0;
  FF_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return v;
}

template <class Kernel>
void allow_shared(Kernel k, size_t bytes) {
  if (bytes > 48 * 1024) {
    FF_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(bytes)));
  }
}

}  // namespace

bool is_device() { return true; }

void set_thread_order(int) {
  throw std::invalid_argument("set_thread_order: the GPU runs threads in its own order");
}

int device_count() {
  int n = 0;
  // a machine without a driver or device answers with an error: report none
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

DeviceInfo device_info(int device) {
  cudaDeviceProp p;
  FF_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  DeviceInfo d;
  d.name = p.name;
  d.major = p.major;
  d.minor = p.minor;
  d.sm_count = p.multiProcessorCount;
  d.total_memory = static_cast<int64_t>(p.totalGlobalMem);
  d.bus_width = p.memoryBusWidth;
  FF_CUDA_CHECK(cudaDeviceGetAttribute(&d.memory_clock_khz, cudaDevAttrMemoryClockRate, device));
  d.l2_bytes = p.l2CacheSize;
  d.shared_per_block_optin = static_cast<int>(p.sharedMemPerBlockOptin);
  return d;
}

void synchronize(uintptr_t stream) { FF_CUDA_CHECK(cudaStreamSynchronize(as_stream(stream))); }

void launch_align(const AlignArgs& a, uintptr_t stream) {
  const int64_t total = a.F * a.out_h * a.out_w;
  if (total == 0) return;
  const int threads = 256;
  const int64_t want = (total + threads - 1) / threads;
  const int blocks = static_cast<int>(want < (1 << 30) ? want : (1 << 30));
  align_kernel<<<blocks, threads, 0, as_stream(stream)>>>(a);
  FF_CUDA_CHECK(cudaGetLastError());
}

void launch_select(const SelectArgs& a, uintptr_t stream) {
  if (a.rows == 0) return;
  if (a.k < 1 || a.k > kMaxK) throw std::invalid_argument("select: k out of range");
  const size_t bytes = topk_shared_bytes(a.k, kThreads);
  if (bytes > static_cast<size_t>(optin_shared(current_device()))) {
    throw std::invalid_argument("select: k too large for the device's shared memory");
  }
  allow_shared(select_kernel, bytes);
  select_kernel<<<static_cast<unsigned>(a.rows), kThreads, bytes, as_stream(stream)>>>(a);
  FF_CUDA_CHECK(cudaGetLastError());
}

size_t scan_shared_need(const ScanArgs& a, bool half) {
  const size_t bytes = scan_shared_bytes(a.M, a.ksub, a.d, half, a.k, kThreads);
  return bytes <= static_cast<size_t>(optin_shared(current_device())) ? bytes : 0;
}

template <int NBITS, bool HALF>
void run_scan(const ScanArgs& a, uintptr_t stream) {
  const size_t bytes = scan_shared_bytes(a.M, a.ksub, a.d, HALF, a.k, kThreads);
  if (bytes > static_cast<size_t>(optin_shared(current_device()))) {
    throw std::invalid_argument(
        "scan: look-up table and top-k do not fit in shared memory; lower k or use "
        "lut='float16'");
  }
  allow_shared(scan_kernel<NBITS, HALF>, bytes);
  const int64_t blocks = a.nq * a.nsplit;
  if (blocks == 0) return;
  scan_kernel<NBITS, HALF>
      <<<static_cast<unsigned>(blocks), kThreads, bytes, as_stream(stream)>>>(a);
  FF_CUDA_CHECK(cudaGetLastError());
}

void launch_scan(const ScanArgs& a, int nbits, bool half, uintptr_t stream) {
  if (nbits == 8) {
    half ? run_scan<8, true>(a, stream) : run_scan<8, false>(a, stream);
  } else if (nbits == 4) {
    half ? run_scan<4, true>(a, stream) : run_scan<4, false>(a, stream);
  } else {
    throw std::invalid_argument("nbits must be 4 or 8");
  }
}

}  // namespace cuda
}  // namespace fastface
