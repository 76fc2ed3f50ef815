#include "align.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

// Compiled once per instruction-set level (FASTFACE_ISA_NS names the
// variant, e.g. v2, v3, v4); csrc/align_dispatch.cpp picks one at run time.
#ifndef FASTFACE_ISA_NS
#define FASTFACE_ISA_NS native
#endif

namespace fastface {
namespace FASTFACE_ISA_NS {
namespace {

std::atomic<uint32_t> g_touch_sink{0};

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "the tap gather reads 4 bytes as one little-endian word");

// cv2.warpAffine's fixed-point steps (OpenCV <= 4.10): coordinates carry
// kAbBits fractional bits and are rounded to kInterBits (1/32 pixel).
constexpr int kAbBits = 10;
constexpr int kInterBits = 5;
constexpr int kTab = 1 << kInterBits;
constexpr int64_t kRoundDelta = (int64_t{1} << kAbBits) / kTab / 2;

// About 16 crops of 112 x 112: below this a batch is warped on one thread.
constexpr int64_t kMinParallelPixels = 200000;

// Inverts a 2 x 3 forward matrix in the order OpenCV does, so that the
// crop-to-image matrix rounds the same way.
void invert_affine(const double* m, double* a) {
  double d = m[0] * m[4] - m[1] * m[3];
  d = d != 0 ? 1.0 / d : 0.0;
  a[0] = m[4] * d;
  a[1] = -m[1] * d;
  a[3] = -m[3] * d;
  a[4] = m[0] * d;
  a[2] = -a[0] * m[2] - a[1] * m[5];
  a[5] = -a[3] * m[2] - a[4] * m[5];
}

// Per-thread buffers, one crop row long.
struct Scratch {
  std::vector<int64_t> adelta, bdelta;       // fixed point: per-column coordinate steps
  std::vector<float> sx, sy;                 // float: source coordinates, then fractions
  std::vector<float> cx, cy;                 // float: coordinates clamped near the image
  std::vector<int32_t> ix, iy, wx, wy;       // integer tap position, fixed-point weights
  std::vector<uint32_t> t00, t01, t10, t11;  // the four taps, 3 channels + 1 spare byte
  std::vector<uint32_t> px;                  // the row: channel c in byte c of each word
  explicit Scratch(int64_t w)
      : adelta(w),
        bdelta(w),
        sx(w),
        sy(w),
        cx(w),
        cy(w),
        ix(w),
        iy(w),
        wx(w),
        wy(w),
        t00(w),
        t01(w),
        t10(w),
        t11(w),
        px(w) {}
};

inline int64_t round_double(double v) { return static_cast<int64_t>(std::nearbyint(v)); }

// Rounds half to even (as cvRound and v_round do) for |v| < 2^22: adding
// 1.5 * 2^23 leaves the rounded integer in the low mantissa bits. Unlike
// nearbyint, this vectorises.
inline int32_t round_even(float v) {
  const float t = v + 12582912.0f;
  int32_t bits;
  std::memcpy(&bits, &t, sizeof bits);
  return bits - 0x4B400000;
}

inline uint8_t clamp_u8(int32_t v) { return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v)); }

// Reads the 2 x 2 taps of columns [lo, hi) into four words (bytes: channels
// 0, 1, 2 and a spare). Scalar loads; everything after this runs over
// columns as plain vectorisable loops. The callers keep ix <= W - 3 so that
// the spare byte stays inside the image.
void gather_taps(const ImageView& img, int64_t lo, int64_t hi, Scratch& s) {
  const uint8_t* base = img.data;
  const int64_t stride = img.row_stride;
  const int32_t* __restrict ix = s.ix.data();
  const int32_t* __restrict iy = s.iy.data();
  uint32_t* __restrict t00 = s.t00.data();
  uint32_t* __restrict t01 = s.t01.data();
  uint32_t* __restrict t10 = s.t10.data();
  uint32_t* __restrict t11 = s.t11.data();
  for (int64_t x = lo; x < hi; ++x) {
    const uint8_t* p = base + int64_t{iy[x]} * stride + int64_t{3} * ix[x];
    std::memcpy(t00 + x, p, 4);
    std::memcpy(t01 + x, p + 3, 4);
    std::memcpy(t10 + x, p + stride, 4);
    std::memcpy(t11 + x, p + stride + 3, 4);
  }
}

