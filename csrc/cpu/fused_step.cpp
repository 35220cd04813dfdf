#include "fused_step.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "latent_sort.h"

namespace sae_fast {

namespace {

using detail::dot;
using detail::reduce_row;
using detail::sort_by_latent;

// torch.optim.Adam's update of one element, in its order of operations (lerp for the first moment).
struct Adam {
  float w1, b2, w2, step_size, bc2_sqrt, eps;
  explicit Adam(const AdamScalars& a)
      : w1(static_cast<float>(1.0 - a.beta1)), b2(static_cast<float>(a.beta2)),
        w2(static_cast<float>(1.0 - a.beta2)), step_size(a.step_size), bc2_sqrt(a.bc2_sqrt), eps(a.eps) {}

  // g == nullptr: a zero gradient (a latent with no entry in the batch).
  void row(float* p, float* m, float* s, const float* g, int64_t d) const {
    if (g) {
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) one(p[c], m[c], s[c], g[c]);
    } else {
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) one(p[c], m[c], s[c], 0.f);
    }
  }
  inline void one(float& p, float& m, float& s, float g) const {
    m = m + w1 * (g - m);
    s = s * b2 + w2 * g * g;
    const float denom = std::sqrt(s) / bc2_sqrt + eps;
    p = p + (-step_size) * (m / denom);
  }
};

}  // namespace

int64_t fused_adam_step(const int32_t* idx, const float* pre, int64_t B, int64_t K, int64_t K_main, int64_t n,
                        int64_t d, const float* dp, const float* xc, const float* v, const float* g,
                        const float* d_norm, float* W_enc, float* b_enc, float* W_dec, float* m_W_enc,
                        float* s_W_enc, float* m_b_enc, float* s_b_enc, float* m_W_dec, float* s_W_dec,
                        AdamScalars scalars, bool project, bool renorm, float* enc_sum, int threads) {
  std::vector<int64_t> start, entry;
  // Entries with dp == v == 0 (below-zero TopK and AuxK entries) add exactly nothing: left out too.
  const int64_t bad = sort_by_latent(idx, B * K, n, threads, start, entry, pre, dp, v);
  if (bad) return bad;
  const Adam adam(scalars);
  // Threads take whole blocks of latents, so each block's enc_sum partial has one owner and one order.
  constexpr int64_t kSumBlock = 256;
  const int64_t blocks = (n + kSumBlock - 1) / kSumBlock;
  std::vector<float> part(enc_sum ? blocks * d : 0);
  std::vector<char> part_used(enc_sum ? blocks : 0, 0);
#pragma omp parallel num_threads(threads)
  {
    std::vector<int64_t> roff_x, roff_g;
    std::vector<float> cw, cv, gw(d), gd(d);
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t i = blk * kSumBlock, i_end = std::min(n, i + kSumBlock); i < i_end; ++i) {
      const int64_t* ent = entry.data() + start[i];
      const int64_t cnt = start[i + 1] - start[i];
      float* we = W_enc + i * d;
      float* wd = W_dec + i * d;
      const float dn = d_norm ? d_norm[i] : 0.f;
      const bool has_grad = cnt > 0 || dn != 0.f;
      float gb = 0.f;
      if (cnt > 0) {
        roff_x.resize(cnt);
        roff_g.resize(cnt);
        cw.resize(cnt);
        cv.resize(cnt);
        for (int64_t s = 0; s < cnt; ++s) {
          const int64_t e = ent[s], row = e / K;
          roff_x[s] = row * d;
          roff_g[s] = (e - row * K < K_main ? row : B + row) * d;
          gb += (cw[s] = dp[e]);
          cv[s] = v[e];
        }
        reduce_row(roff_x.data(), cw.data(), cnt, xc, d, gw.data());
        reduce_row(roff_g.data(), cv.data(), cnt, g, d, gd.data());
        if (enc_sum && gb != 0.f) {  // W_enc's row before its update
          float* acc = part.data() + blk * d;
          if (!part_used[blk]) std::fill(acc, acc + d, 0.f);
          part_used[blk] = 1;
#pragma omp simd
          for (int64_t c = 0; c < d; ++c) acc[c] += gb * we[c];
        }
      } else if (has_grad) {
        std::fill(gd.begin(), gd.end(), 0.f);
      }
      if (has_grad) {
        if (dn != 0.f) {  // d||w|| / dw = w / ||w||, zero at w = 0 (torch's norm backward)
          const float norm = std::sqrt(dot(wd, wd, d));
          const float scale = norm == 0.f ? 0.f : dn / norm;
#pragma omp simd
          for (int64_t c = 0; c < d; ++c) gd[c] += wd[c] * scale;
        }
        if (project) {  // SparseAutoencoder.remove_parallel_grad_, on the weights before the update
          const float coef = dot(gd.data(), wd, d) / std::max(dot(wd, wd, d), 1e-12f);
#pragma omp simd
          for (int64_t c = 0; c < d; ++c) gd[c] -= coef * wd[c];
        }
      }
      adam.row(we, m_W_enc + i * d, s_W_enc + i * d, cnt > 0 ? gw.data() : nullptr, d);
      adam.one(b_enc[i], m_b_enc[i], s_b_enc[i], gb);
      adam.row(wd, m_W_dec + i * d, s_W_dec + i * d, has_grad ? gd.data() : nullptr, d);
      if (renorm) {  // SparseAutoencoder.normalize_decoder_
        const float norm = std::max(std::sqrt(dot(wd, wd, d)), 1e-12f);
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) wd[c] /= norm;
      }
    }
  }
  if (enc_sum) {
    std::fill(enc_sum, enc_sum + d, 0.f);
    for (int64_t blk = 0; blk < blocks; ++blk)
      if (part_used[blk])
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) enc_sum[c] += part[blk * d + c];
  }
  return 0;
}

}  // namespace sae_fast
