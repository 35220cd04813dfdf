// CPU kernels for sparse autoencoders. Torch-free: row-major arrays, int32 indices, sizes. Weights and
// weight gradients are fp32 or bf16 (`bf16` flag: uint16 storage, fp32 arithmetic); the rest is fp32.
// Every output element is reduced by one thread in a fixed order, so results are bitwise identical
// across runs and thread counts. See sae_fast/reference.py for the math.
#pragma once
#include <cstdint>

namespace sae_fast {

// Each returns the number of indices outside [0, n) (n = W's rows, or `n`) and then does nothing: the
// bounds check costs no host read of a tensor (the caller raises on a non-zero count).

// out[b] = bias + sum_j values[b, j] * W[idx[b, j]]            (B, d); bias may be null.
int64_t sparse_decode(const float* values, const int32_t* idx, const void* W, bool bf16, const float* bias,
                      float* out, int64_t B, int64_t K, int64_t n, int64_t d, int threads);

// out[b, j] = <g[b], W[idx[b, j]]>                              (B, K)
int64_t gather_dot(const float* g, const int32_t* idx, const void* W, bool bf16, float* out,
                   int64_t B, int64_t K, int64_t n, int64_t d, int threads);

// Latent-sorted backward: counting-sort the B*K entries by latent (stable, so each latent's entries
// stay in row order), then one thread per latent writes whole rows, zeros for latents with no entry:
//   dW_enc[i] = sum dp[e] * xc[row(e)],  db_enc[i] = sum dp[e],  dW_dec[i] = sum v[e] * g[row(e)].
// Pass null for dp (with xc, dW_enc, db_enc) or v (with g, dW_dec) to skip that half. Outputs are
// written in bf16 when `bf16`, rounded once from the fp32 sums. An entry whose coefficients are all
// exactly zero (padding of AuxK and threshold lists, TopK entries below zero) adds nothing and is skipped.
int64_t latent_backward(const int32_t* idx, int64_t B, int64_t K, int64_t n, int64_t d,
                        const float* dp, const float* xc, const float* v, const float* g,
                        void* dW_enc, void* db_enc, void* dW_dec, bool bf16, int threads);

}  // namespace sae_fast