// floor(v) for |v| < 2^31: truncate, then subtract 1 where that rounded up
// (the sign bit of v - trunc(v); adding +0 turns a -0 from v = -0 into +0).
// std::floor does not vectorise here.
inline int32_t floor_int(float v) {
  const int32_t t = static_cast<int32_t>(v);
  const float d = (v - static_cast<float>(t)) + 0.0f;
  int32_t bits;
  std::memcpy(&bits, &d, sizeof bits);
  return t + (bits >> 31);
}

inline int32_t clamp_tap(int64_t v, int64_t n) {
  return static_cast<int32_t>(v < -2 ? -2 : (v > n + 1 ? n + 1 : v));
}

// The columns [lo, hi) whose taps lie in the fast region: ix in [0, W - 3]
// (one column less than the blend needs, see gather_taps) and iy in
// [0, H - 2]. Tap positions are monotone in x, so this set is one interval.
void fast_span(const ImageView& img, int64_t w, const Scratch& s, int64_t& lo, int64_t& hi) {
  const int32_t* ix = s.ix.data();
  const int32_t* iy = s.iy.data();
  auto fast = [&](int64_t x) {
    return ix[x] >= 0 && iy[x] >= 0 && ix[x] <= img.width - 3 && iy[x] <= img.height - 2;
  };
  lo = 0;
  while (lo < w && !fast(lo)) ++lo;
  hi = w;
  while (hi > lo && !fast(hi - 1)) --hi;
}

// Bilinear blend of one pixel near the border: taps outside the image read
// 0. `Blend` mixes four channel values with the pixel's weights.
template <class Blend>
void border_pixel(const ImageView& img, int64_t x, const Scratch& s, Blend&& blend, uint32_t* out) {
  const int64_t ix = s.ix[x], iy = s.iy[x], W = img.width, H = img.height;
  if (ix < -1 || iy < -1 || ix >= W || iy >= H) {
    out[x] = 0;
    return;
  }
  const bool x0 = ix >= 0, x1 = ix + 1 < W, y0 = iy >= 0, y1 = iy + 1 < H;
  const uint8_t* row0 = img.data + iy * img.row_stride;
  const uint8_t* row1 = row0 + img.row_stride;
  uint32_t v = 0;
  for (int c = 0; c < 3; ++c) {
    const int32_t p00 = (y0 && x0) ? row0[ix * 3 + c] : 0;
    const int32_t p01 = (y0 && x1) ? row0[(ix + 1) * 3 + c] : 0;
    const int32_t p10 = (y1 && x0) ? row1[ix * 3 + c] : 0;
    const int32_t p11 = (y1 && x1) ? row1[(ix + 1) * 3 + c] : 0;
    v |= uint32_t{blend(x, p00, p01, p10, p11)} << (8 * c);
  }
  out[x] = v;
}

// Float32 bilinear blend, as cv2.warpAffine computes it since OpenCV 4.11:
// fused multiply-adds along x then y, rounded half to even.
inline uint8_t blend_f32(float al, float be, float p00, float p01, float p10, float p11) {
  const float top = std::fma(al, p01 - p00, p00);
  const float bot = std::fma(al, p11 - p10, p10);
  return clamp_u8(round_even(std::fma(be, bot - top, top)));
}

// Fixed-point blend, as OpenCV <= 4.10: weights on a 1/32 grid summing to
// 1024, rounded half up.
inline uint8_t blend_fixed(int32_t wx, int32_t wy, int32_t p00, int32_t p01, int32_t p10,
                           int32_t p11) {
  const int32_t top = p00 * (kTab - wx) + p01 * wx;
  const int32_t bot = p10 * (kTab - wx) + p11 * wx;
  return static_cast<uint8_t>((top * (kTab - wy) + bot * wy + 512) >> 10);
}

