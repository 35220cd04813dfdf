#include "topk_encode.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "running_topk.h"


namespace sae_fast {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Rows per task and latents per tile: an MB x NB fp32 tile (256 KiB) stays in L2 while it is scanned.
constexpr int64_t MB = 128;
constexpr int64_t NB = 512;

inline RunningTopK make_row(Cand* buf, int64_t k, int32_t count = 0, float thr = kNegInf) {
  RunningTopK r;
  r.buf = buf;
  r.k = static_cast<int32_t>(k);
  r.cap = static_cast<int32_t>(topk_capacity(k));
  r.count = count;
  r.thr = thr;
  return r;
}

void write_row(RunningTopK& r, Cand* sorted, float* pre, int32_t* idx) {
  const int32_t m = r.finish(sorted);
  for (int32_t j = 0; j < m; ++j) {
    pre[j] = sorted[j].v;
    idx[j] = sorted[j].i;
  }
  for (int32_t j = m; j < r.k; ++j) {  // only when fewer latents than k were scanned (never for valid k)
    pre[j] = kNegInf;
    idx[j] = 0;
  }
}

}  // namespace

void topk_encode(SgemmFn sgemm, const float* xc, const float* W, const float* b_enc, int64_t B, int64_t d,
                 int64_t n, int64_t k, const uint8_t* dead, int64_t k_aux, float* pre, int32_t* idx,
                 float* aux_pre, int32_t* aux_idx, int threads) {
  const bool with_aux = dead && k_aux > 0;
  const int64_t row_blocks = (B + MB - 1) / MB;
  // Few row blocks: also split the latents, so small batches use every thread. Fixed by (B, n) only.
  const int64_t tiles = (n + NB - 1) / NB;
  const int64_t segs = std::min<int64_t>(tiles, std::max<int64_t>(1, 16 / row_blocks));
  const int64_t tiles_per_seg = (tiles + segs - 1) / segs;
  const int64_t cap = topk_capacity(k), cap_aux = with_aux ? topk_capacity(k_aux) : 0;
  // Per (row, segment) partial results when split; otherwise rows finish straight into the outputs.
  std::vector<Cand> part, part_aux;
  if (segs > 1) {
    part.resize(B * segs * k);
    if (with_aux) part_aux.resize(B * segs * k_aux);
  }

#pragma omp parallel num_threads(threads)
  {
    std::vector<float> tile(MB * NB);
    std::vector<Cand> cand(MB * cap), cand_aux(MB * cap_aux), sorted(std::max(k, k_aux));
    std::vector<RunningTopK> rows(MB), rows_aux(MB);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < row_blocks * segs; ++task) {
      const int64_t r0 = (task / segs) * MB, rb = std::min(MB, B - r0), seg = task % segs;
      const int64_t c_begin = seg * tiles_per_seg * NB, c_end = std::min(n, (seg + 1) * tiles_per_seg * NB);
      for (int64_t r = 0; r < rb; ++r) {
        rows[r] = make_row(cand.data() + r * cap, k);
        if (with_aux) rows_aux[r] = make_row(cand_aux.data() + r * cap_aux, k_aux);
      }
      for (int64_t c0 = c_begin; c0 < c_end; c0 += NB) {
        const int64_t nb = std::min(NB, c_end - c0);
        // Row-major tile (rb x nb) = xc_block W_tile^T is the column-major (nb x rb) W_tile xc_block^T.
        const int M = static_cast<int>(nb), N = static_cast<int>(rb), K = static_cast<int>(d);
        const float one = 1.f, zero = 0.f;
        sgemm("T", "N", &M, &N, &K, &one, W + c0 * d, &K, xc + r0 * d, &K, &zero, tile.data(), &M, 1, 1);
        for (int64_t r = 0; r < rb; ++r)
          scan_scores(tile.data() + r * nb, b_enc + c0, nb, static_cast<int32_t>(c0), rows[r],
                      with_aux ? &rows_aux[r] : nullptr, with_aux ? dead + c0 : nullptr);
      }
      for (int64_t r = 0; r < rb; ++r) {
        const int64_t b = r0 + r;
        if (segs == 1) {
          write_row(rows[r], sorted.data(), pre + b * k, idx + b * k);
          if (with_aux) write_row(rows_aux[r], sorted.data(), aux_pre + b * k_aux, aux_idx + b * k_aux);
        } else {
          Cand* p = part.data() + (b * segs + seg) * k;
          std::fill(p, p + k, Cand{kNegInf, std::numeric_limits<int32_t>::max()});
          rows[r].finish(p);
          if (with_aux) {
            Cand* pa = part_aux.data() + (b * segs + seg) * k_aux;
            std::fill(pa, pa + k_aux, Cand{kNegInf, std::numeric_limits<int32_t>::max()});
            rows_aux[r].finish(pa);
          }
        }
      }
    }
    if (segs > 1) {
      // Merge the segments' partial top-k lists of each row (sentinels sort last).
      std::vector<Cand> out(std::max(k, k_aux));
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        const Cand* p = part.data() + b * segs * k;
        std::partial_sort_copy(p, p + segs * k, out.data(), out.data() + k, better);
        for (int64_t j = 0; j < k; ++j) {
          pre[b * k + j] = out[j].v;
          idx[b * k + j] = out[j].v == kNegInf ? 0 : out[j].i;
        }
        if (with_aux) {
          const Cand* pa = part_aux.data() + b * segs * k_aux;
          std::partial_sort_copy(pa, pa + segs * k_aux, out.data(), out.data() + k_aux, better);
          for (int64_t j = 0; j < k_aux; ++j) {
            aux_pre[b * k_aux + j] = out[j].v;
            aux_idx[b * k_aux + j] = out[j].v == kNegInf ? 0 : out[j].i;
          }
        }
      }
    }
  }
}

