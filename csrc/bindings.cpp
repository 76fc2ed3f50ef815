// The only file that includes pybind11: converts arrays that Python has
// already validated, releases the GIL around the core, allocates outputs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>

#include "build_info.h"
#include "merge.h"

namespace py = pybind11;

namespace {

using f32c = py::array_t<float, py::array::c_style>;
using i64c = py::array_t<int64_t, py::array::c_style>;

py::tuple merge_topk(const f32c& D, const i64c& I, int64_t k, bool larger_is_better) {
  const int64_t nshards = D.shape(0), nq = D.shape(1), k_in = D.shape(2);
  f32c out_D({nq, k});
  i64c out_I({nq, k});
  const float* d = D.data();
  const int64_t* i = I.data();
  float* od = out_D.mutable_data();
  int64_t* oi = out_I.mutable_data();
  {
    py::gil_scoped_release release;
    fastface::merge_topk(d, i, nshards, nq, k_in, k, larger_is_better, od, oi);
  }
  return py::make_tuple(out_D, out_I);
}

py::dict build_info() {
  const fastface::BuildInfo b = fastface::build_info();
  py::dict out;
  out["compiler"] = b.compiler;
  out["cxx_flags"] = b.cxx_flags;
  out["build_type"] = b.build_type;
  out["simd"] = b.simd;
  out["openmp_version"] = b.openmp_version;
  out["omp_max_threads"] = b.omp_max_threads;
  out["cuda_built"] = b.cuda_built;
  out["cuda_version"] = b.cuda_version;
  out["cuda_device_count"] = b.cuda_device_count;
  out["pybind11_version"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." +
                            std::to_string(PYBIND11_VERSION_MINOR) + "." +
                            std::to_string(PYBIND11_VERSION_PATCH);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastface native core (private; use the fastface package)";
  m.def("merge_topk", &merge_topk, py::arg("D").noconvert(), py::arg("I").noconvert(), py::arg("k"),
        py::arg("larger_is_better"),
        "Merge (nshards, nq, k_in) sorted lists into (nq, k). Inputs must be "
        "C-contiguous float32/int64; validation is done in Python.");
  m.def("build_info", &build_info);
}