// Float32 coordinates, as OpenCV >= 4.11: fma(m0, x, m_row) in float32 with
// m_row = y * m1 + m2 rounded from double; fractions after floor.
void warp_row_f32(const ImageView& img, const double* a, int64_t y, int64_t w, Scratch& s) {
  const float m0 = static_cast<float>(a[0]), m3 = static_cast<float>(a[3]);
  const float mx = static_cast<float>(std::fma(static_cast<double>(y), a[1], a[2]));
  const float my = static_cast<float>(std::fma(static_cast<double>(y), a[4], a[5]));
  float* __restrict ax = s.sx.data();
  float* __restrict ay = s.sy.data();
  int32_t* __restrict ix = s.ix.data();
  int32_t* __restrict iy = s.iy.data();
  const float hx = static_cast<float>(img.width + 1), hy = static_cast<float>(img.height + 1);
  // 32-bit counters: int32 -> float converts in vector registers, int64 not.
  // Two passes of a shape GCC vectorises (it gives up on clamp, convert and
  // subtract in one loop under -ftrapping-math). Far-away coordinates are
  // clamped to [-2, size + 1] before the integer conversion: those ends are
  // still outside the image, so no tap changes class, and their fractions
  // are never used.
  float* __restrict cx = s.cx.data();
  float* __restrict cy = s.cy.data();
  for (int32_t x = 0; x < static_cast<int32_t>(w); ++x) {
    ax[x] = std::fma(m0, static_cast<float>(x), mx);
    ay[x] = std::fma(m3, static_cast<float>(x), my);
    cx[x] = std::max(-2.0f, std::min(ax[x], hx));
    cy[x] = std::max(-2.0f, std::min(ay[x], hy));
  }
  for (int32_t x = 0; x < static_cast<int32_t>(w); ++x) {
    ix[x] = floor_int(cx[x]);
    iy[x] = floor_int(cy[x]);
    ax[x] -= static_cast<float>(ix[x]);
    ay[x] -= static_cast<float>(iy[x]);
  }
  int64_t lo, hi;
  fast_span(img, w, s, lo, hi);
  uint32_t* __restrict out = s.px.data();
  gather_taps(img, lo, hi, s);
  const uint32_t* __restrict t00 = s.t00.data();
  const uint32_t* __restrict t01 = s.t01.data();
  const uint32_t* __restrict t10 = s.t10.data();
  const uint32_t* __restrict t11 = s.t11.data();
  for (int64_t x = lo; x < hi; ++x) {
    uint32_t v = 0;
    for (int c = 0; c < 3; ++c) {
      const int shift = 8 * c;
      v |= uint32_t{blend_f32(ax[x], ay[x], static_cast<float>((t00[x] >> shift) & 255u),
                              static_cast<float>((t01[x] >> shift) & 255u),
                              static_cast<float>((t10[x] >> shift) & 255u),
                              static_cast<float>((t11[x] >> shift) & 255u))}
           << shift;
    }
    out[x] = v;
  }
  auto blend = [ax, ay](int64_t x, int32_t p00, int32_t p01, int32_t p10, int32_t p11) {
    return blend_f32(ax[x], ay[x], static_cast<float>(p00), static_cast<float>(p01),
                     static_cast<float>(p10), static_cast<float>(p11));
  };
  for (int64_t x = 0; x < lo; ++x) border_pixel(img, x, s, blend, out);
  for (int64_t x = hi; x < w; ++x) border_pixel(img, x, s, blend, out);
}

