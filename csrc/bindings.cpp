// The only file that includes pybind11: converts arrays that Python has
// already validated, releases the GIL around the core, allocates outputs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "align.h"
#include "build_info.h"
#include "merge.h"

namespace py = pybind11;

namespace {

using f32c = py::array_t<float, py::array::c_style>;
using i64c = py::array_t<int64_t, py::array::c_style>;
using f64c = py::array_t<double, py::array::c_style>;
using u8c = py::array_t<uint8_t, py::array::c_style>;

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

// Image views over a (N, H, W, 3) batch or over a list of (H, W, 3) arrays.
std::vector<fastface::ImageView> image_views(const u8c& batch) {
  const int64_t n = batch.shape(0), h = batch.shape(1), w = batch.shape(2);
  std::vector<fastface::ImageView> views(n);
  for (int64_t i = 0; i < n; ++i) views[i] = {batch.data() + i * h * w * 3, h, w, w * 3};
  return views;
}

std::vector<fastface::ImageView> image_views(const std::vector<u8c>& images) {
  std::vector<fastface::ImageView> views(images.size());
  for (size_t i = 0; i < images.size(); ++i) {
    const u8c& im = images[i];
    views[i] = {im.data(), im.shape(0), im.shape(1), im.shape(1) * 3};
  }
  return views;
}

template <class Images>
u8c warp_affine_u8(const Images& images, const i64c& image_index, const f64c& M, int64_t out_h,
                   int64_t out_w, bool fixed_point, int threads) {
  const std::vector<fastface::ImageView> views = image_views(images);
  const int64_t F = image_index.shape(0);
  u8c out({F, out_h, out_w, int64_t{3}});
  const int64_t* idx = image_index.data();
  const double* m = M.data();
  uint8_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    fastface::warp_affine_u8(views.data(), idx, m, F, out_h, out_w, fixed_point, threads, o);
  }
  return out;
}

template <class Images>
f32c warp_affine_f32_nchw(const Images& images, const i64c& image_index, const f64c& M,
                          int64_t out_h, int64_t out_w, const std::vector<float>& mean,
                          const std::vector<float>& std, const std::vector<int>& channel,
                          bool fixed_point, int threads) {
  const std::vector<fastface::ImageView> views = image_views(images);
  const int64_t F = image_index.shape(0);
  f32c out({F, int64_t{3}, out_h, out_w});
  const int64_t* idx = image_index.data();
  const double* m = M.data();
  float* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    fastface::warp_affine_f32_nchw(views.data(), idx, m, F, out_h, out_w, mean.data(), std.data(),
                                   channel.data(), fixed_point, threads, o);
  }
  return out;
}

py::dict build_info() {
  const fastface::BuildInfo b = fastface::build_info();
  py::dict out;
  out["compiler"] = b.compiler;
  out["cxx_flags"] = b.cxx_flags;
  out["build_type"] = b.build_type;
  out["simd"] = b.simd;
  out["simd_variants"] = b.simd_variants;
  out["simd_selected"] = b.simd_selected;
  out["openmp_version"] = b.openmp_version;
  out["omp_max_threads"] = b.omp_max_threads;
  out["cuda_built"] = b.cuda_built;
  out["cuda_version"] = b.cuda_version;
  out["cuda_archs"] = b.cuda_archs;
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
  const char* warp_doc =
      "Warp faces (F) out of images with forward 2x3 float64 matrices M (F, 2, 3), "
      "bilinear with border 0, as cv2.warpAffine. Inputs validated in Python.";
  m.def("warp_affine_u8", &warp_affine_u8<u8c>, py::arg("images").noconvert(),
        py::arg("image_index").noconvert(), py::arg("M").noconvert(), py::arg("out_h"),
        py::arg("out_w"), py::arg("fixed_point"), py::arg("threads") = 0, warp_doc);
  m.def("warp_affine_u8", &warp_affine_u8<std::vector<u8c>>, py::arg("images").noconvert(),
        py::arg("image_index").noconvert(), py::arg("M").noconvert(), py::arg("out_h"),
        py::arg("out_w"), py::arg("fixed_point"), py::arg("threads") = 0, warp_doc);
  m.def("warp_affine_f32_nchw", &warp_affine_f32_nchw<u8c>, py::arg("images").noconvert(),
        py::arg("image_index").noconvert(), py::arg("M").noconvert(), py::arg("out_h"),
        py::arg("out_w"), py::arg("mean"), py::arg("std"), py::arg("channel"),
        py::arg("fixed_point"), py::arg("threads") = 0, warp_doc);
  m.def("warp_affine_f32_nchw", &warp_affine_f32_nchw<std::vector<u8c>>,
        py::arg("images").noconvert(), py::arg("image_index").noconvert(),
        py::arg("M").noconvert(), py::arg("out_h"), py::arg("out_w"), py::arg("mean"),
        py::arg("std"), py::arg("channel"), py::arg("fixed_point"), py::arg("threads") = 0,
        warp_doc);
}
