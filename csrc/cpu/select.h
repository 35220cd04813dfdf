// Encoder selection over tiles of scores, driven tile by tile by the caller (see csrc/cpu/README.md):
// the caller multiplies tile = xc[rows] @ W_enc[c0:c0+m].T (row stride ld) into one reused buffer and
// these fold it into per-row state kept in caller-owned arrays, so the (B, n) pre-activations never
// exist. Scores are tile + b_enc[c0:]. Each row is handled by one thread in latent order, so results
// do not depend on the thread count; rows are dealt out dynamically, so on a busy machine a
// descheduled thread does not hold the others up.
#pragma once
#include <cstdint>

namespace sae_fast {

int64_t topk_capacity_of(int64_t k);

// Running top-k: vals/idx (B, cap = topk_capacity_of(k)), count (B, zeroed), thr (B, -inf). With
// k_aux > 0, also a running top-k_aux over latents with dead[latent] != 0, in the aux_* arrays.
void topk_scan(const float* tile, int64_t ld, const float* b_enc, int64_t B, int64_t c0, int64_t m,
               int64_t k, float* vals, int32_t* idx, int64_t* count, float* thr,
               const uint8_t* dead, int64_t k_aux, float* aux_vals, int32_t* aux_idx, int64_t* aux_count,
               float* aux_thr, int threads);

// The best k per row, best first, ties to the lower latent: pre (B, k), out_idx (B, k).
void topk_finish(int64_t B, int64_t k, float* vals, int32_t* idx, int64_t* count, float* pre,
                 int32_t* out_idx, int threads);

// Threshold lists: append (score, latent) for score > cutoff[latent] to vals/idx (B, cap); count (B)
// counts every hit, so count > cap marks a row that overflowed (its list holds the first cap hits).
void threshold_scan(const float* tile, int64_t ld, const float* b_enc, const float* cutoff, int64_t B,
                    int64_t c0, int64_t m, int64_t cap, float* vals, int32_t* idx, int64_t* count, int threads);

}  // namespace sae_fast
