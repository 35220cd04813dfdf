// The latent-sorted structure shared by the backward (sparse_ops.cpp, matryoshka.cpp) and the fused
// training step (fused_step.cpp): a stable counting sort of a batch's entries by latent, then one thread
// per latent reduces that latent's entries in entry order. Every sum has one order, whatever the thread count.
#pragma once
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace sae_fast {
namespace detail {

// bf16 storage: widened to fp32 on load, rounded to nearest even on store (as torch's .to(bfloat16)).
inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void narrow(float v, float& out) { out = v; }
inline void narrow(float v, uint16_t& out) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  out = (v != v) ? static_cast<uint16_t>((u >> 16) | 0x40) : static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// Number of indices outside [0, n): kernels check before they read a row, with no host read of a tensor.
inline int64_t count_out_of_range(const int32_t* idx, int64_t E, int64_t n) {
  int64_t bad = 0;
#pragma omp simd reduction(+ : bad)
  for (int64_t e = 0; e < E; ++e) bad += (idx[e] < 0) | (idx[e] >= n);
  return bad;
}

// Stable counting sort of the E entries by latent: start (n+1) and entry ids in (latent, entry) order.
// A stable sort has one answer, so splitting the histogram over threads changes nothing. With `pre`,
// padding entries (pre == -inf: no gradient by definition) are left out, so list padding (index 0)
// does not pile onto one latent; with `dp` and/or `v`, so are entries whose given coefficients are all
// exactly zero (they add exactly nothing to finite rows). Returns the number of entries whose index is outside [0, n); those
// are left out too (the caller raises), so no kernel reads out of bounds.
inline int64_t sort_by_latent(const int32_t* idx, int64_t E, int64_t n, int threads, std::vector<int64_t>& start,
                              std::vector<int64_t>& entry, const float* pre = nullptr,
                              const float* dp = nullptr, const float* v = nullptr) {
  const int T = std::max<int64_t>(1, std::min<int64_t>(threads, E / 4096 + 1));
  std::vector<int64_t> hist(static_cast<size_t>(T) * (n + 1), 0);
  std::vector<int64_t> bad(T, 0);
  start.assign(n + 1, 0);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const bool coefs = dp || v;
  auto keep = [&](int64_t e) {
    if (pre && pre[e] == neg_inf) return false;
    return !coefs || (dp && dp[e] != 0.f) || (v && v[e] != 0.f);
  };
  auto in_range = [&](int64_t e) { return idx[e] >= 0 && idx[e] < n; };
#pragma omp parallel num_threads(T)
  {
#pragma omp for schedule(static)
    for (int t = 0; t < T; ++t) {
      int64_t* h = hist.data() + t * (n + 1);
      for (int64_t e = t * E / T, end = (t + 1) * E / T; e < end; ++e) {
        if (!in_range(e)) ++bad[t];
        else if (keep(e)) ++h[idx[e]];
      }
    }
#pragma omp single
    {
      int64_t run = 0;
      for (int64_t i = 0; i < n; ++i) {
        start[i] = run;
        for (int t = 0; t < T; ++t) {
          int64_t& h = hist[t * (n + 1) + i];
          const int64_t c = h;
          h = run;  // becomes this chunk's next write position for latent i
          run += c;
        }
      }
      start[n] = run;
      entry.resize(run);
    }
#pragma omp for schedule(static)
    for (int t = 0; t < T; ++t) {
      int64_t* h = hist.data() + t * (n + 1);
      for (int64_t e = t * E / T, end = (t + 1) * E / T; e < end; ++e)
        if (in_range(e) && keep(e)) entry[h[idx[e]]++] = e;
    }
  }
  int64_t total_bad = 0;
  for (int t = 0; t < T; ++t) total_bad += bad[t];
  return total_bad;
}

// out = sum over the latent's entries s of coef[s] * rows[roff[s]], reduced in entry order, written
// once per block of D columns (accumulators stay in registers; no memset, no read-modify-write).
template <int D, typename O>
inline void reduce_block(const int64_t* roff, const float* coef, int64_t cnt, const float* rows, int64_t c0,
                         O* out, const float* init = nullptr) {
  float acc[D] = {};
  if (init)
#pragma omp simd
    for (int c = 0; c < D; ++c) acc[c] = init[c0 + c];
  for (int64_t s = 0; s < cnt; ++s) {
    const float a = coef[s];
    const float* r = rows + roff[s] + c0;
#pragma omp simd
    for (int c = 0; c < D; ++c) acc[c] += a * r[c];
  }
#pragma omp simd
  for (int c = 0; c < D; ++c) narrow(acc[c], out[c0 + c]);
}

#if defined(__AVX512F__)
// AVX-512: up to 384 columns (24 zmm accumulators) per pass over the entries, so a row as wide as
// d = 384 is read once, contiguously (measured 3-15x faster than 64-column blocks for AuxK's ~100
// entries per dead latent). The same per-column sums, in the same entry order, as reduce_block.
constexpr int kSpanVectors = 24;

// init (null: zeros) is the accumulators' starting value, at column c0 like out.
template <int NV>
inline void reduce_span(const int64_t* roff, const float* coef, int64_t cnt, const float* rows, int64_t c0,
                        __mmask16 tail, const float* init, float* out) {
  __m512 acc[NV];
#pragma GCC unroll 24
  for (int j = 0; j < NV - 1; ++j) acc[j] = init ? _mm512_loadu_ps(init + 16 * j) : _mm512_setzero_ps();
  acc[NV - 1] = init ? _mm512_maskz_loadu_ps(tail, init + 16 * (NV - 1)) : _mm512_setzero_ps();
  for (int64_t s = 0; s < cnt; ++s) {
    const __m512 a = _mm512_set1_ps(coef[s]);
    const float* r = rows + roff[s] + c0;
#pragma GCC unroll 24
    for (int j = 0; j < NV - 1; ++j) acc[j] = _mm512_fmadd_ps(a, _mm512_loadu_ps(r + 16 * j), acc[j]);
    acc[NV - 1] = _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(tail, r + 16 * (NV - 1)), acc[NV - 1]);
  }
#pragma GCC unroll 24
  for (int j = 0; j < NV - 1; ++j) _mm512_storeu_ps(out + 16 * j, acc[j]);
  _mm512_mask_storeu_ps(out + 16 * (NV - 1), tail, acc[NV - 1]);
}

using SpanFn = void (*)(const int64_t*, const float*, int64_t, const float*, int64_t, __mmask16, const float*,
                        float*);
template <int... I>
constexpr std::array<SpanFn, sizeof...(I)> span_table(std::integer_sequence<int, I...>) {
  return {&reduce_span<I + 1>...};
}

// out = init + sum_s coef[s] * rows[roff[s]] (init may be null: zeros).
template <typename O>
inline void reduce_row(const int64_t* roff, const float* coef, int64_t cnt, const float* rows, int64_t d, O* out,
                       const float* init = nullptr) {
  static constexpr auto table = span_table(std::make_integer_sequence<int, kSpanVectors>{});
  float tmp[16 * kSpanVectors];
  for (int64_t c0 = 0; c0 < d; c0 += 16 * kSpanVectors) {
    const int64_t w = std::min<int64_t>(16 * kSpanVectors, d - c0);
    const int nv = static_cast<int>((w + 15) / 16);
    const __mmask16 tail = static_cast<__mmask16>(w % 16 ? (1u << (w % 16)) - 1 : 0xFFFFu);
    const float* in = init ? init + c0 : nullptr;
    if constexpr (std::is_same_v<O, float>) {
      table[nv - 1](roff, coef, cnt, rows, c0, tail, in, out + c0);
    } else {
      table[nv - 1](roff, coef, cnt, rows, c0, tail, in, tmp);
      for (int64_t c = 0; c < w; ++c) narrow(tmp[c], out[c0 + c]);
    }
  }
}

// <a, b> over d floats with four independent accumulator chains (one chain is FMA-latency bound).
inline float dot(const float* a, const float* b, int64_t d) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t c = 0;
  for (; c + 64 <= d; c += 64) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c + 16), _mm512_loadu_ps(b + c + 16), s1);
    s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c + 32), _mm512_loadu_ps(b + c + 32), s2);
    s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c + 48), _mm512_loadu_ps(b + c + 48), s3);
  }
  for (; c + 16 <= d; c += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c), s0);
  if (c < d) {
    const __mmask16 m = static_cast<__mmask16>((1u << (d - c)) - 1);
    s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + c), _mm512_maskz_loadu_ps(m, b + c), s1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}
