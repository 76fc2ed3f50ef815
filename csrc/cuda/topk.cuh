// Block-wide top-k of (score, id) pairs, in shared memory.
//
// Layout: `key`/`val` hold P = 2^p slots. Slots [0, K) are the current
// top-K, sorted best first; slots [K, K + cap) are a buffer of candidates
// that beat the K-th best seen so far. Each round every thread offers at
// most one candidate (a shared atomic counter hands out buffer slots); when
// the buffer might not take another round, the block sorts all P slots
// (bitonic network, empty slots padded as the worst) and the first K are the
// new top-K. The order is total (score, then lower id; ids are unique), so
// the result is the exact top-K whatever order candidates arrive in: the same
// on the GPU, where atomics interleave, and in the sequential emulation.
#pragma once

#include "common.cuh"

namespace fastface {
namespace cuda {

struct TopKShared {
  float* key;
  int64_t* val;
  int* count;      // candidates in the buffer
  float* thr_key;  // K-th best so far (the bar a candidate must beat)
  int64_t* thr_val;
};

// Slots for k results with `nthreads` threads offering per round.
FF_HD int topk_slots(int k, int nthreads) {
  int p = 1;
  while (p < k + 2 * nthreads) p <<= 1;
  return p;
}

FF_HD size_t topk_shared_bytes(int k, int nthreads) {
  const size_t p = static_cast<size_t>(topk_slots(k, nthreads));
  return p * (sizeof(float) + sizeof(int64_t)) + 4 * sizeof(int64_t);
}

// Carves the top-k state out of `smem` (8-byte aligned).
FF_HD TopKShared topk_carve(unsigned char* smem, int k, int nthreads) {
  const int p = topk_slots(k, nthreads);
  TopKShared s;
  s.val = reinterpret_cast<int64_t*>(smem);
  s.thr_val = s.val + p;
  s.key = reinterpret_cast<float*>(s.thr_val + 1);
  s.thr_key = s.key + p;
  s.count = reinterpret_cast<int*>(s.thr_key + 1);
  return s;
}

// One compare-exchange step of the bitonic network over P slots.
FF_HD void bitonic_step(const TopKShared& s, int i, int size, int stride, bool larger) {
  const int j = i ^ stride;
  if (j <= i) return;
  // ascending runs put the better pair first
  const bool best_first = (i & size) == 0;
  const bool swap = best_first ? better(s.key[j], s.val[j], s.key[i], s.val[i], larger)
                               : better(s.key[i], s.val[i], s.key[j], s.val[j], larger);
  if (swap) {
    const float tk = s.key[i];
    s.key[i] = s.key[j];
    s.key[j] = tk;
    const int64_t tv = s.val[i];
    s.val[i] = s.val[j];
    s.val[j] = tv;
  }
}

template <class Exec>
FF_HD void topk_init(const Exec& ex, const TopKShared& s, int k, bool larger) {
  const int p = topk_slots(k, ex.nthreads());
  ex.threads([&](int t) {
    for (int i = t; i < p; i += ex.nthreads()) {
      s.key[i] = worst_score(larger);
      s.val[i] = -1;
    }
    if (t == 0) {
      *s.count = 0;
      *s.thr_key = worst_score(larger);
      *s.thr_val = -1;
    }
  });
}

// Offered by one thread: enters the buffer if it beats the K-th best.
template <class Exec>
FF_HD void topk_offer(const Exec& ex, const TopKShared& s, int k, float score, int64_t id,
                      bool larger) {
  if (!better(score, id, *s.thr_key, *s.thr_val, larger)) return;
  const int pos = ex.atomic_add(s.count, 1);
  s.key[k + pos] = score;
  s.val[k + pos] = id;
}

// Sorts the top-K and the buffer together; the first K slots become the top-K.
template <class Exec>
FF_HD void topk_merge(const Exec& ex, const TopKShared& s, int k, bool larger) {
  const int nt = ex.nthreads();
  const int p = topk_slots(k, nt);
  const int filled = k + *s.count;  // read by every thread after a barrier
  ex.threads([&](int t) {
    for (int i = filled + t; i < p; i += nt) {
      s.key[i] = worst_score(larger);
      s.val[i] = -1;
    }
  });
  for (int size = 2; size <= p; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      ex.threads([&](int t) {
        for (int i = t; i < p; i += nt) bitonic_step(s, i, size, stride, larger);
      });
    }
  }
  ex.threads([&](int t) {
    if (t == 0) {
      *s.count = 0;
      *s.thr_key = s.key[k - 1];
      *s.thr_val = s.val[k - 1];
    }
  });
}

// Called after each round of offers: merges when one more round might overflow.
template <class Exec>
FF_HD void topk_after_round(const Exec& ex, const TopKShared& s, int k, bool larger) {
  const int nt = ex.nthreads();
  const int cap = topk_slots(k, nt) - k;
  if (*s.count > cap - nt) topk_merge(ex, s, k, larger);
}

template <class Exec>
FF_HD void topk_finish(const Exec& ex, const TopKShared& s, int k, bool larger) {
  if (*s.count > 0) topk_merge(ex, s, k, larger);
}

// --- selection kernel: top-k of each row of a (rows, n) score matrix ------------------------
// ids: (rows, n) or null, then the column index is the id. Output (rows, k).
struct SelectArgs {
  const float* scores;
  const int64_t* ids;
  int64_t rows, n;
  int k;
  bool larger;
  float* out_D;
  int64_t* out_I;
};

template <class Exec>
FF_HD void select_block(const Exec& ex, const SelectArgs& a, int64_t row, unsigned char* smem) {
  const TopKShared s = topk_carve(smem, a.k, ex.nthreads());
  const int nt = ex.nthreads();
  topk_init(ex, s, a.k, a.larger);
  const float* sc = a.scores + row * a.n;
  const int64_t* ids = a.ids != nullptr ? a.ids + row * a.n : nullptr;
  for (int64_t base = 0; base < a.n; base += nt) {
    ex.threads([&](int t) {
      const int64_t c = base + t;
      if (c < a.n) {
        const int64_t id = ids != nullptr ? ids[c] : c;
        if (id >= 0) topk_offer(ex, s, a.k, sc[c], id, a.larger);
      }
    });
    topk_after_round(ex, s, a.k, a.larger);
  }
  topk_finish(ex, s, a.k, a.larger);
  ex.threads([&](int t) {
    for (int i = t; i < a.k; i += nt) {
      a.out_D[row * a.k + i] = s.key[i];
      a.out_I[row * a.k + i] = s.val[i];
    }
  });
}

}  // namespace cuda
}  // namespace fastface
