// Per-row selection state for the encoders: the inner loops that see every pre-activation.
//
// TopK: scores stream in ascending latent order. A row keeps a candidate buffer (values and latent
// ids, in ascending latent order) and a threshold `thr`, the k-th best score so far (-inf until k
// candidates exist). Only scores > thr are appended, so after the first few hundred latents one vector
// compare rejects 16 (AVX-512) or 8 (AVX2) scores at a time; with AVX-512 the rare hits are appended by
// a register compress and one 16-lane store, with AVX2 one by one.
// When the buffer is full a stable compaction keeps the best k and raises thr.
// Order: higher score first, ties to the lower latent index (reference.py). Latents arrive in
// ascending order, so a later score equal to thr loses to the k-th candidate: `> thr` is exact.
//
// NaN: as in torch.topk (reference.py), NaN ranks above every number, and NaN ties NaN (lower latent
// first). `better` and `same` below are those comparisons; plain `>` would silently drop NaN scores.
//
// Threshold lists (ReLU, JumpReLU, BatchTopK at inference): append every score > cutoff[latent] while
// the row has room; the count keeps going past the capacity so the caller sees the overflow.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define SAE_FAST_AVX512 1
#elif defined(__AVX2__)
#include <immintrin.h>
#define SAE_FAST_AVX2 1
#endif

