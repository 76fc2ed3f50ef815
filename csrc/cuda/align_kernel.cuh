// Batched affine warp of face crops: one thread per output pixel.
//
// The arithmetic is the CPU warp's (csrc/align.cpp), pixel by pixel:
// the forward matrix is inverted in double precision in OpenCV's order;
// "float" sampling takes float32 coordinates fma(m0, x, float(fma(y, a1, a2)))
// and blends with fused multiply-adds along x then y, rounded half to even;
// "fixed" sampling quantises coordinates to 1/32 pixel through OpenCV's
// 10-bit steps and blends with integer weights summing to 1024. Pixel
// centres sit at integer coordinates; taps outside the image read 0.
#pragma once

#include "common.cuh"

namespace fastface {
namespace cuda {

// Images packed in one uint8 buffer: image i starts at byte offset[i] and has
// height[i] x width[i] pixels of 3 interleaved channels, rows stride[i] bytes apart.
struct AlignArgs {
  const uint8_t* pixels;
  const int64_t* offset;
  const int64_t* height;
  const int64_t* width;
  const int64_t* stride;
  const int64_t* image_index;  // (F,) image of each face
  const double* M;             // (F, 2, 3) forward matrices, image -> crop
  int64_t F, out_h, out_w;
  bool fixed_point;
  // output: uint8 (F, out_h, out_w, 3) when out_u8, else float32 (F, 3, out_h, out_w)
  uint8_t* out_u8;
  float* out_f32;
  float mean[3], std[3];
  int channel[3];
};

FF_HD void invert_affine(const double* m, double* a) {
  double d = m[0] * m[4] - m[1] * m[3];
  d = d != 0 ? 1.0 / d : 0.0;
  a[0] = m[4] * d;
  a[1] = -m[1] * d;
  a[3] = -m[3] * d;
  a[4] = m[0] * d;
  a[2] = -a[0] * m[2] - a[1] * m[5];
  a[5] = -a[3] * m[2] - a[4] * m[5];
}

FF_HD int32_t clamp_u8(int32_t v) { return v < 0 ? 0 : (v > 255 ? 255 : v); }

FF_HD int32_t round_even_f(float v) {
#if defined(__CUDA_ARCH__)
  return __float2int_rn(v);
#else
  return static_cast<int32_t>(std::nearbyint(v));
#endif
}

FF_HD int64_t round_even_d(double v) {
#if defined(__CUDA_ARCH__)
  return __double2ll_rn(v);
#else
  return static_cast<int64_t>(std::nearbyint(v));
#endif
}

FF_HD int32_t blend_f32(float al, float be, float p00, float p01, float p10, float p11) {
  const float top = fmaf(al, p01 - p00, p00);
  const float bot = fmaf(al, p11 - p10, p10);
  return clamp_u8(round_even_f(fmaf(be, bot - top, top)));
}

FF_HD int32_t blend_fixed(int32_t wx, int32_t wy, int32_t p00, int32_t p01, int32_t p10,
                          int32_t p11) {
  const int32_t top = p00 * (32 - wx) + p01 * wx;
  const int32_t bot = p10 * (32 - wx) + p11 * wx;
  return (top * (32 - wy) + bot * wy + 512) >> 10;
}

FF_HD int32_t clamp_tap(int64_t v, int64_t n) {
  return static_cast<int32_t>(v < -2 ? -2 : (v > n + 1 ? n + 1 : v));
}

// Computes pixel (x, y) of face f: the three channel values (0..255) in rgb[].
FF_HD void sample_pixel(const AlignArgs& a, int64_t f, int64_t y, int64_t x, int32_t rgb[3]) {
  const int64_t img = a.image_index[f];
  const uint8_t* base = a.pixels + a.offset[img];
  const int64_t H = a.height[img], W = a.width[img], S = a.stride[img];
  double inv[6];
  invert_affine(a.M + 6 * f, inv);
  int64_t ix, iy;
  float al = 0.f, be = 0.f;
  int32_t wx = 0, wy = 0;
  if (a.fixed_point) {
    // OpenCV <= 4.10: AB_BITS = 10, INTER_BITS = 5, round delta 16
    const int64_t X0 = round_even_d((inv[1] * y + inv[2]) * 1024) + 16;
    const int64_t Y0 = round_even_d((inv[4] * y + inv[5]) * 1024) + 16;
    const int64_t X = (X0 + round_even_d(inv[0] * x * 1024)) >> 5;
    const int64_t Y = (Y0 + round_even_d(inv[3] * x * 1024)) >> 5;
    ix = clamp_tap(X >> 5, W);
    iy = clamp_tap(Y >> 5, H);
    wx = static_cast<int32_t>(X & 31);
    wy = static_cast<int32_t>(Y & 31);
  } else {
    const float m0 = static_cast<float>(inv[0]), m3 = static_cast<float>(inv[3]);
    const float mx = static_cast<float>(fma(static_cast<double>(y), inv[1], inv[2]));
    const float my = static_cast<float>(fma(static_cast<double>(y), inv[4], inv[5]));
    float sx = fmaf(m0, static_cast<float>(x), mx);
    float sy = fmaf(m3, static_cast<float>(x), my);
    // far-away coordinates are clamped to [-2, size + 1]: still outside, reads 0
    const float cx = fmaxf(-2.0f, fminf(sx, static_cast<float>(W + 1)));
    const float cy = fmaxf(-2.0f, fminf(sy, static_cast<float>(H + 1)));
    const float fx = floorf(cx), fy = floorf(cy);
    ix = static_cast<int64_t>(fx);
    iy = static_cast<int64_t>(fy);
    al = sx - fx;
    be = sy - fy;
  }
  if (ix < -1 || iy < -1 || ix >= W || iy >= H) {
    rgb[0] = rgb[1] = rgb[2] = 0;
    return;
  }
  const bool x0 = ix >= 0, x1 = ix + 1 < W, y0 = iy >= 0, y1 = iy + 1 < H;
  const uint8_t* row0 = base + iy * S;
  const uint8_t* row1 = row0 + S;
  for (int c = 0; c < 3; ++c) {
    const int32_t p00 = (y0 && x0) ? row0[ix * 3 + c] : 0;
    const int32_t p01 = (y0 && x1) ? row0[(ix + 1) * 3 + c] : 0;
    const int32_t p10 = (y1 && x0) ? row1[ix * 3 + c] : 0;
    const int32_t p11 = (y1 && x1) ? row1[(ix + 1) * 3 + c] : 0;
    rgb[c] = a.fixed_point ? blend_fixed(wx, wy, p00, p01, p10, p11)
                           : blend_f32(al, be, static_cast<float>(p00), static_cast<float>(p01),
                                       static_cast<float>(p10), static_cast<float>(p11));
  }
}

// The work of thread `gid` of the grid (one output pixel).
FF_HD void align_thread(const AlignArgs& a, int64_t gid) {
  const int64_t per_face = a.out_h * a.out_w;
  if (gid >= a.F * per_face) return;
  const int64_t f = gid / per_face;
  const int64_t p = gid - f * per_face;
  const int64_t y = p / a.out_w, x = p - y * a.out_w;
  int32_t rgb[3];
  sample_pixel(a, f, y, x, rgb);
  if (a.out_u8 != nullptr) {
    uint8_t* o = a.out_u8 + gid * 3;
    o[0] = static_cast<uint8_t>(rgb[0]);
    o[1] = static_cast<uint8_t>(rgb[1]);
    o[2] = static_cast<uint8_t>(rgb[2]);
  } else {
    for (int c = 0; c < 3; ++c) {
      // a select, not rgb[channel[c]]: a run-time index would put rgb in local memory
      const int ch = a.channel[c];
      const int32_t v = ch == 0 ? rgb[0] : (ch == 1 ? rgb[1] : rgb[2]);
      // a true division, as the CPU path: equals normalising the uint8 crop
      a.out_f32[(f * 3 + c) * per_face + p] = (static_cast<float>(v) - a.mean[c]) / a.std[c];
    }
  }
}

}  // namespace cuda
}  // namespace fastface