int64_t topk_state_bytes(int64_t B, int64_t k) { return B * topk_capacity(k) * static_cast<int64_t>(sizeof(Cand)); }

void topk_scan_tile(const float* scores, int64_t ld, const float* b_enc, int64_t B, int64_t c0, int64_t m,
                    int64_t k, void* cand, int32_t* count, float* thr, const uint8_t* dead, int64_t k_aux,
                    void* aux_cand, int32_t* aux_count, float* aux_thr, int threads) {
  const bool with_aux = dead && k_aux > 0;
  const int64_t cap = topk_capacity(k), cap_aux = with_aux ? topk_capacity(k_aux) : 0;
  Cand* cands = static_cast<Cand*>(cand);
  Cand* cands_aux = static_cast<Cand*>(aux_cand);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < B; ++b) {
    RunningTopK r = make_row(cands + b * cap, k, count[b], thr[b]), ra;
    if (with_aux) ra = make_row(cands_aux + b * cap_aux, k_aux, aux_count[b], aux_thr[b]);
    scan_scores(scores + b * ld, b_enc + c0, m, static_cast<int32_t>(c0), r, with_aux ? &ra : nullptr,
                with_aux ? dead + c0 : nullptr);
    count[b] = r.count;
    thr[b] = r.thr;
    if (with_aux) {
      aux_count[b] = ra.count;
      aux_thr[b] = ra.thr;
    }
  }
}

void topk_state_finish(int64_t B, int64_t k, const void* cand, const int32_t* count, float* pre,
                       int32_t* idx, int threads) {
  const int64_t cap = topk_capacity(k);
  Cand* cands = const_cast<Cand*>(static_cast<const Cand*>(cand));
#pragma omp parallel num_threads(threads)
  {
    std::vector<Cand> sorted(k);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      RunningTopK r = make_row(cands + b * cap, k, count[b]);
      write_row(r, sorted.data(), pre + b * k, idx + b * k);
    }
  }
}

}  // namespace sae_fast
