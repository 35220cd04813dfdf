// Fused encode + top-k (and AuxK's top-k over dead latents) without the (B, n) pre-activations.
#pragma once
#include <cstddef>
#include <cstdint>

namespace sae_fast {

// Scores of the encoder are p[b, i] = <xc[b], W[i]> + b_enc[i] with xc = x - b_dec (the caller
// passes xc). Output: the k best (p, i) per row, best first, ties to the lower latent; with k_aux > 0
// also the k_aux best among latents with dead[i] != 0 (k_aux <= number of dead latents).
// Working memory: per task an (MB x NB) score tile and per row a candidate buffer of O(k): flat in n.
// Results do not depend on `threads`: tasks are fixed (row block, latent segment) pairs and the
// top-k under the (score desc, index asc) order is unique whatever the split.
using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                        const float*, const int*, const float*, const int*, const float*, float*, const int*,
                        std::size_t, std::size_t);  // Fortran BLAS sgemm_
void topk_encode(SgemmFn sgemm, const float* xc, const float* W, const float* b_enc, int64_t B, int64_t d, int64_t n,
                 int64_t k, const uint8_t* dead, int64_t k_aux, float* pre, int32_t* idx, float* aux_pre,
                 int32_t* aux_idx, int threads);

// Python-driven variant: the caller multiplies a (B x m) tile of scores (row stride ld) for latents
// c0 .. c0+m-1 and this folds it into per-row running state kept in caller-owned arrays:
// cand (B * topk_capacity(k) * 8 bytes), count (B int32, zeroed), thr (B float, -inf).
int64_t topk_state_bytes(int64_t B, int64_t k);
void topk_scan_tile(const float* scores, int64_t ld, const float* b_enc, int64_t B, int64_t c0, int64_t m,
                    int64_t k, void* cand, int32_t* count, float* thr, const uint8_t* dead, int64_t k_aux,
                    void* aux_cand, int32_t* aux_count, float* aux_thr, int threads);
void topk_state_finish(int64_t B, int64_t k, const void* cand, const int32_t* count, float* pre,
                       int32_t* idx, int threads);

}  // namespace sae_fast