// Fixed-point coordinates, as OpenCV <= 4.10 (the crops most ArcFace-family
// models were trained on): 10 fractional bits per step, rounded to 1/32 pixel.
void warp_row_fixed(const ImageView& img, const double* a, int64_t y, int64_t w, Scratch& s) {
  const int64_t X0 = round_double((a[1] * y + a[2]) * (1 << kAbBits)) + kRoundDelta;
  const int64_t Y0 = round_double((a[4] * y + a[5]) * (1 << kAbBits)) + kRoundDelta;
  const int64_t* __restrict ad = s.adelta.data();
  const int64_t* __restrict bd = s.bdelta.data();
  int32_t* __restrict ix = s.ix.data();
  int32_t* __restrict iy = s.iy.data();
  int32_t* __restrict wx = s.wx.data();
  int32_t* __restrict wy = s.wy.data();
  for (int64_t x = 0; x < w; ++x) {
    const int64_t X = (X0 + ad[x]) >> (kAbBits - kInterBits);
    const int64_t Y = (Y0 + bd[x]) >> (kAbBits - kInterBits);
    ix[x] = clamp_tap(X >> kInterBits, img.width);
    iy[x] = clamp_tap(Y >> kInterBits, img.height);
    wx[x] = static_cast<int32_t>(X & (kTab - 1));
    wy[x] = static_cast<int32_t>(Y & (kTab - 1));
  }
  int64_t lo, hi;
  fast_span(img, w, s, lo, hi);
  uint32_t* __restrict out = s.px.data();
  gather_taps(img, lo, hi, s);
  const uint32_t* __restrict t00 = s.t00.data();
  const uint32_t* __restrict t01 = s.t01.data();
  const uint32_t* __restrict t10 = s.t10.data();
  const uint32_t* __restrict t11 = s.t11.data();
  for (int64_t x = lo; x < hi; ++x) {
    uint32_t v = 0;
    for (int c = 0; c < 3; ++c) {
      const int shift = 8 * c;
      v |= uint32_t{blend_fixed(wx[x], wy[x], static_cast<int32_t>((t00[x] >> shift) & 255u),
                                static_cast<int32_t>((t01[x] >> shift) & 255u),
                                static_cast<int32_t>((t10[x] >> shift) & 255u),
                                static_cast<int32_t>((t11[x] >> shift) & 255u))}
           << shift;
    }
    out[x] = v;
  }
  auto blend = [wx, wy](int64_t x, int32_t p00, int32_t p01, int32_t p10, int32_t p11) {
    return blend_fixed(wx[x], wy[x], p00, p01, p10, p11);
  };
  for (int64_t x = 0; x < lo; ++x) border_pixel(img, x, s, blend, out);
  for (int64_t x = hi; x < w; ++x) border_pixel(img, x, s, blend, out);
}

// Reads the source rows a crop will sample, row by row, before the warp.
// The warp walks the source along tilted lines that defeat the hardware
// prefetcher, so on an image that is not in cache it stalls on nearly every
// new line; one sequential pass over the bounding box of the sampled region
// streams it into cache at memory bandwidth instead.
uint32_t touch_region(const ImageView& img, const double* a, int64_t out_h, int64_t out_w) {
  double x0 = 1e300, x1 = -1e300, y0 = 1e300, y1 = -1e300;
  for (int64_t cy = 0; cy <= 1; ++cy) {
    for (int64_t cx = 0; cx <= 1; ++cx) {
      const double u = static_cast<double>(cx * (out_w - 1));
      const double v = static_cast<double>(cy * (out_h - 1));
      const double sx = a[0] * u + a[1] * v + a[2];
      const double sy = a[3] * u + a[4] * v + a[5];
      x0 = std::min(x0, sx);
      x1 = std::max(x1, sx);
      y0 = std::min(y0, sy);
      y1 = std::max(y1, sy);
    }
  }
  const int64_t c0 = std::max<int64_t>(0, static_cast<int64_t>(std::floor(x0)) - 1);
  const int64_t c1 = std::min<int64_t>(img.width, static_cast<int64_t>(std::floor(x1)) + 3);
  const int64_t r0 = std::max<int64_t>(0, static_cast<int64_t>(std::floor(y0)) - 1);
  const int64_t r1 = std::min<int64_t>(img.height, static_cast<int64_t>(std::floor(y1)) + 3);
  uint32_t sink = 0;
  if (c0 >= c1 || r0 >= r1) return sink;
  const int64_t b0 = c0 * 3, b1 = c1 * 3;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = img.data + r * img.row_stride;
    for (int64_t b = b0; b < b1; b += 64) sink += row[b];
    sink += row[b1 - 1];
  }
  return sink;
}