namespace sae_fast {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline bool is_nan(float a) { return a != a; }

#ifdef SAE_FAST_AVX512
// Compress in a register, then one full 16-lane store: a compress-store to memory is microcoded on Zen 4
// (measured: most of the AuxK scan's time). Callers leave 16 slots of room at dst; lanes past the kept
// ones are scratch (never read: counts say how many slots hold entries).
inline void compress_store(float* dst, __mmask16 keep, __m512 x) {
  _mm512_storeu_ps(dst, _mm512_maskz_compress_ps(keep, x));
}
inline void compress_store(int32_t* dst, __mmask16 keep, __m512i x) {
  _mm512_storeu_si512(dst, _mm512_maskz_compress_epi32(keep, x));
}
#endif
// a ranks above b (NaN above every number; nothing above NaN).
inline bool better(float a, float b) { return !is_nan(b) && !(a <= b); }
// a and b rank the same.
inline bool same(float a, float b) { return a == b || (is_nan(a) && is_nan(b)); }

// Buffer capacity for a running top-k: room for a 16-wide append after k, and each compaction
// (O(capacity)) is paid for by at least max(k, 32) appends.
inline int64_t topk_capacity(int64_t k) { return k + std::max<int64_t>(k, 32) + 16; }

// The k-th largest of v[0..count) (1 <= k <= count) by radix select on order-preserving keys: one
// histogram pass over all values, then passes over the shrinking bucket. Branch-light; several times
// faster than std::nth_element at the few hundred values a compaction sees.
inline float kth_largest(const float* v, int64_t count, int64_t k) {
  thread_local std::vector<uint32_t> cur, next;
  cur.resize(count);
  for (int64_t s = 0; s < count; ++s) {
    uint32_t u;
    std::memcpy(&u, v + s, 4);
    // Any NaN (either sign) gets the top key, so it decodes to a NaN that ranks above everything.
    cur[s] = is_nan(v[s]) ? 0xFFFFFFFFu : u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
  }
  int64_t need = k;  // rank of the answer, counted from the top, among the values left in cur
  int64_t m = count;  // values left
  next.resize(count);
  for (int shift = 24; shift >= 0; shift -= 8) {
    // Four interleaved histograms: scores share few top bytes, and one histogram's increments of the
    // same bin wait on each other (store-to-load forwarding); this loop was most of a compaction.
    uint32_t h4[4][256] = {};
    int64_t s = 0;
    for (; s + 4 <= m; s += 4)
      for (int q = 0; q < 4; ++q) ++h4[q][(cur[s + q] >> shift) & 255];
    for (; s < m; ++s) ++h4[0][(cur[s] >> shift) & 255];
    uint32_t bin = 255;
    for (;; --bin) {
      const uint32_t h = h4[0][bin] + h4[1][bin] + h4[2][bin] + h4[3][bin];
      if (bin == 0 || h >= need) break;
      need -= h;
    }
    int64_t w = 0;  // keep the values in the chosen bin, branch-free
    for (s = 0; s < m; ++s) {
      const uint32_t key = cur[s];
      next[w] = key;
      w += ((key >> shift) & 255) == bin;
    }
    cur.swap(next);
    m = w;
  }
  const uint32_t key = cur[0];  // every value left has this key
  const uint32_t u = key ^ ((key & 0x80000000u) ? 0x80000000u : 0xFFFFFFFFu);
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct RunningTopK {
  float* v;
  int32_t* i;
  int64_t count;
  int64_t k;
  int64_t cap;
  float thr;

  // Keep the best k (count >= k) in place, in their ascending latent order; thr = the k-th best.
  // Out of line: it is rare, and inlined it would crowd the scan loop's registers.
  __attribute__((noinline)) void compact() {
    const float t = kth_largest(v, count, k);
    int64_t above = 0, equal = 0;
#pragma omp simd reduction(+ : above, equal)
    for (int64_t s = 0; s < count; ++s) {
      above += better(v[s], t);
      equal += same(v[s], t);
    }
    int64_t w = 0;
    if (above + equal == k) {  // no tie to break (the usual case): keep every v >= t
#ifdef SAE_FAST_AVX512
      // keep = v >= t in the NaN order: "not less than" (true for NaN v) when t is a number, NaN v only
      // when t is NaN.
      const __m512 tv = _mm512_set1_ps(t);
      const bool t_nan = is_nan(t);
      int64_t s = 0;
      for (; !t_nan && s + 16 <= count; s += 16) {
        const __m512 x = _mm512_loadu_ps(v + s);
        const __mmask16 keep = _mm512_cmp_ps_mask(x, tv, _CMP_NLT_UQ);
        const __m512i ids = _mm512_loadu_si512(i + s);
        // Full-width stores at w <= s touch only this block (already loaded) and earlier slots.
        compress_store(v + w, keep, x);
        compress_store(i + w, keep, ids);
        w += __builtin_popcount(keep);
      }
      for (; s < count; ++s)
#else
      for (int64_t s = 0; s < count; ++s)
#endif
        if (better(v[s], t) || same(v[s], t)) {
          v[w] = v[s];
          i[w] = i[s];
          ++w;
        }
      count = k;
      thr = t;
      return;
    }
    int64_t ties = k - above;  // of the scores equal to t, the lowest latents (first ones) stay
    for (int64_t s = 0; s < count; ++s) {
      if (better(v[s], t) || (same(v[s], t) && ties-- > 0)) {
        v[w] = v[s];
        i[w] = i[s];
        ++w;
      }
    }
    count = k;
    thr = t;
  }

  void push(float val, int32_t lat) {
    if (count == cap) compact();
    v[count] = val;
    i[count] = lat;
    if (++count == k && thr == kNegInf) compact();
  }

#ifdef SAE_FAST_AVX512
  __attribute__((noinline)) void push16(__m512 vals, __mmask16 hit, int32_t base) {
    if (count + 16 > cap) compact();
    const __m512i lat = _mm512_add_epi32(_mm512_set1_epi32(base),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    compress_store(v + count, hit, vals);
    compress_store(i + count, hit, lat);
    count += __builtin_popcount(hit);
    if (count >= k && thr == kNegInf) compact();
  }
#endif

  // The best min(k, count), best first, into out_v / out_i; pads with (-inf, 0) up to k.
  // Sorted as 64-bit keys, several times faster than a comparator sort at AuxK's k = 192: high half the
  // inverted order key of the value (-0 as +0, every NaN the top key), low half the slot. The buffer is
  // in ascending latent order, so ascending keys are: NaN first, then descending values, ties (== or
  // both NaN, as `same`) to the lower latent.
  void finish(float* out_v, int32_t* out_i) {
    if (count > k) compact();
    thread_local std::vector<uint64_t> keys;
    keys.resize(count);
    for (int64_t s = 0; s < count; ++s) {
      const float x = v[s] + 0.f;  // -0 -> +0
      uint32_t u;
      std::memcpy(&u, &x, 4);
      const uint32_t key = is_nan(x) ? 0xFFFFFFFFu : u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
      keys[s] = (static_cast<uint64_t>(~key) << 32) | static_cast<uint64_t>(s);
    }
    std::sort(keys.begin(), keys.end());
    for (int64_t s = 0; s < k; ++s) {
      const int64_t slot = s < count ? static_cast<int64_t>(keys[s] & 0xFFFFFFFFu) : -1;
      out_v[s] = slot >= 0 ? v[slot] : kNegInf;
      out_i[s] = slot >= 0 ? i[slot] : 0;
    }
  }
};

#if defined(SAE_FAST_AVX512) || defined(SAE_FAST_AVX2)
inline float filter_thr(float thr) { return is_nan(thr) ? std::numeric_limits<float>::infinity() : thr; }
#endif

#ifdef SAE_FAST_AVX2
// The hits of one 8-wide compare, in latent order; out of line so the scan loop keeps its registers.
template <bool AUX>
__attribute__((noinline)) void push_hits(const float* s, const float* bias, int hit, int hit_aux, int32_t base,
                                         RunningTopK& top, RunningTopK* aux) {
  for (int l = 0; l < 8; ++l) {
    const float v = s[l] + bias[l];
    if ((hit >> l & 1) && better(v, top.thr)) top.push(v, base + l);
    if (AUX && (hit_aux >> l & 1) && better(v, aux->thr)) aux->push(v, base + l);
  }
}
#endif

// Feed scores s[j] + bias[j] of latents c0 .. c0+m-1 to `top`, and to `aux` for latents with
// keep[j] != 0 (AuxK's dead set; aux may be null). bias and keep point at latent c0.
template <bool AUX>
inline void scan_topk_t(const float* s, const float* bias, int64_t m, int32_t c0, RunningTopK& top,
                        RunningTopK* aux, const uint8_t* keep) {
  int64_t j = 0;
#ifdef SAE_FAST_AVX512
  // The loop keeps only pointers and thresholds in registers; hits (rare) go out of line.
  // Candidates: better(v, thr), i.e. "not <=" (true for NaN v). Once thr is NaN nothing can beat it,
  // yet "not <= NaN" is true for all: filter_thr maps a NaN thr to +inf, where only NaN v pass and the
  // compaction drops them again (a later NaN loses the tie), which keeps the result exact.
  __m512 t = _mm512_set1_ps(filter_thr(top.thr));
  __m512 ta = _mm512_set1_ps(AUX ? filter_thr(aux->thr) : 0.f);
  for (; j + 16 <= m; j += 16) {
    const __m512 v = _mm512_add_ps(_mm512_loadu_ps(s + j), _mm512_loadu_ps(bias + j));
    const __mmask16 hit = _mm512_cmp_ps_mask(v, t, _CMP_NLE_UQ);
    if (__builtin_expect(hit != 0, 0)) {
      top.push16(v, hit, c0 + static_cast<int32_t>(j));
      t = _mm512_set1_ps(filter_thr(top.thr));
    }
    if (AUX) {
      const __m512i kb = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(keep + j)));
      const __mmask16 hit_aux = _mm512_mask_cmp_ps_mask(_mm512_test_epi32_mask(kb, kb), v, ta, _CMP_NLE_UQ);
      if (__builtin_expect(hit_aux != 0, 0)) {
        aux->push16(v, hit_aux, c0 + static_cast<int32_t>(j));
        ta = _mm512_set1_ps(filter_thr(aux->thr));
      }
    }
  }
#elif defined(SAE_FAST_AVX2)
  // No compress-store: one compare + movemask rejects 8 scores; the rare hits are re-checked one by
  // one against the current threshold (a compaction may raise it mid-vector), which keeps it exact.
  for (; j + 8 <= m; j += 8) {
    const __m256 v = _mm256_add_ps(_mm256_loadu_ps(s + j), _mm256_loadu_ps(bias + j));
    int hit = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(filter_thr(top.thr)), _CMP_NLE_UQ));
    int hit_aux = 0;
    if (AUX) {
      hit_aux = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(filter_thr(aux->thr)), _CMP_NLE_UQ));
      for (int h = hit_aux; h; h &= h - 1) hit_aux &= ~((keep[j + __builtin_ctz(h)] == 0) << __builtin_ctz(h));
    }
    if (__builtin_expect((hit | hit_aux) != 0, 0))
      push_hits<AUX>(s + j, bias + j, hit, hit_aux, c0 + static_cast<int32_t>(j), top, aux);
  }
