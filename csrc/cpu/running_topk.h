// Running top-k per row with a threshold filter: the inner loop of the fused encoders.
//
// Scores stream in latent order. A row keeps an unsorted candidate buffer of capacity `cap` (>= k)
// and a threshold `thr` (the k-th best score so far, -inf until k candidates exist). A score is a
// candidate only if it is > thr, so after the first few hundred latents one vector compare rejects
// 16 scores at a time. When the buffer fills, nth_element keeps the best k and thr rises.
// Order: higher score first, ties to the lower latent index (reference.py). Because latents arrive
// in ascending order, a later score equal to thr loses to the k-th candidate, so `> thr` is exact.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SAE_FAST_AVX512 1
#elif defined(__AVX2__)
#include <immintrin.h>
#define SAE_FAST_AVX2 1
#endif

namespace sae_fast {

struct Cand {
  float v;
  int32_t i;
};

inline bool better(const Cand& a, const Cand& b) { return a.v > b.v || (a.v == b.v && a.i < b.i); }

// Buffer capacity for a top-k: amortises each nth_element over at least k (and 32) insertions.
inline int64_t topk_capacity(int64_t k) { return k + std::max<int64_t>(k, 32); }

struct RunningTopK {
  Cand* buf = nullptr;
  int32_t count = 0;
  int32_t k = 0;
  int32_t cap = 0;
  float thr = -std::numeric_limits<float>::infinity();

  void push(float v, int32_t i) {
    buf[count++] = Cand{v, i};
    if (count == k) {
      float m = buf[0].v;
      for (int32_t j = 1; j < k; ++j) m = std::min(m, buf[j].v);
      thr = std::max(thr, m);  // all k candidates are the top k so far: the k-th best is their minimum
    } else if (count == cap) {
      std::nth_element(buf, buf + (k - 1), buf + count, better);
      count = k;
      thr = buf[k - 1].v;
    }
  }

  // Sorted best-first top min(k, count) into out (returns how many).
  int32_t finish(Cand* out) {
    const int32_t m = std::min(k, count);
    std::partial_sort_copy(buf, buf + count, out, out + m, better);
    return m;
  }
};

// Feed scores s[j] + bias[j] of latents c0 .. c0+m-1 to `top`, and to `aux` for latents with
// keep[j] != 0 (AuxK's dead set; aux may be null). bias and keep point at latent c0.
inline void scan_scores(const float* s, const float* bias, int64_t m, int32_t c0, RunningTopK& top,
                        RunningTopK* aux, const uint8_t* keep) {
  int64_t j = 0;
#if defined(SAE_FAST_AVX512)
  alignas(64) float tmp[16];
  __m512 t = _mm512_set1_ps(top.thr);
  __m512 ta = _mm512_set1_ps(aux ? aux->thr : 0.f);
  for (; j + 16 <= m; j += 16) {
    const __m512 v = _mm512_add_ps(_mm512_loadu_ps(s + j), _mm512_loadu_ps(bias + j));
    __mmask16 hit = _mm512_cmp_ps_mask(v, t, _CMP_GT_OQ);
    __mmask16 hit_aux = 0;
    if (aux) {
      const __m128i kb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(keep + j));
      hit_aux = _mm512_mask_cmp_ps_mask(_mm_test_epi8_mask(kb, kb), v, ta, _CMP_GT_OQ);
    }
    if (!(hit | hit_aux)) continue;
    _mm512_store_ps(tmp, v);
    for (; hit; hit &= hit - 1) {
      const int l = __builtin_ctz(hit);
      if (tmp[l] > top.thr) top.push(tmp[l], c0 + static_cast<int32_t>(j) + l);
    }
    for (; hit_aux; hit_aux &= hit_aux - 1) {
      const int l = __builtin_ctz(hit_aux);
      if (tmp[l] > aux->thr) aux->push(tmp[l], c0 + static_cast<int32_t>(j) + l);
    }
    t = _mm512_set1_ps(top.thr);
    if (aux) ta = _mm512_set1_ps(aux->thr);
  }
#elif defined(SAE_FAST_AVX2)
  alignas(32) float tmp[8];
  __m256 t = _mm256_set1_ps(top.thr);
  for (; j + 8 <= m; j += 8) {
    const __m256 v = _mm256_add_ps(_mm256_loadu_ps(s + j), _mm256_loadu_ps(bias + j));
    int hit = _mm256_movemask_ps(_mm256_cmp_ps(v, t, _CMP_GT_OQ));
    int hit_aux = 0;
    if (aux) {
      hit_aux = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(aux->thr), _CMP_GT_OQ));
      for (int l = 0; l < 8; ++l) if (!keep[j + l]) hit_aux &= ~(1 << l);
    }
    if (!(hit | hit_aux)) continue;
    _mm256_store_ps(tmp, v);
    for (; hit; hit &= hit - 1) {
      const int l = __builtin_ctz(hit);
      if (tmp[l] > top.thr) top.push(tmp[l], c0 + static_cast<int32_t>(j) + l);
    }
    for (; hit_aux; hit_aux &= hit_aux - 1) {
      const int l = __builtin_ctz(hit_aux);
      if (tmp[l] > aux->thr) aux->push(tmp[l], c0 + static_cast<int32_t>(j) + l);
    }
    t = _mm256_set1_ps(top.thr);
  }
#endif
  for (; j < m; ++j) {
    const float v = s[j] + bias[j];
    if (v > top.thr) top.push(v, c0 + static_cast<int32_t>(j));
    if (aux && keep[j] && v > aux->thr) aux->push(v, c0 + static_cast<int32_t>(j));
  }
}

}  // namespace sae_fast
