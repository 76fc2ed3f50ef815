#include "merge.h"

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace fastface {

namespace {

using Entry = std::pair<float, int64_t>;

template <bool kLarger>
bool better(const Entry& a, const Entry& b) {
  if (a.first != b.first) return kLarger ? a.first > b.first : a.first < b.first;
  return a.second < b.second;
}

template <bool kLarger>
void merge_one(const float* D, const int64_t* I, int64_t nparts, int64_t nq, int64_t k_in,
               int64_t k_out, int64_t q, std::vector<Entry>& buf, float* out_D, int64_t* out_I) {
  buf.clear();
  const int64_t stride = nq * k_in;
  for (int64_t s = 0; s < nparts; ++s) {
    const int64_t base = s * stride + q * k_in;
    for (int64_t r = 0; r < k_in; ++r) {
      if (I[base + r] >= 0) buf.emplace_back(D[base + r], I[base + r]);
    }
  }
  const int64_t size = static_cast<int64_t>(buf.size());
  const int64_t n = std::min<int64_t>(k_out, size);
  // One part sorted by score, ties in any order (FAISS's fast-scan rows, whose 4-bit
  // scores tie often): only each run of equal scores needs sorting, by id.
  const auto by_score = [](const Entry& a, const Entry& b) {
    return kLarger ? a.first > b.first : a.first < b.first;
  };
  if (std::is_sorted(buf.begin(), buf.end(), by_score)) {
    for (int64_t lo = 0; lo < n;) {
      int64_t hi = lo + 1;
      while (hi < size && buf[hi].first == buf[lo].first) ++hi;
      if (hi - lo > 1) std::sort(buf.begin() + lo, buf.begin() + hi, better<kLarger>);
      lo = hi;
    }
  } else if (4 * n >= size) {
    // partial_sort is a heap sort: slow and branchy when most of the input is kept
    std::sort(buf.begin(), buf.end(), better<kLarger>);
  } else {
    std::partial_sort(buf.begin(), buf.begin() + n, buf.end(), better<kLarger>);
  }
  const float pad =
      kLarger ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < k_out; ++t) {
    out_D[q * k_out + t] = t < n ? buf[t].first : pad;
    out_I[q * k_out + t] = t < n ? buf[t].second : -1;
  }
}

// An integer key whose unsigned order is the float order, better first (smaller
// L2, larger inner product). -0 is keyed as +0 (they compare equal).
template <bool kLarger>
inline uint32_t order_key(float s) {
  float v = (kLarger ? -s : s) + 0.0f;
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Above this k the radix select below is faster than a heap (measured: 1,000 rows
// of 2,048 scores: k = 32 about equal, k = 64 1.6x slower by heap).
constexpr int64_t kHeapMax = 32;

// Reused buffers of select_one (one per thread).
struct SelectScratch {
  std::vector<uint64_t> keys, spare;  // (key << 32) | column
  std::vector<uint32_t> k32, cur;
};

// Stable sort of (key << 32 | column) entries by key: four passes of 8 bits
// (least significant first) over the key, so equal keys keep their order.
void radix_sort_by_key(std::vector<uint64_t>& a, std::vector<uint64_t>& spare) {
  spare.resize(a.size());
  for (int shift = 32; shift < 64; shift += 8) {
    int64_t count[257] = {0};
    for (const uint64_t v : a) ++count[((v >> shift) & 0xffu) + 1];
    for (int b = 0; b < 256; ++b) count[b + 1] += count[b];
    for (const uint64_t v : a) spare[count[(v >> shift) & 0xffu]++] = v;
    a.swap(spare);
  }
}

// Top-k columns of one row (scores already computed into `row`). Every entry is
// packed as (key << 32) | column, so one integer comparison applies the whole
// tie rule. A small k (at most kHeapMax) keeps a bounded heap whose root (the worst entry kept)
// rejects most columns with one comparison; a large k finds the k-th best key
// (a radix select: linear, without the unpredictable branches of a partition),
// takes the entries better than it and, in column order, as many of those equal
// to it as fit, and sorts them by key with a stable radix sort.
template <bool kLarger>
void select_one(const float* row, int64_t n, int64_t k, SelectScratch& sc, float* out_D,
                int64_t* out_I) {
  const int64_t m = std::min(k, n);
  std::vector<uint64_t>& keys = sc.keys;
  keys.clear();
  const auto entry = [row](int64_t j) {
    return (static_cast<uint64_t>(order_key<kLarger>(row[j])) << 32) | static_cast<uint32_t>(j);
  };
  if (m > 0 && m <= kHeapMax && 8 * m <= n) {
    for (int64_t j = 0; j < m; ++j) keys.push_back(entry(j));
    std::make_heap(keys.begin(), keys.end());  // front: the worst entry kept
    uint64_t* h = keys.data();
    for (int64_t j = m; j < n; ++j) {
      const uint64_t e = entry(j);
      if (e >= h[0]) continue;
      // replace the root and sift it down (one pass, where pop + push take two)
      int64_t i = 0;
      for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= m) break;
        if (c + 1 < m && h[c + 1] > h[c]) ++c;
        if (h[c] <= e) break;
        h[i] = h[c];
        i = c;
      }
      h[i] = e;
    }
    std::sort_heap(keys.begin(), keys.end());  // best first
  } else if (m > 0) {
    std::vector<uint32_t>& k32 = sc.k32;
    k32.resize(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) k32[j] = order_key<kLarger>(row[j]);
    uint32_t kth = 0xffffffffu;
    int64_t ties = m;  // entries equal to kth still to take
    if (m < n) {
      // radix select: the byte of the m-th smallest key, most significant first,
      // each pass over the keys that still share the bytes found so far
      std::vector<uint32_t>& cur = sc.cur;
      cur.assign(k32.begin(), k32.end());
      int64_t need = m;  // rank of the wanted key among cur (1-based)
      for (int shift = 24; shift >= 0; shift -= 8) {
        int64_t count[256] = {0};
        for (const uint32_t v : cur) ++count[(v >> shift) & 0xffu];
        uint32_t b = 0;
        while (need > count[b]) need -= count[b++];
        int64_t o = 0;
        for (const uint32_t v : cur) {  // keep the bucket (a store and an add: no branch)
          cur[o] = v;
          o += ((v >> shift) & 0xffu) == b;
        }
        cur.resize(static_cast<size_t>(o));
      }
      kth = cur[0];  // every key left equals it; `need` of them belong to the top m
      ties = need;
    }
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t key = k32[j];
      if (key < kth || (key == kth && ties-- > 0)) {
        keys.push_back((static_cast<uint64_t>(key) << 32) | static_cast<uint32_t>(j));
      }
    }
    radix_sort_by_key(keys, sc.spare);
  }
  const float pad =
      kLarger ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < k; ++t) {
    const int64_t col = t < m ? static_cast<int64_t>(keys[t] & 0xffffffffu) : -1;
    out_D[t] = t < m ? row[col] : pad;
    out_I[t] = col;
  }
}

}  // namespace