#endif
  for (; j < m; ++j) {
    const float v = s[j] + bias[j];
    if (better(v, top.thr)) top.push(v, c0 + static_cast<int32_t>(j));
    if (AUX && keep[j] && better(v, aux->thr)) aux->push(v, c0 + static_cast<int32_t>(j));
  }
}

inline void scan_topk(const float* s, const float* bias, int64_t m, int32_t c0, RunningTopK& top,
                      RunningTopK* aux, const uint8_t* keep) {
  if (aux) scan_topk_t<true>(s, bias, m, c0, top, aux, keep);
  else scan_topk_t<false>(s, bias, m, c0, top, nullptr, nullptr);
}

// Append (s[j] + bias[j], c0 + j) for every j with s[j] + bias[j] > cutoff[j] to a row list of
// capacity cap holding `count` entries; returns the new count, which may exceed cap (entries past
// cap are counted, not stored).
inline int64_t scan_threshold(const float* s, const float* bias, const float* cutoff, int64_t m, int32_t c0,
                              float* v, int32_t* i, int64_t count, int64_t cap) {
  int64_t j = 0;
#ifdef SAE_FAST_AVX512
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; j + 16 <= m; j += 16) {
    const __m512 val = _mm512_add_ps(_mm512_loadu_ps(s + j), _mm512_loadu_ps(bias + j));
    const __mmask16 hit = _mm512_cmp_ps_mask(val, _mm512_loadu_ps(cutoff + j), _CMP_GT_OQ);
    if (!hit) continue;
    if (count + 16 <= cap) {
      compress_store(v + count, hit, val);
      compress_store(i + count, hit, _mm512_add_epi32(iota, _mm512_set1_epi32(c0 + j)));
      count += __builtin_popcount(hit);
    } else {
      for (__mmask16 h = hit; h; h &= h - 1) {
        const int l = __builtin_ctz(h);
        if (count < cap) {
          v[count] = s[j + l] + bias[j + l];
          i[count] = c0 + static_cast<int32_t>(j) + l;
        }
        ++count;
      }
    }
  }
#elif defined(SAE_FAST_AVX2)
  for (; j + 8 <= m; j += 8) {
    const __m256 val = _mm256_add_ps(_mm256_loadu_ps(s + j), _mm256_loadu_ps(bias + j));
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(val, _mm256_loadu_ps(cutoff + j), _CMP_GT_OQ));
    for (int h = hit; h; h &= h - 1) {
      const int l = __builtin_ctz(h);
      if (count < cap) {
        v[count] = s[j + l] + bias[j + l];
        i[count] = c0 + static_cast<int32_t>(j) + l;
      }
      ++count;
    }
  }
#endif
  for (; j < m; ++j) {
    const float val = s[j] + bias[j];
    if (val > cutoff[j]) {
      if (count < cap) {
        v[count] = val;
        i[count] = c0 + static_cast<int32_t>(j);
      }
      ++count;
    }
  }
  return count;
}

}  // namespace sae_fast
