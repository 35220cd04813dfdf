// The whole SAE training step's latent-row work in one pass (sae_fast.optim.FusedAdam on CPU): for each
// latent i, while its rows are in cache, the gradient rows of W_enc, b_enc and W_dec are reduced from
// the latent-sorted entries (as latent_backward does), the decoder-norm L1 term is added and the
// component parallel to the decoder row removed when asked, Adam's moments and the parameters are
// updated in place, and the decoder row is renormalised when asked. No (n, d) gradient is written.
// Latents with no entry still get Adam's update from their moments (zero gradient): exact Adam.
// fp32 throughout; one thread per latent, so results are bitwise the same for any thread count.
#pragma once
#include <cstdint>

namespace sae_fast {

struct AdamScalars {
  float step_size;  // lr / (1 - beta1^t)
  float bc2_sqrt;   // sqrt(1 - beta2^t)
  double beta1, beta2;
  float eps;
};

// Entries e of the (B, K) lists: idx[e] (latent), pre[e] (-inf: padding, skipped), dp[e] (dL/dpre),
// v[e] (value); entries with dp == v == 0 add nothing and are skipped too. Decoder-side rows: g[row]
// for entries in columns j < K_main, g[B + row] for the rest
// (AuxK's own dL/d(e_hat), so g has 2B rows then). xc (B, d) = x - b_dec. d_norm (n) or null:
// dL/d||W_dec_i|| (ReLU's L1), added as d_norm[i] * W_dec[i] / ||W_dec[i]||. Moments m_*, s_* as
// torch.optim.Adam's exp_avg, exp_avg_sq. enc_sum (d) or null: receives sum_e dp[e] * W_enc[idx[e]] over
// the kept entries, read before the update (b_dec's gradient through the encoder is minus this), summed
// per latent then per block of 256 latents in latent order: one order for any thread count.
// Returns the number of entries with an index outside [0, n) (nothing is updated then).
int64_t fused_adam_step(const int32_t* idx, const float* pre, int64_t B, int64_t K, int64_t K_main, int64_t n,
                        int64_t d, const float* dp, const float* xc, const float* v, const float* g,
                        const float* d_norm, float* W_enc, float* b_enc, float* W_dec, float* m_W_enc,
                        float* s_W_enc, float* m_b_enc, float* s_b_enc, float* m_W_dec, float* s_W_dec,
                        AdamScalars adam, bool project, bool renorm, float* enc_sum, int threads);

}  // namespace sae_fast
