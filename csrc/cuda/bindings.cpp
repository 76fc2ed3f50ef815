// Python bindings of the launchers (launch.h), compiled twice: into
// fastface._cuda with the CUDA launchers and into fastface._cuda_emu with the
// CPU emulation. Arrays arrive as raw pointers (device pointers for _cuda,
// host pointers for _cuda_emu) from fastface.gpu, which has checked their
// dtype, shape and contiguity and keeps them alive for the call; this file
// only converts, releases the GIL and maps exceptions.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <vector>

#include "check.h"
#include "launch.h"

namespace py = pybind11;
namespace fc = fastface::cuda;

namespace {

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void align(uintptr_t pixels, uintptr_t offset, uintptr_t height, uintptr_t width, uintptr_t stride,
           uintptr_t image_index, uintptr_t M, int64_t F, int64_t out_h, int64_t out_w,
           bool fixed_point, uintptr_t out_u8, uintptr_t out_f32, const std::array<float, 3>& mean,
           const std::array<float, 3>& std, const std::array<int, 3>& channel, uintptr_t stream) {
  fc::AlignArgs a{};
  a.pixels = ptr<const uint8_t>(pixels);
  a.offset = ptr<const int64_t>(offset);
  a.height = ptr<const int64_t>(height);
  a.width = ptr<const int64_t>(width);
  a.stride = ptr<const int64_t>(stride);
  a.image_index = ptr<const int64_t>(image_index);
  a.M = ptr<const double>(M);
  a.F = F;
  a.out_h = out_h;
  a.out_w = out_w;
  a.fixed_point = fixed_point;
  a.out_u8 = ptr<uint8_t>(out_u8);
  a.out_f32 = ptr<float>(out_f32);
  for (int c = 0; c < 3; ++c) {
    a.mean[c] = mean[c];
    a.std[c] = std[c];
    a.channel[c] = channel[c];
  }
  py::gil_scoped_release release;
  fc::launch_align(a, stream);
}

void select_topk(uintptr_t scores, uintptr_t ids, int64_t rows, int64_t n, int k, bool larger,
                 uintptr_t out_D, uintptr_t out_I, uintptr_t stream) {
  fc::SelectArgs a{ptr<const float>(scores), ptr<const int64_t>(ids), rows, n, k, larger,
                   ptr<float>(out_D),        ptr<int64_t>(out_I)};
  py::gil_scoped_release release;
  fc::launch_select(a, stream);
}

fc::ScanArgs scan_args(const py::dict& p) {
  fc::ScanArgs a{};
  auto u = [&](const char* key) { return p[key].cast<uintptr_t>(); };
  a.q = ptr<const float>(u("q"));
  a.coarse_I = ptr<const int64_t>(u("coarse_I"));
  a.coarse_D = ptr<const float>(u("coarse_D"));
  a.centroids = ptr<const float>(u("centroids"));
  a.codebook = ptr<const float>(u("codebook"));
  a.codes = ptr<const uint32_t>(u("codes"));
  a.live = ptr<const uint32_t>(u("live"));
  a.slot_ids = ptr<const int64_t>(u("slot_ids"));
  a.list_block = ptr<const int64_t>(u("list_block"));
  a.out_D = ptr<float>(u("out_D"));
  a.out_I = ptr<int64_t>(u("out_I"));
  a.nq = p["nq"].cast<int64_t>();
  a.d = p["d"].cast<int64_t>();
  a.M = p["M"].cast<int>();
  a.ksub = p["ksub"].cast<int>();
  a.dsub = p["dsub"].cast<int>();
  a.W = p["W"].cast<int>();
  a.nprobe = p["nprobe"].cast<int>();
  a.nsplit = p["nsplit"].cast<int>();
  a.k = p["k"].cast<int>();
  a.ip = p["ip"].cast<bool>();
  a.by_residual = p["by_residual"].cast<bool>();
  return a;
}

void scan(const py::dict& args, int nbits, bool half, uintptr_t stream) {
  const fc::ScanArgs a = scan_args(args);
  py::gil_scoped_release release;
  fc::launch_scan(a, nbits, half, stream);
}

size_t scan_shared_need(const py::dict& args, bool half) {
  return fc::scan_shared_need(scan_args(args), half);
}

py::dict device_info(int device) {
  const fc::DeviceInfo d = fc::device_info(device);
  py::dict out;
  out["name"] = d.name;
  out["compute_capability"] = py::make_tuple(d.major, d.minor);
  out["sm_count"] = d.sm_count;
  out["total_memory"] = d.total_memory;
  out["memory_bus_width_bits"] = d.bus_width;
  out["memory_clock_khz"] = d.memory_clock_khz;
  out["l2_bytes"] = d.l2_bytes;
  out["shared_per_block_optin"] = d.shared_per_block_optin;
  return out;
}

// float16 round trips through the kernels' own conversion (tests compare with NumPy).
std::vector<uint16_t> to_half(const std::vector<float>& x) {
  std::vector<uint16_t> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = fc::float_to_half_bits(x[i]);
  return out;
}

std::vector<float> from_half(const std::vector<uint16_t>& x) {
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = fc::half_bits_to_float(x[i]);
  return out;
}

}  // namespace

PYBIND11_MODULE(FASTFACE_MODULE_NAME, m) {
  m.doc() = "fastface GPU kernels (private; use fastface.gpu)";
  static py::exception<fc::CudaError> cuda_error(m, "CudaError", PyExc_RuntimeError);
  m.attr("MAX_K") = fc::kMaxK;
  m.attr("THREADS") = fc::kThreads;
  m.def("is_device", &fc::is_device);
  m.def("device_count", &fc::device_count);
  m.def("device_info", &device_info, py::arg("device") = 0);
  m.def("synchronize", [](uintptr_t s) {
    py::gil_scoped_release release;
    fc::synchronize(s);
  });
  m.def("set_thread_order", &fc::set_thread_order, py::arg("order"));
  m.def("align", &align);
  m.def("select", &select_topk);
  m.def("scan", &scan);
  m.def("scan_shared_need", &scan_shared_need);
  m.def("to_half", &to_half);
  m.def("from_half", &from_half);
}