// Warps every crop row of every face into scratch words (one per pixel) and
// hands them to `emit(f, y, px)`. Parallel over faces.
template <class Emit>
void for_each_row(const ImageView* images, const int64_t* image_index, const double* M, int64_t F,
                  int64_t out_h, int64_t out_w, bool fixed_point, int threads, const Emit& emit) {
  // Small batches stay on the calling thread: a parallel region has to wait
  // for every worker to be scheduled, which on a busy machine can cost more
  // than warping a few crops.
  const bool parallel = F > 1 && F * out_h * out_w >= kMinParallelPixels && threads != 1;
  const int team = threads > 0 ? threads : omp_get_max_threads();
#pragma omp parallel if (parallel) num_threads(team)
  {
    Scratch s(out_w);
    uint32_t touched = 0;
#pragma omp for schedule(dynamic, 4)
    for (int64_t f = 0; f < F; ++f) {
      const ImageView& img = images[image_index[f]];
      double a[6];
      invert_affine(M + 6 * f, a);
      touched += touch_region(img, a, out_h, out_w);
      if (fixed_point) {
        for (int64_t x = 0; x < out_w; ++x) {
          s.adelta[x] = round_double(a[0] * x * (1 << kAbBits));
          s.bdelta[x] = round_double(a[3] * x * (1 << kAbBits));
        }
      }
      for (int64_t y = 0; y < out_h; ++y) {
        if (fixed_point) {
          warp_row_fixed(img, a, y, out_w, s);
        } else {
          warp_row_f32(img, a, y, out_w, s);
        }
        emit(f, y, s.px.data());
      }
    }
    // keep the reads of touch_region: their sum goes nowhere else
    g_touch_sink.store(touched, std::memory_order_relaxed);
  }
}

}  // namespace

void warp_affine_u8(const ImageView* images, const int64_t* image_index, const double* M, int64_t F,
                    int64_t out_h, int64_t out_w, bool fixed_point, int threads, uint8_t* out) {
  for_each_row(images, image_index, M, F, out_h, out_w, fixed_point, threads,
               [=](int64_t f, int64_t y, const uint32_t* px) {
                 uint8_t* o = out + (f * out_h + y) * out_w * 3;
                 // Overlapping 4-byte stores; the last pixel writes 3 bytes.
                 for (int64_t x = 0; x + 1 < out_w; ++x) std::memcpy(o + 3 * x, px + x, 4);
                 std::memcpy(o + 3 * (out_w - 1), px + out_w - 1, 3);
               });
}

void warp_affine_f32_nchw(const ImageView* images, const int64_t* image_index, const double* M,
                          int64_t F, int64_t out_h, int64_t out_w, const float* mean,
                          const float* std, const int* channel, bool fixed_point, int threads,
                          float* out) {
  for_each_row(images, image_index, M, F, out_h, out_w, fixed_point, threads,
               [=](int64_t f, int64_t y, const uint32_t* __restrict px) {
                 for (int c = 0; c < 3; ++c) {
                   float* __restrict o = out + ((f * 3 + c) * out_h + y) * out_w;
                   const int shift = 8 * channel[c];
                   const float m = mean[c], sd = std[c];
                   // A true division, not a multiply by 1/std, so the result
                   // equals (crop - mean) / std computed in float32.
                   for (int64_t x = 0; x < out_w; ++x) {
                     o[x] = (static_cast<float>((px[x] >> shift) & 255u) - m) / sd;
                   }
                 }
               });
}

}  // namespace FASTFACE_ISA_NS
}  // namespace fastface
