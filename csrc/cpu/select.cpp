#include "select.h"

#include "running_topk.h"

namespace sae_fast {

int64_t topk_capacity_of(int64_t k) { return topk_capacity(k); }

void topk_scan(const float* tile, int64_t ld, const float* b_enc, int64_t B, int64_t c0, int64_t m,
               int64_t k, float* vals, int32_t* idx, int64_t* count, float* thr,
               const uint8_t* dead, int64_t k_aux, float* aux_vals, int32_t* aux_idx, int64_t* aux_count,
               float* aux_thr, int threads) {
  const bool with_aux = dead && k_aux > 0;
  const int64_t cap = topk_capacity(k), cap_aux = with_aux ? topk_capacity(k_aux) : 0;
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
  for (int64_t b = 0; b < B; ++b) {
    RunningTopK r{vals + b * cap, idx + b * cap, count[b], k, cap, thr[b]};
    RunningTopK ra{};
    if (with_aux) ra = RunningTopK{aux_vals + b * cap_aux, aux_idx + b * cap_aux, aux_count[b], k_aux, cap_aux, aux_thr[b]};
    scan_topk(tile + b * ld, b_enc + c0, m, static_cast<int32_t>(c0), r, with_aux ? &ra : nullptr,
              with_aux ? dead + c0 : nullptr);
    count[b] = r.count;
    thr[b] = r.thr;
    if (with_aux) {
      aux_count[b] = ra.count;
      aux_thr[b] = ra.thr;
    }
  }
}

void topk_finish(int64_t B, int64_t k, float* vals, int32_t* idx, int64_t* count, float* pre,
                 int32_t* out_idx, int threads) {
  const int64_t cap = topk_capacity(k);
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
  for (int64_t b = 0; b < B; ++b) {
    RunningTopK r{vals + b * cap, idx + b * cap, count[b], k, cap, kNegInf};
    r.finish(pre + b * k, out_idx + b * k);
  }
}

void threshold_scan(const float* tile, int64_t ld, const float* b_enc, const float* cutoff, int64_t B,
                    int64_t c0, int64_t m, int64_t cap, float* vals, int32_t* idx, int64_t* count, int threads) {
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
  for (int64_t b = 0; b < B; ++b)
    count[b] = scan_threshold(tile + b * ld, b_enc + c0, cutoff + c0, m, static_cast<int32_t>(c0),
                              vals + b * cap, idx + b * cap, count[b], cap);
}

}  // namespace sae_fast
