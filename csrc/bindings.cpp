// The only file that includes pybind11: converts arrays that Python has
// already validated, releases the GIL around the core, allocates outputs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "align.h"
#include "build_info.h"
#include "coarse.h"
#include "ivfpq.h"
#include "merge.h"
#include "rerank.h"

namespace py = pybind11;

namespace {

using f32c = py::array_t<float, py::array::c_style>;
using i64c = py::array_t<int64_t, py::array::c_style>;
using f64c = py::array_t<double, py::array::c_style>;
using u8c = py::array_t<uint8_t, py::array::c_style>;

void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

py::tuple merge_topk(const f32c& D, const i64c& I, int64_t k, bool larger_is_better) {
  require(D.ndim() == 3 && I.ndim() == 3, "merge_topk: D and I must be 3-D");
  require(D.shape(0) == I.shape(0) && D.shape(1) == I.shape(1) && D.shape(2) == I.shape(2),
          "merge_topk: D and I must have the same shape");
  require(k > 0, "merge_topk: k must be positive");
  const int64_t nparts = D.shape(0), nq = D.shape(1), k_in = D.shape(2);
  f32c out_D({nq, k});
  i64c out_I({nq, k});
  const float* d = D.data();
  const int64_t* i = I.data();
  float* od = out_D.mutable_data();
  int64_t* oi = out_I.mutable_data();
  {
    py::gil_scoped_release release;
    fastface::merge_topk(d, i, nparts, nq, k_in, k, larger_is_better, od, oi);
  }
  return py::make_tuple(out_D, out_I);
}

py::tuple select_topk(const f32c& S, int64_t k, bool larger_is_better, const f32c& row_norms,
                      const f32c& col_norms) {
  require(S.ndim() == 2, "select_topk: S must be 2-D");
  require(k > 0, "select_topk: k must be positive");
  const int64_t nq = S.shape(0), n = S.shape(1);
  const bool l2 = col_norms.size() > 0;
  require(!l2 || (col_norms.ndim() == 1 && col_norms.shape(0) == n && row_norms.ndim() == 1 &&
                  row_norms.shape(0) == nq),
          "select_topk: norms must have one entry per row and per column");
  f32c out_D({nq, k});
  i64c out_I({nq, k});
  const float* s = S.data();
  const float* rn = l2 ? row_norms.data() : nullptr;
  const float* cn = l2 ? col_norms.data() : nullptr;
  float* od = out_D.mutable_data();
  int64_t* oi = out_I.mutable_data();
  {
    py::gil_scoped_release release;
    fastface::select_topk(s, nq, n, k, larger_is_better, rn, cn, od, oi);
  }
  return py::make_tuple(out_D, out_I);
}

py::tuple coarse_topk(const f32c& q, const f32c& ct, const f32c& cnorms, int64_t k) {
  require(q.ndim() == 2 && ct.ndim() == 2, "coarse_topk: q and ct must be 2-D");
  const int64_t nq = q.shape(0), d = q.shape(1), n = ct.shape(1);
  require(ct.shape(0) == d, "coarse_topk: centroids and queries differ in dimension");
  require(k > 0 && n > 0, "coarse_topk: k and the number of centroids must be positive");
  const bool l2 = cnorms.size() > 0;
  require(!l2 || (cnorms.ndim() == 1 && cnorms.shape(0) == n),
          "coarse_topk: one norm per centroid");
  f32c out_D({nq, k});
  i64c out_I({nq, k});
  const float* qp = q.data();
  const float* cp = ct.data();
  const float* np_ = l2 ? cnorms.data() : nullptr;
  float* od = out_D.mutable_data();
  int64_t* oi = out_I.mutable_data();
  {
    py::gil_scoped_release release;
    fastface::coarse_topk(qp, nq, d, cp, n, np_, k, od, oi);
  }
  return py::make_tuple(out_D, out_I);
}

// Inverted lists of one run, kept alive with the buffers they point into.
class ListRunHandle {
 public:
  ListRunHandle(u8c codes, u8c ids, i64c codes_off, i64c ids_off, i64c count, int64_t code_size)
      : codes_(std::move(codes)),
        ids_(std::move(ids)),
        codes_off_(std::move(codes_off)),
        ids_off_(std::move(ids_off)),
        count_(std::move(count)),
        code_size_(code_size) {
    require(codes_.ndim() == 1 && ids_.ndim() == 1, "ListRun: buffers must be 1-D uint8");
    require(codes_off_.ndim() == 1 && ids_off_.ndim() == 1 && count_.ndim() == 1,
            "ListRun: offsets and counts must be 1-D int64");
    nlist_ = count_.shape(0);
    require(codes_off_.shape(0) == nlist_ && ids_off_.shape(0) == nlist_,
            "ListRun: offsets and counts must have one entry per list");
    require(code_size_ > 0, "ListRun: code_size must be positive");
    const std::string err =
        fastface::check_list_run(run(), nlist_, code_size_, codes_.shape(0), ids_.shape(0));
    if (!err.empty()) throw std::invalid_argument("ListRun: " + err);
  }

