#include "sparse_ops.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace sae_fast {

namespace {

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

template <typename W>
inline void axpy(float a, const W* x, float* y, int64_t d) {
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) y[c] += a * widen(x[c]);
}

template <typename W>
inline float dot(const float* a, const W* b, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < d; ++c) s += a[c] * widen(b[c]);
  return s;
}

// One output row, D columns at a time with the accumulators in registers: each of the row's K weight
// rows is read once per block (they stay in L1), the output is written once.
template <int D, typename W>
inline void decode_block(const float* vals, const int32_t* ids, int64_t K, const W* Wm, const float* bias,
                         int64_t d, int64_t c0, float* o) {
  float acc[D];
#pragma omp simd
  for (int c = 0; c < D; ++c) acc[c] = bias ? bias[c0 + c] : 0.f;
  for (int64_t j = 0; j < K; ++j) {
    const float a = vals[j];
    if (a == 0.f) continue;
    const W* r = Wm + static_cast<int64_t>(ids[j]) * d + c0;
#pragma omp simd
    for (int c = 0; c < D; ++c) acc[c] += a * widen(r[c]);
  }
#pragma omp simd
  for (int c = 0; c < D; ++c) o[c0 + c] = acc[c];
}

template <typename W>
void sparse_decode_t(const float* values, const int32_t* idx, const W* Wm, const float* bias, float* out,
                     int64_t B, int64_t K, int64_t d, int threads) {
  constexpr int D = 128;
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
  for (int64_t b = 0; b < B; ++b) {
    const float* vals = values + b * K;
    const int32_t* ids = idx + b * K;
    float* o = out + b * d;
    int64_t c0 = 0;
    for (; c0 + D <= d; c0 += D) decode_block<D>(vals, ids, K, Wm, bias, d, c0, o);
    if (c0 < d) {
      for (int64_t c = c0; c < d; ++c) o[c] = bias ? bias[c] : 0.f;
      for (int64_t j = 0; j < K; ++j)
        if (vals[j] != 0.f) axpy(vals[j], Wm + static_cast<int64_t>(ids[j]) * d + c0, o + c0, d - c0);
    }
  }
}

template <typename W>
void gather_dot_t(const float* g, const int32_t* idx, const W* Wm, float* out, int64_t B, int64_t K, int64_t d,
                  int threads) {
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < K; ++j)
      out[b * K + j] = dot(g + b * d, Wm + static_cast<int64_t>(idx[b * K + j]) * d, d);
}

}  // namespace

void sparse_decode(const float* values, const int32_t* idx, const void* W, bool bf16, const float* bias,
                   float* out, int64_t B, int64_t K, int64_t d, int threads) {
  if (bf16) sparse_decode_t(values, idx, static_cast<const uint16_t*>(W), bias, out, B, K, d, threads);
  else sparse_decode_t(values, idx, static_cast<const float*>(W), bias, out, B, K, d, threads);
}

void gather_dot(const float* g, const int32_t* idx, const void* W, bool bf16, float* out, int64_t B, int64_t K,
                int64_t d, int threads) {
  if (bf16) gather_dot_t(g, idx, static_cast<const uint16_t*>(W), out, B, K, d, threads);
  else gather_dot_t(g, idx, static_cast<const float*>(W), out, B, K, d, threads);
}

namespace {

// Stable counting sort of the E = B*K entries by latent: start (n+1) and entry ids in (latent, entry)
// order. A stable sort has one answer, so splitting the histogram over threads changes nothing.
void sort_by_latent(const int32_t* idx, int64_t E, int64_t n, int threads, std::vector<int64_t>& start,
                    std::vector<int64_t>& entry) {
  const int T = std::max<int64_t>(1, std::min<int64_t>(threads, E / 4096 + 1));
  std::vector<int64_t> hist(static_cast<size_t>(T) * (n + 1), 0);
  start.assign(n + 1, 0);
  entry.resize(E);
#pragma omp parallel num_threads(T)
  {
#pragma omp for schedule(static)
    for (int t = 0; t < T; ++t) {
      int64_t* h = hist.data() + t * (n + 1);
      for (int64_t e = t * E / T, end = (t + 1) * E / T; e < end; ++e) ++h[idx[e]];
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
    }
#pragma omp for schedule(static)
    for (int t = 0; t < T; ++t) {
      int64_t* h = hist.data() + t * (n + 1);
      for (int64_t e = t * E / T, end = (t + 1) * E / T; e < end; ++e) entry[h[idx[e]]++] = e;
    }
  }
}

// out = sum over the latent's entries s of coef[s] * rows[roff[s]], reduced in entry order, written
// once per block of D columns (accumulators stay in registers; no memset, no read-modify-write).
template <int D, typename O>
inline void reduce_block(const int64_t* roff, const float* coef, int64_t cnt, const float* rows, int64_t c0,
                         O* out) {
  float acc[D] = {};
  for (int64_t s = 0; s < cnt; ++s) {
    const float a = coef[s];
    const float* r = rows + roff[s] + c0;
#pragma omp simd
    for (int c = 0; c < D; ++c) acc[c] += a * r[c];
  }
#pragma omp simd
  for (int c = 0; c < D; ++c) narrow(acc[c], out[c0 + c]);
}

template <typename O>
void reduce_row(const int64_t* roff, const float* coef, int64_t cnt, const float* rows, int64_t d, O* out) {
  constexpr int D = 64;
  int64_t c0 = 0;
  for (; c0 + D <= d; c0 += D) reduce_block<D>(roff, coef, cnt, rows, c0, out);
  for (; c0 < d; ++c0) {
    float acc = 0.f;
    for (int64_t s = 0; s < cnt; ++s) acc += coef[s] * rows[roff[s] + c0];
    narrow(acc, out[c0]);
  }
}

template <typename O>
void latent_backward_t(const int32_t* idx, int64_t B, int64_t K, int64_t n, int64_t d, const float* dp,
                       const float* xc, const float* v, const float* g, O* dW_enc, O* db_enc, O* dW_dec,
                       int threads) {
  std::vector<int64_t> start, entry;
  sort_by_latent(idx, B * K, n, threads, start, entry);
  // One thread owns a latent: its dW_enc, db_enc and dW_dec rows are summed in entry (= row) order and
  // written once, zeros included, so the result is bitwise the same for any thread count. A latent's row
  // offsets and coefficients are gathered once (an entry's row is entry / K: one division per entry,
  // not one per entry and column block).
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
        reduce_row(roff.data(), cv.data(), cnt, g, d, dW_dec + i * d);
      }
    }
  }
}

}  // namespace

void latent_backward(const int32_t* idx, int64_t B, int64_t K, int64_t n, int64_t d,
                     const float* dp, const float* xc, const float* v, const float* g,
                     void* dW_enc, void* db_enc, void* dW_dec, bool bf16, int threads) {
  if (bf16)
    latent_backward_t(idx, B, K, n, d, dp, xc, v, g, static_cast<uint16_t*>(dW_enc), static_cast<uint16_t*>(db_enc),
                      static_cast<uint16_t*>(dW_dec), threads);
  else
    latent_backward_t(idx, B, K, n, d, dp, xc, v, g, static_cast<float*>(dW_enc), static_cast<float*>(db_enc),
                      static_cast<float*>(dW_dec), threads);
}

}  // namespace sae_fast
