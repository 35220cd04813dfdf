#include "matryoshka.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "latent_sort.h"

namespace sae_fast {

namespace {

using detail::narrow;
using detail::widen;

// g(i): the number of prefix widths <= i (widths ascend; G is small, a linear scan beats a search).
inline int64_t group_of(int64_t i, const int64_t* widths, int64_t G) {
  int64_t g = 0;
  while (g < G - 1 && widths[g] <= i) ++g;
  return g;
}

// One row, D columns at a time: the running sum over the row's entries in latent order, written to every
// prefix whose boundary it crosses (and, after the last entry, to every prefix left).
template <int D, typename W>
inline void decode_cut(const std::pair<int32_t, float>* ent, int64_t cnt, const W* Wm, const float* bias,
                       const int64_t* widths, int64_t G, int64_t plane, int64_t d, int64_t c0, int64_t width,
                       float* o) {
  float acc[D];
  for (int64_t c = 0; c < width; ++c) acc[c] = bias ? bias[c0 + c] : 0.f;
  int64_t p = 0;
  for (int64_t s = 0; s < cnt; ++s) {
    const int64_t i = ent[s].first;
    for (; p < G - 1 && widths[p] <= i; ++p)
      for (int64_t c = 0; c < width; ++c) o[p * plane + c0 + c] = acc[c];
    const float a = ent[s].second;
    const W* r = Wm + i * d + c0;
    if (width == D) {
#pragma omp simd
      for (int c = 0; c < D; ++c) acc[c] += a * widen(r[c]);
    } else {
      for (int64_t c = 0; c < width; ++c) acc[c] += a * widen(r[c]);
    }
  }
  for (; p < G; ++p)
    for (int64_t c = 0; c < width; ++c) o[p * plane + c0 + c] = acc[c];
}

template <typename W>
void decode_t(const float* values, const int32_t* idx, const W* Wm, const float* bias, const int64_t* widths,
              int64_t G, float* out, int64_t B, int64_t K, int64_t d, int threads) {
  constexpr int D = 128;
#pragma omp parallel num_threads(threads)
  {
    std::vector<std::pair<int32_t, float>> ent(K);
#pragma omp for schedule(dynamic, 16)
    for (int64_t b = 0; b < B; ++b) {
      int64_t cnt = 0;
      for (int64_t j = 0; j < K; ++j)
        if (values[b * K + j] != 0.f) ent[cnt++] = {idx[b * K + j], values[b * K + j]};
      // Latent order (distinct latents in a row; ties keep entry order, so the sum has one order).
      std::stable_sort(ent.begin(), ent.begin() + cnt,
                       [](const auto& a, const auto& c) { return a.first < c.first; });
      for (int64_t c0 = 0; c0 < d; c0 += D)
        decode_cut<D>(ent.data(), cnt, Wm, bias, widths, G, B * d, d, c0, std::min<int64_t>(D, d - c0), out + b * d);
    }
  }
}

template <typename W>
void gather_dot_t(const float* S, const int32_t* idx, const W* Wm, const int64_t* widths, int64_t G, float* out,
                  int64_t B, int64_t K, int64_t d, int threads) {
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < K; ++j) {
      const int64_t i = idx[b * K + j];
      const float* s = S + (group_of(i, widths, G) * B + b) * d;
      const W* r = Wm + i * d;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < d; ++c) acc += s[c] * widen(r[c]);
      out[b * K + j] = acc;
    }
}

template <typename O>
int64_t latent_backward_t(const int32_t* idx, int64_t B, int64_t K, int64_t n, int64_t d, const float* dp,
                          const float* xc, const float* v, const float* S, const int64_t* widths, int64_t G,
                          O* dW_enc, O* db_enc, O* dW_dec, int threads) {
  // A latent's decoder rows are its group's S_g, fixed per latent.
  const auto decoder_rows = [=](int64_t i) { return S + group_of(i, widths, G) * B * d; };
  return detail::sorted_latent_backward(idx, B, K, n, d, dp, xc, v, decoder_rows, dW_enc, db_enc, dW_dec, threads);
}

}  // namespace

int64_t matryoshka_decode(const float* values, const int32_t* idx, const void* W, bool bf16, const float* bias,
                          const int64_t* widths, int64_t G, float* out, int64_t B, int64_t K, int64_t n, int64_t d,
                          int threads) {
  if (const int64_t bad = detail::count_out_of_range(idx, B * K, n)) return bad;
  if (bf16) decode_t(values, idx, static_cast<const uint16_t*>(W), bias, widths, G, out, B, K, d, threads);
  else decode_t(values, idx, static_cast<const float*>(W), bias, widths, G, out, B, K, d, threads);
  return 0;
}

int64_t matryoshka_gather_dot(const float* S, const int32_t* idx, const void* W, bool bf16, const int64_t* widths,
                              int64_t G, float* out, int64_t B, int64_t K, int64_t n, int64_t d, int threads) {
  if (const int64_t bad = detail::count_out_of_range(idx, B * K, n)) return bad;
  if (bf16) gather_dot_t(S, idx, static_cast<const uint16_t*>(W), widths, G, out, B, K, d, threads);
  else gather_dot_t(S, idx, static_cast<const float*>(W), widths, G, out, B, K, d, threads);
  return 0;
}

int64_t matryoshka_latent_backward(const int32_t* idx, int64_t B, int64_t K, int64_t n, int64_t d,
                                   const float* dp, const float* xc, const float* v, const float* S,
                                   const int64_t* widths, int64_t G, void* dW_enc, void* db_enc, void* dW_dec,
                                   bool bf16, int threads) {
  if (bf16)
    return latent_backward_t(idx, B, K, n, d, dp, xc, v, S, widths, G, static_cast<uint16_t*>(dW_enc),
                             static_cast<uint16_t*>(db_enc), static_cast<uint16_t*>(dW_dec), threads);
  return latent_backward_t(idx, B, K, n, d, dp, xc, v, S, widths, G, static_cast<float*>(dW_enc),
                           static_cast<float*>(db_enc), static_cast<float*>(dW_dec), threads);
}

}  // namespace sae_fast
