// Launchers shared by fastface._cuda (CUDA kernels) and fastface._cuda_emu
// (the same per-thread code run on the CPU). Pointers are device pointers in
// the first, host pointers in the second; the Python side validated every
// array (dtype, shape, contiguity) before calling. `stream` is a cudaStream_t
// (0: the default stream) and is ignored by the emulation. Launches are
// asynchronous on the GPU; errors raise through FF_CUDA_CHECK with the file
// and line.
#pragma once

#include <cstdint>
#include <string>

#include "align_kernel.cuh"
#include "ivfpq_kernel.cuh"
#include "topk.cuh"

namespace fastface {
namespace cuda {

// True in the CUDA module, false in the emulation.
bool is_device();

// Number of visible CUDA devices (0 without a driver or device); -1 in the emulation.
int device_count();

// Name, compute capability, multiprocessors, memory (bytes), memory bus
// width (bits), memory clock (kHz), L2 bytes, max shared memory per block (opt-in).
struct DeviceInfo {
  std::string name;
  int major = 0, minor = 0, sm_count = 0;
  int64_t total_memory = 0;
  int bus_width = 0, memory_clock_khz = 0, l2_bytes = 0, shared_per_block_optin = 0;
};
DeviceInfo device_info(int device);

void synchronize(uintptr_t stream);

// Emulation only: the order in which a block's threads run each phase:
// 0 forward, 1 reversed, 2 shuffled (a different permutation per block).
// The CUDA module rejects it.
void set_thread_order(int order);

void launch_align(const AlignArgs& args, uintptr_t stream);

// Top-k of each row; k <= kMaxK.
void launch_select(const SelectArgs& args, uintptr_t stream);

// IVF-PQ scan; nbits 4 or 8; half: float16 look-up tables.
void launch_scan(const ScanArgs& args, int nbits, bool half, uintptr_t stream);

// Shared memory the scan needs per block (bytes); 0 if it does not fit the device.
size_t scan_shared_need(const ScanArgs& args, bool half);

constexpr int kMaxK = 2048;
constexpr int kThreads = 256;

}  // namespace cuda
}  // namespace fastface