  fastface::ListRun run() const {
    return {codes_.data(), ids_.data(), codes_off_.data(), ids_off_.data(), count_.data()};
  }
  int64_t nlist() const { return nlist_; }
  int64_t code_size() const { return code_size_; }

 private:
  u8c codes_, ids_;
  i64c codes_off_, ids_off_, count_;
  int64_t code_size_;
  int64_t nlist_ = 0;
};

py::tuple ivfpq8_search(const f32c& q, const f32c& pq, const f32c& coarse, bool inner_product,
                        const f32c& assign_D, const i64c& assign_I,
                        const std::vector<const ListRunHandle*>& runs, const i64c& exclude,
                        int64_t k, int64_t max_copies) {
  require(q.ndim() == 2 && pq.ndim() == 3 && pq.shape(2) == 256 && coarse.ndim() == 2,
          "ivfpq8_search: bad codec or query shapes");
  const int64_t nq = q.shape(0), d = q.shape(1), M = pq.shape(0), dsub = pq.shape(1);
  const int64_t nlist = coarse.shape(0);
  require(M * dsub == d && coarse.shape(1) == d, "ivfpq8_search: dimensions disagree");
  require(assign_D.ndim() == 2 && assign_I.ndim() == 2 && assign_I.shape(0) == nq &&
              assign_D.shape(0) == nq && assign_D.shape(1) == assign_I.shape(1),
          "ivfpq8_search: assignment must be (nq, nprobe)");
  require(exclude.ndim() == 1 && k > 0, "ivfpq8_search: bad exclude or k");
  require(max_copies == 1 || max_copies == 2, "ivfpq8_search: max_copies must be 1 or 2");
  const int64_t nprobe = assign_I.shape(1);
  std::vector<fastface::ListRun> views;
  views.reserve(runs.size());
  for (const ListRunHandle* r : runs) {
    require(r != nullptr && r->nlist() == nlist && r->code_size() == M,
            "ivfpq8_search: a run does not match the codec");
    views.push_back(r->run());
  }
  const int64_t* ai = assign_I.data();
  for (int64_t t = 0; t < nq * nprobe; ++t) {
    require(ai[t] >= -1 && ai[t] < nlist, "ivfpq8_search: list number out of range");
  }
  const fastface::PQCodec codec{d, nlist, M, dsub, pq.data(), coarse.data(), inner_product};
  f32c out_D({nq, k});
  i64c out_I({nq, k});
  const float* qp = q.data();
  const float* ad = assign_D.data();
  const int64_t* ex = exclude.data();
  const int64_t n_ex = exclude.shape(0);
  float* od = out_D.mutable_data();
  int64_t* oi = out_I.mutable_data();
  {
    py::gil_scoped_release release;
    fastface::ivfpq8_search(codec, qp, nq, ad, ai, nprobe, views.data(),
                            static_cast<int64_t>(views.size()), ex, n_ex, k, max_copies, od, oi);
  }
  return py::make_tuple(out_D, out_I);
}

// base: (n, d) float32, or float16 passed as its uint16 bits. Rows of candidates come
// from rows (nq, m) when it is not empty, else from the map (lo, table): see rerank.h.
py::tuple rerank(const f32c& q, const py::array& base, const i64c& cand, const i64c& rows,
                 int64_t lo, int64_t span, const i64c& table, bool l2, int64_t k) {
  require(q.ndim() == 2 && base.ndim() == 2 && cand.ndim() == 2, "rerank: bad shapes");
  require((base.flags() & py::array::c_style) != 0, "rerank: base must be C-contiguous");
  const bool f16 = py::dtype::of<uint16_t>().is(base.dtype());
  require(f16 || py::dtype::of<float>().is(base.dtype()),
          "rerank: base must be float32 or float16 bits (uint16)");
  const int64_t nq = q.shape(0), d = q.shape(1), m = cand.shape(1);
  require(base.shape(1) == d && cand.shape(0) == nq, "rerank: dimensions disagree");
  require(k > 0, "rerank: k must be positive");
  const bool have_rows = rows.size() > 0;
  require(!have_rows || (rows.ndim() == 2 && rows.shape(0) == nq && rows.shape(1) == m),
          "rerank: rows must be shaped like the candidates");
  const bool have_table = table.size() > 0;
  require(span >= 0 && (!have_table || (table.ndim() == 1 && table.shape(0) == span)),
          "rerank: the table must have span entries");
  const fastface::VectorTable vt{base.data(), base.shape(0), d, f16};
  const fastface::RowMap map{have_rows ? rows.data() : nullptr, lo, span,
                             have_table ? table.data() : nullptr};
  f32c out_D({nq, k});
  i64c out_I({nq, k});
  const float* qp = q.data();
  const int64_t* cp = cand.data();
  float* od = out_D.mutable_data();
  int64_t* oi = out_I.mutable_data();
  {
    py::gil_scoped_release release;
    fastface::rerank(qp, nq, vt, cp, m, map, l2, k, od, oi);
  }
  return py::make_tuple(out_D, out_I);
}

void copy_segments(const u8c& src, py::array_t<uint8_t, py::array::c_style>& dst,
                   const i64c& src_off, const i64c& dst_off, const i64c& nbytes) {
  require(src.ndim() == 1 && dst.ndim() == 1, "copy_segments: buffers must be 1-D uint8");
  const int64_t n = nbytes.shape(0);
  require(src_off.shape(0) == n && dst_off.shape(0) == n, "copy_segments: offsets disagree");
  const int64_t ns = src.shape(0), nd = dst.shape(0);
  const int64_t *so = src_off.data(), *dof = dst_off.data(), *nb = nbytes.data();
  for (int64_t i = 0; i < n; ++i) {
    require(nb[i] >= 0 && so[i] >= 0 && dof[i] >= 0 && nb[i] <= ns - so[i] && nb[i] <= nd - dof[i],
            "copy_segments: a segment runs past a buffer");
  }
  const uint8_t* s = src.data();
  uint8_t* d = dst.mutable_data();
  {
    py::gil_scoped_release release;
    fastface::copy_segments(s, d, so, dof, nb, n);
  }
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
        "Top-k of (nparts, nq, k_in) result lists as (nq, k): better score first, equal "
        "scores by lower id. Inputs must be C-contiguous float32/int64 (checked in Python).");
  py::class_<ListRunHandle>(m, "ListRun",
                            "Inverted lists of one run (codes and ids in place); see ivfpq.h")
      .def(py::init<u8c, u8c, i64c, i64c, i64c, int64_t>(), py::arg("codes").noconvert(),
           py::arg("ids").noconvert(), py::arg("codes_off").noconvert(),
           py::arg("ids_off").noconvert(), py::arg("count").noconvert(), py::arg("code_size"))
      .def_property_readonly("nlist", &ListRunHandle::nlist)
      .def_property_readonly("code_size", &ListRunHandle::code_size);
  m.def("ivfpq8_search", &ivfpq8_search, py::arg("q").noconvert(), py::arg("pq").noconvert(),
        py::arg("coarse").noconvert(), py::arg("inner_product"), py::arg("assign_D").noconvert(),
        py::arg("assign_I").noconvert(), py::arg("runs"), py::arg("exclude").noconvert(),
        py::arg("k"), py::arg("max_copies") = 1,
        "Exact top-k (better score, then lower id) of 8-bit PQ codes in the probed lists of "
        "every run, each id once; see ivfpq.h. Inputs checked in Python.");
  m.def("select_topk", &select_topk, py::arg("S").noconvert(), py::arg("k"),
        py::arg("larger_is_better"), py::arg("row_norms").noconvert(),
        py::arg("col_norms").noconvert(),
        "Top-k columns of each row of a (nq, n) float32 matrix as (nq, k) scores and column "
        "numbers: better score first, equal scores by lower column; with norms (non-empty), "
        "S holds inner products and the scores are squared L2. Checked in Python.");
  m.def("coarse_topk", &coarse_topk, py::arg("q").noconvert(), py::arg("ct").noconvert(),
        py::arg("cnorms").noconvert(), py::arg("k"),
        "The k best centroids of each query (centroids transposed, (d, n)); squared L2 when "
        "cnorms (one per centroid) is non-empty, else inner product. See coarse.h.");
  m.def("rerank", &rerank, py::arg("q").noconvert(), py::arg("base"), py::arg("cand").noconvert(),
        py::arg("rows").noconvert(), py::arg("lo"), py::arg("span"), py::arg("table").noconvert(),
        py::arg("l2"), py::arg("k"),
        "Exact top-k of each query's candidates against stored vectors; see rerank.h. "
        "Inputs checked in Python.");
  m.def("copy_segments", &copy_segments, py::arg("src").noconvert(), py::arg("dst").noconvert(),
        py::arg("src_off").noconvert(), py::arg("dst_off").noconvert(),
        py::arg("nbytes").noconvert(), "Copy byte ranges between two uint8 buffers.");
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
        py::arg("images").noconvert(), py::arg("image_index").noconvert(), py::arg("M").noconvert(),
        py::arg("out_h"), py::arg("out_w"), py::arg("mean"), py::arg("std"), py::arg("channel"),
        py::arg("fixed_point"), py::arg("threads") = 0, warp_doc);
}
