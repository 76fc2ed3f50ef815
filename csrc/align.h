// Batched affine warp of face crops (bilinear, constant border 0).
#pragma once

#include <cstdint>

namespace fastface {

// One decoded image: `height` x `width` pixels of 3 interleaved uint8
// channels, rows `row_stride` bytes apart.
struct ImageView {
  const uint8_t* data;
  int64_t height;
  int64_t width;
  int64_t row_stride;
};

// Warps face `f` out of `images[image_index[f]]` with the forward matrix
// `M[f]` (2 x 3, row-major, float64; maps image points to crop points, as
// cv2.warpAffine takes it) into an `out_h` x `out_w` crop.
//
// The arithmetic follows cv2.warpAffine with INTER_LINEAR and
// BORDER_CONSTANT 0; the matrix is inverted in double precision as OpenCV
// does it, pixel centres sit at integer coordinates and taps outside the
// image read 0. With `fixed_point` false the blend is OpenCV >= 4.11's:
// float32 coordinates and fused multiply-adds, rounded half to even. With
// `fixed_point` true it is OpenCV <= 4.10's: coordinates quantised to 1/32
// pixel (INTER_BITS = 5) through the same 10-bit steps, integer weights
// summing to 1024, rounded half up.
//
// `out` receives (F, out_h, out_w, 3) uint8. Parallel over faces (OpenMP,
// `threads` threads, or OpenMP's default when 0; small batches run on the
// calling thread); the caller must not hold the GIL. Indices must be valid
// (checked in Python).
void warp_affine_u8(const ImageView* images, const int64_t* image_index, const double* M, int64_t F,
                    int64_t out_h, int64_t out_w, bool fixed_point, int threads, uint8_t* out);

// Same warp, fused with a model's input transform: writes (F, 3, out_h,
// out_w) float32 with out[f, c] = (v - mean[c]) / std[c] in float32, where v
// is the uint8 value warp_affine_u8 gives for input channel `channel[c]`;
// the result equals normalising the uint8 crop exactly.
void warp_affine_f32_nchw(const ImageView* images, const int64_t* image_index, const double* M,
                          int64_t F, int64_t out_h, int64_t out_w, const float* mean,
                          const float* std, const int* channel, bool fixed_point, int threads,
                          float* out);

}  // namespace fastface
