#include "sparse_ops.h"

#include "latent_sort.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace sae_fast {

namespace {

using detail::narrow;
using detail::widen;

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
  if constexpr (std::is_same_v<W, float>) {
    // fp32: the latent-sorted reduction's register spans (a d = 384 row of out in registers): the
    // same per-column sums in entry order, zero coefficients skipped as below.
#pragma omp parallel num_threads(threads)
    {
      std::vector<int64_t> roff(K);
      std::vector<float> coef(K);
#pragma omp for schedule(dynamic, 16)
      for (int64_t b = 0; b < B; ++b) {
        int64_t cnt = 0;
        for (int64_t j = 0; j < K; ++j) {
          const float a = values[b * K + j];
          if (a == 0.f) continue;
          roff[cnt] = static_cast<int64_t>(idx[b * K + j]) * d;
          coef[cnt++] = a;
        }
        detail::reduce_row(roff.data(), coef.data(), cnt, Wm, d, out + b * d, bias);
      }
    }
    return;
  }
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
    for (int64_t j = 0; j < K; ++j) {
      const W* r = Wm + static_cast<int64_t>(idx[b * K + j]) * d;
      if constexpr (std::is_same_v<W, float>) out[b * K + j] = detail::dot(g + b * d, r, d);
      else out[b * K + j] = dot(g + b * d, r, d);
    }
}

}  // namespace

int64_t sparse_decode(const float* values, const int32_t* idx, const void* W, bool bf16, const float* bias,
                      float* out, int64_t B, int64_t K, int64_t n, int64_t d, int threads) {
  if (const int64_t bad = detail::count_out_of_range(idx, B * K, n)) return bad;
  if (bf16) sparse_decode_t(values, idx, static_cast<const uint16_t*>(W), bias, out, B, K, d, threads);
  else sparse_decode_t(values, idx, static_cast<const float*>(W), bias, out, B, K, d, threads);
  return 0;
}

int64_t gather_dot(const float* g, const int32_t* idx, const void* W, bool bf16, float* out, int64_t B, int64_t K,
                   int64_t n, int64_t d, int threads) {
  if (const int64_t bad = detail::count_out_of_range(idx, B * K, n)) return bad;
  if (bf16) gather_dot_t(g, idx, static_cast<const uint16_t*>(W), out, B, K, d, threads);
  else gather_dot_t(g, idx, static_cast<const float*>(W), out, B, K, d, threads);
  return 0;
}

namespace {

template <typename O>
int64_t latent_backward_t(const int32_t* idx, int64_t B, int64_t K, int64_t n, int64_t d, const float* dp,
                       const float* xc, const float* v, const float* g, O* dW_enc, O* db_enc, O* dW_dec,
                       int threads) {
  const auto decoder_rows = [g](int64_t) { return g; };  // every latent's decoder rows reduce g
  return detail::sorted_latent_backward(idx, B, K, n, d, dp, xc, v, decoder_rows, dW_enc, db_enc, dW_dec, threads);
}

}  // namespace

int64_t latent_backward(const int32_t* idx, int64_t B, int64_t K, int64_t n, int64_t d,
                        const float* dp, const float* xc, const float* v, const float* g,
                        void* dW_enc, void* db_enc, void* dW_dec, bool bf16, int threads) {
  if (bf16)
    return latent_backward_t(idx, B, K, n, d, dp, xc, v, g, static_cast<uint16_t*>(dW_enc), static_cast<uint16_t*>(db_enc),
                      static_cast<uint16_t*>(dW_dec), threads);
  return latent_backward_t(idx, B, K, n, d, dp, xc, v, g, static_cast<float*>(dW_enc), static_cast<float*>(db_enc),
                      static_cast<float*>(dW_dec), threads);
}

}  // namespace sae_fast