#else
template <typename O>
inline void reduce_row(const int64_t* roff, const float* coef, int64_t cnt, const float* rows, int64_t d, O* out,
                       const float* init = nullptr) {
  constexpr int D = 64;
  int64_t c0 = 0;
  for (; c0 + D <= d; c0 += D) reduce_block<D>(roff, coef, cnt, rows, c0, out, init);
  for (; c0 < d; ++c0) {
    float acc = init ? init[c0] : 0.f;
    for (int64_t s = 0; s < cnt; ++s) acc += coef[s] * rows[roff[s] + c0];
    narrow(acc, out[c0]);
  }
}

inline float dot(const float* a, const float* b, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < d; ++c) s += a[c] * b[c];
  return s;
}
#endif

// The latent-sorted backward (sparse_ops.cpp's latent_backward; matryoshka.cpp's, whose decoder rows come
// from each latent's group): one thread owns a latent, and its dW_enc, db_enc and dW_dec rows are summed
// in entry (= row) order and written once, zeros included, so the result is bitwise the same for any
// thread count. A latent's row offsets and coefficients are gathered once (an entry's row is entry / K:
// one division per entry, not one per entry and column block). decoder_rows(i): the (B, d) rows that
// latent i's dW_dec reduces. Returns the bad-index count of the sort (nothing written when it is not 0).
template <typename O, typename DecoderRows>
inline int64_t sorted_latent_backward(const int32_t* idx, int64_t B, int64_t K, int64_t n, int64_t d, const float* dp,
                                      const float* xc, const float* v, DecoderRows decoder_rows, O* dW_enc,
                                      O* db_enc, O* dW_dec, int threads) {
  std::vector<int64_t> start, entry;
  const int64_t bad = sort_by_latent(idx, B * K, n, threads, start, entry, nullptr, dp, v);
  if (bad) return bad;
#pragma omp parallel num_threads(threads)
  {
    std::vector<int64_t> roff;
    std::vector<float> cw, cv;
#pragma omp for schedule(dynamic, 64)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t* ent = entry.data() + start[i];
      const int64_t cnt = start[i + 1] - start[i];
      roff.resize(cnt);
      for (int64_t s = 0; s < cnt; ++s) roff[s] = (ent[s] / K) * d;
      if (dp) {
        cw.resize(cnt);
        float bias = 0.f;
        for (int64_t s = 0; s < cnt; ++s) bias += (cw[s] = dp[ent[s]]);
        reduce_row(roff.data(), cw.data(), cnt, xc, d, dW_enc + i * d);
        narrow(bias, db_enc[i]);
      }
      if (v) {
        cv.resize(cnt);
        for (int64_t s = 0; s < cnt; ++s) cv[s] = v[ent[s]];
        reduce_row(roff.data(), cv.data(), cnt, decoder_rows(i), d, dW_dec + i * d);
      }
    }
  }
  return 0;
}

}  // namespace detail
}  // namespace sae_fast
