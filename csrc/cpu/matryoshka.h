// Matryoshka SAEs' decode and backward (sae_fast/reference.py: matryoshka_decode, matryoshka_loss), torch-free.
// `widths` (G) are the cumulative prefix widths m_1 < ... < m_G = n; latent i is in group
// g(i) = #{p : m_p <= i}; prefix p reconstructs with the latents below m_p.
//
// Forward, one pass: each row's active entries are put in latent order and summed once; the running sum is
// written out as prefix p's reconstruction where the latents cross m_p (partial sums cut at the group
// boundaries), so all G prefixes cost one decode plus G-1 extra row writes.
// Backward, one latent-sorted pass for every prefix loss: with S_g = sum_{p >= g} dL/dx_hat_p (the suffix
// sums of the prefixes' gradients, (G, B, d)), an entry of latent i in group g(i) gets
//   dv = <S_{g(i)}[row], W[i]>       dW_dec[i] = sum v * S_{g(i)}[row]
// i.e. the plain kernels' rows with the row block S_{g(i)} chosen per latent (per entry for gather_dot).
// Same conventions as sparse_ops.h: the number of out-of-range indices is returned and nothing is done then;
// one thread per output row / latent, so results are bitwise the same for any thread count.
#pragma once
#include <cstdint>

namespace sae_fast {

// out[p, b] = bias + sum_{j: idx[b, j] < widths[p]} values[b, j] * W[idx[b, j]]        (G, B, d)
int64_t matryoshka_decode(const float* values, const int32_t* idx, const void* W, bool bf16, const float* bias,
                          const int64_t* widths, int64_t G, float* out, int64_t B, int64_t K, int64_t n, int64_t d,
                          int threads);

// out[b, j] = <S[g(idx[b, j]), b], W[idx[b, j]]>                                         (B, K)
int64_t matryoshka_gather_dot(const float* S, const int32_t* idx, const void* W, bool bf16, const int64_t* widths,
                              int64_t G, float* out, int64_t B, int64_t K, int64_t n, int64_t d, int threads);

// latent_backward (sparse_ops.h) with the decoder rows of latent i taken from S[g(i)] (S: (G, B, d)):
//   dW_enc[i] = sum dp[e] * xc[row(e)],  db_enc[i] = sum dp[e],  dW_dec[i] = sum v[e] * S[g(i), row(e)].
int64_t matryoshka_latent_backward(const int32_t* idx, int64_t B, int64_t K, int64_t n, int64_t d,
                                   const float* dp, const float* xc, const float* v, const float* S,
                                   const int64_t* widths, int64_t G, void* dW_enc, void* db_enc, void* dW_dec,
                                   bool bf16, int threads);

}  // namespace sae_fast
