// The CUDA kernels' per-thread code, run on the CPU: every block of the grid
// in turn (blocks in parallel over OpenMP threads), every thread of a block
// one after another in each phase (HostExec). Used by the tests to check the
// kernels' arithmetic and block algorithms against the CPU paths without a GPU.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <random>
#include <stdexcept>
#include <vector>

#include "launch.h"

namespace fastface {
namespace cuda {

bool is_device() { return false; }
int device_count() { return -1; }
DeviceInfo device_info(int) { throw std::invalid_argument("the emulation has no CUDA device"); }
void synchronize(uintptr_t) {}

namespace {

std::atomic<int> g_order{0};

// The thread order of block `b` (empty: forward).
std::vector<int> thread_order(int64_t b) {
  const int order = g_order.load();
  if (order == 0) return {};
  std::vector<int> perm(kThreads);
  std::iota(perm.begin(), perm.end(), 0);
  if (order == 1) {
    std::reverse(perm.begin(), perm.end());
  } else {
    std::mt19937 rng(static_cast<uint32_t>(b * 2654435761u + 12345u));
    std::shuffle(perm.begin(), perm.end(), rng);
  }
  return perm;
}

HostExec exec_for(const std::vector<int>& perm) {
  return HostExec{kThreads, perm.empty() ? nullptr : perm.data()};
}

}  // namespace

void set_thread_order(int order) {
  if (order < 0 || order > 2) throw std::invalid_argument("thread order must be 0, 1 or 2");
  g_order.store(order);
}

void launch_align(const AlignArgs& a, uintptr_t) {
  const int64_t total = a.F * a.out_h * a.out_w;
#pragma omp parallel for schedule(static)
  for (int64_t gid = 0; gid < total; ++gid) align_thread(a, gid);
}

void launch_select(const SelectArgs& a, uintptr_t) {
  const size_t bytes = topk_shared_bytes(a.k, kThreads);
#pragma omp parallel
  {
    std::vector<int64_t> smem((bytes + 7) / 8);
#pragma omp for schedule(dynamic)
    for (int64_t row = 0; row < a.rows; ++row) {
      const std::vector<int> perm = thread_order(row);
      select_block(exec_for(perm), a, row, reinterpret_cast<unsigned char*>(smem.data()));
    }
  }
}

size_t scan_shared_need(const ScanArgs& a, bool half) {
  return scan_shared_bytes(a.M, a.ksub, a.d, half, a.k, kThreads);
}

template <int NBITS, bool HALF>
void run_scan(const ScanArgs& a) {
  const size_t bytes = scan_shared_need(a, HALF);
  const int64_t blocks = a.nq * a.nsplit;
#pragma omp parallel
  {
    std::vector<int64_t> smem((bytes + 7) / 8);
#pragma omp for schedule(dynamic)
    for (int64_t b = 0; b < blocks; ++b) {
      const std::vector<int> perm = thread_order(b);
      scan_block<NBITS, HALF>(exec_for(perm), a, b / a.nsplit, static_cast<int>(b % a.nsplit),
                              reinterpret_cast<unsigned char*>(smem.data()));
    }
  }
}

void launch_scan(const ScanArgs& a, int nbits, bool half, uintptr_t) {
  if (nbits == 8) {
    half ? run_scan<8, true>(a) : run_scan<8, false>(a);
  } else if (nbits == 4) {
    half ? run_scan<4, true>(a) : run_scan<4, false>(a);
  } else {
    throw std::invalid_argument("nbits must be 4 or 8");
  }
}

}  // namespace cuda
}  // namespace fastface
