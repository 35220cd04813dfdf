#include "sparse_ops.h"

#include <cstring>
#include <vector>

namespace sae_fast {

namespace {

inline void axpy(float a, const float* x, float* y, int64_t d) {
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) y[c] += a * x[c];
}

inline float dot(const float* a, const float* b, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < d; ++c) s += a[c] * b[c];
  return s;
}

}  // namespace

void sparse_decode(const float* values, const int32_t* idx, const float* W, const float* bias,
                   float* out, int64_t B, int64_t K, int64_t d, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < B; ++b) {
    float* o = out + b * d;
    if (bias) std::memcpy(o, bias, d * sizeof(float));
    else std::memset(o, 0, d * sizeof(float));
    for (int64_t j = 0; j < K; ++j) {
      const float a = values[b * K + j];
      if (a != 0.f) axpy(a, W + static_cast<int64_t>(idx[b * K + j]) * d, o, d);
    }
  }
}

void gather_dot(const float* g, const int32_t* idx, const float* W, float* out,
                int64_t B, int64_t K, int64_t d, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < K; ++j)
      out[b * K + j] = dot(g + b * d, W + static_cast<int64_t>(idx[b * K + j]) * d, d);
}

void latent_backward(const int32_t* idx, int64_t B, int64_t K, int64_t n, int64_t d,
                     const float* dp, const float* xc, const float* v, const float* g,
                     float* dW_enc, float* db_enc, float* dW_dec, int threads) {
  const int64_t E = B * K;
  // Counting sort by latent. E is small next to n*d, so a serial pass costs little and keeps it simple.
  std::vector<int64_t> start(n + 1, 0);
  for (int64_t e = 0; e < E; ++e) ++start[idx[e] + 1];
  for (int64_t i = 0; i < n; ++i) start[i + 1] += start[i];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  std::vector<int32_t> entry(E);
  for (int64_t e = 0; e < E; ++e) entry[fill[idx[e]]++] = static_cast<int32_t>(e);

#pragma omp parallel for schedule(dynamic, 64) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) {
    if (dp) {
      float* row = dW_enc + i * d;
      std::memset(row, 0, d * sizeof(float));
      float bias = 0.f;
      for (int64_t s = start[i]; s < start[i + 1]; ++s) {
        const int64_t e = entry[s];
        const float a = dp[e];
        if (a == 0.f) continue;
        bias += a;
        axpy(a, xc + (e / K) * d, row, d);
      }
      db_enc[i] = bias;
    }
    if (v) {
      float* row = dW_dec + i * d;
      std::memset(row, 0, d * sizeof(float));
      for (int64_t s = start[i]; s < start[i + 1]; ++s) {
        const int64_t e = entry[s];
        const float a = v[e];
        if (a != 0.f) axpy(a, g + (e / K) * d, row, d);
      }
    }
  }
}

}  // namespace sae_fast
