// A bounded heap of the k best (score, id) pairs under the library's one total
// order: better score first, equal scores by lower id. Shared by the IVF-PQ scan
// and exact re-ranking.
//
// Internal linkage on purpose: the kernels that include this header are compiled
// once per instruction-set level (csrc/dispatch.cpp). An inline function with
// external linkage would be one symbol for all levels, and the linker could keep
// the AVX-512 copy for the baseline variant.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace fastface {
namespace {

template <bool kIP>
inline bool better(float a, int64_t ia, float b, int64_t ib) {
  if (kIP) return a > b || (a == b && ia < ib);
  return a < b || (a == b && ia < ib);
}

// Reused buffers of TopK::sorted (one per thread).
struct SortScratch {
  std::vector<int64_t> order, by_id;
  std::vector<uint8_t> dup;
};

// The root is the worst entry kept; D and I have room for k entries.
template <bool kIP>
class TopK {
 public:
  TopK(float* D, int64_t* I, int64_t k) : D_(D), I_(I), k_(k) {}

  // True when (s, id) would enter: the heap has room or it beats the root.
  bool admits(float s, int64_t id) const { return n_ < k_ || better<kIP>(s, id, D_[0], I_[0]); }

  void push(float s, int64_t id) {
    if (n_ < k_) {
      int64_t i = n_++;
      while (i > 0) {
        const int64_t p = (i - 1) / 2;
        if (!better<kIP>(D_[p], I_[p], s, id)) break;
        D_[i] = D_[p];
        I_[i] = I_[p];
        i = p;
      }
      D_[i] = s;
      I_[i] = id;
      return;
    }
    int64_t i = 0;
    for (;;) {
      const int64_t l = 2 * i + 1;
      if (l >= n_) break;
      int64_t w = l;  // the worse child moves up
      if (l + 1 < n_ && better<kIP>(D_[l], I_[l], D_[l + 1], I_[l + 1])) w = l + 1;
      if (!better<kIP>(s, id, D_[w], I_[w])) break;
      D_[i] = D_[w];
      I_[i] = I_[w];
      i = w;
    }
    D_[i] = s;
    I_[i] = id;
  }

  int64_t size() const { return n_; }

  // Writes the entries best first into out_D / out_I (k_out slots, padded). With
  // unique_ids, only the first (best) entry of each id is written: a vector held
  // in two lists (spilled assignment) enters the heap up to twice, and a heap of
  // 2 * k_out - 1 entries always holds the best entry of each of the k_out best ids.
  void sorted(float* out_D, int64_t* out_I, int64_t k_out, bool unique_ids,
              SortScratch& scratch) const {
    std::vector<int64_t>& order = scratch.order;
    std::vector<uint8_t>& dup = scratch.dup;
    order.resize(static_cast<size_t>(n_));
    for (int64_t t = 0; t < n_; ++t) order[t] = t;
    std::sort(order.begin(), order.end(),
              [this](int64_t a, int64_t b) { return better<kIP>(D_[a], I_[a], D_[b], I_[b]); });
    if (unique_ids && n_ > 1) {
      // dup[r] = 1 when the entry of rank r repeats the id of a better-ranked entry
      dup.assign(static_cast<size_t>(n_), 0);
      std::vector<int64_t>& by_id = scratch.by_id;
      by_id.resize(static_cast<size_t>(n_));
      for (int64_t r = 0; r < n_; ++r) by_id[r] = r;
      std::sort(by_id.begin(), by_id.end(), [this, &order](int64_t a, int64_t b) {
        const int64_t ia = I_[order[a]], ib = I_[order[b]];
        return ia < ib || (ia == ib && a < b);
      });
      for (int64_t t = 1; t < n_; ++t) {
        if (I_[order[by_id[t]]] == I_[order[by_id[t - 1]]]) dup[by_id[t]] = 1;
      }
    }
    const float pad =
        kIP ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
    int64_t out = 0;
    for (int64_t r = 0; r < n_ && out < k_out; ++r) {
      if (unique_ids && n_ > 1 && dup[r]) continue;
      out_D[out] = D_[order[r]];
      out_I[out] = I_[order[r]];
      ++out;
    }
    for (; out < k_out; ++out) {
      out_D[out] = pad;
      out_I[out] = -1;
    }
  }

 private:
  float* D_;
  int64_t* I_;
  int64_t k_;
  int64_t n_ = 0;
};

}  // namespace
}  // namespace fastface