void select_topk(const float* S, int64_t nq, int64_t n, int64_t k, bool larger_is_better,
                 const float* row_norms, const float* col_norms, float* out_D, int64_t* out_I) {
#pragma omp parallel if (nq > 16)
  {
    SelectScratch scratch;
    std::vector<float> dis;
    if (col_norms != nullptr) dis.resize(static_cast<size_t>(n));
#pragma omp for schedule(static)
    for (int64_t q = 0; q < nq; ++q) {
      const float* row = S + q * n;
      if (col_norms != nullptr) {  // squared L2 from inner products, as FAISS's flat search
        for (int64_t j = 0; j < n; ++j) {
          const float v = (row_norms[q] + col_norms[j]) - 2.0f * row[j];
          dis[j] = v < 0.0f ? 0.0f : v;
        }
        row = dis.data();
      }
      if (larger_is_better) {
        select_one<true>(row, n, k, scratch, out_D + q * k, out_I + q * k);
      } else {
        select_one<false>(row, n, k, scratch, out_D + q * k, out_I + q * k);
      }
    }
  }
}

void merge_topk(const float* D, const int64_t* I, int64_t nparts, int64_t nq, int64_t k_in,
                int64_t k_out, bool larger_is_better, float* out_D, int64_t* out_I) {
#pragma omp parallel if (nq > 64)
  {
    std::vector<Entry> buf;
    buf.reserve(static_cast<size_t>(nparts * k_in));
#pragma omp for schedule(static)
    for (int64_t q = 0; q < nq; ++q) {
      if (larger_is_better) {
        merge_one<true>(D, I, nparts, nq, k_in, k_out, q, buf, out_D, out_I);
      } else {
        merge_one<false>(D, I, nparts, nq, k_in, k_out, q, buf, out_D, out_I);
      }
    }
  }
}

}  // namespace fastface
