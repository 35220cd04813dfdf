// pybind11 glue for sae_fast._C: tensors arrive as data pointers (integers) plus sizes; nothing else here.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu/fused_step.h"
#include "cpu/matryoshka.h"
#include "cpu/sparse_ops.h"
#include "cpu/select.h"

namespace py = pybind11;
using ptr = std::uintptr_t;

template <typename T>
static T* P(ptr p) { return reinterpret_cast<T*>(p); }

PYBIND11_MODULE(_C, m) {
  m.doc() = "sae-fast CPU kernels (OpenMP, fp32). Called by sae_fast.backends.cpu; not a public API.";
  auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("sparse_decode", [](ptr values, ptr idx, ptr W, bool bf16, ptr bias, ptr out, int64_t B, int64_t K,
                            int64_t n, int64_t d, int threads) {
    return sae_fast::sparse_decode(P<const float>(values), P<const int32_t>(idx), P<const void>(W), bf16,
                                   P<const float>(bias), P<float>(out), B, K, n, d, threads);
  }, nogil);

  m.def("gather_dot", [](ptr g, ptr idx, ptr W, bool bf16, ptr out, int64_t B, int64_t K, int64_t n, int64_t d,
                         int threads) {
    return sae_fast::gather_dot(P<const float>(g), P<const int32_t>(idx), P<const void>(W), bf16, P<float>(out),
                                B, K, n, d, threads);
  }, nogil);

  m.def("latent_backward", [](ptr idx, int64_t B, int64_t K, int64_t n, int64_t d, ptr dp, ptr xc,
                              ptr v, ptr g, ptr dW_enc, ptr db_enc, ptr dW_dec, bool bf16, int threads) {
    return sae_fast::latent_backward(P<const int32_t>(idx), B, K, n, d, P<const float>(dp), P<const float>(xc),
                                     P<const float>(v), P<const float>(g), P<void>(dW_enc), P<void>(db_enc),
                                     P<void>(dW_dec), bf16, threads);
  }, nogil);

  m.def("fused_adam_step", [](ptr idx, ptr pre, int64_t B, int64_t K, int64_t K_main, int64_t n, int64_t d, ptr dp,
                              ptr xc, ptr v, ptr g, ptr d_norm, ptr W_enc, ptr b_enc, ptr W_dec, ptr m_W_enc,
                              ptr s_W_enc, ptr m_b_enc, ptr s_b_enc, ptr m_W_dec, ptr s_W_dec, float step_size,
                              float bc2_sqrt, double beta1, double beta2, float eps, bool project, bool renorm,
                              ptr enc_sum, int threads) {
    const sae_fast::AdamScalars adam{step_size, bc2_sqrt, beta1, beta2, eps};
    return sae_fast::fused_adam_step(P<const int32_t>(idx), P<const float>(pre), B, K, K_main, n, d,
                                     P<const float>(dp), P<const float>(xc), P<const float>(v), P<const float>(g),
                                     P<const float>(d_norm), P<float>(W_enc), P<float>(b_enc), P<float>(W_dec),
                                     P<float>(m_W_enc), P<float>(s_W_enc), P<float>(m_b_enc), P<float>(s_b_enc),
                                     P<float>(m_W_dec), P<float>(s_W_dec), adam, project, renorm,
                                     P<float>(enc_sum), threads);
  }, nogil);

  m.def("topk_capacity", &sae_fast::topk_capacity_of);

  m.def("topk_scan", [](ptr tile, int64_t ld, ptr b_enc, int64_t B, int64_t c0, int64_t m, int64_t k, ptr vals,
                        ptr idx, ptr count, ptr thr, ptr dead, int64_t k_aux, ptr aux_vals, ptr aux_idx,
                        ptr aux_count, ptr aux_thr, int threads) {
    sae_fast::topk_scan(P<const float>(tile), ld, P<const float>(b_enc), B, c0, m, k, P<float>(vals),
                        P<int32_t>(idx), P<int64_t>(count), P<float>(thr), P<const uint8_t>(dead), k_aux,
                        P<float>(aux_vals), P<int32_t>(aux_idx), P<int64_t>(aux_count), P<float>(aux_thr), threads);
  }, nogil);

  m.def("topk_finish", [](int64_t B, int64_t k, ptr vals, ptr idx, ptr count, ptr pre, ptr out_idx, int threads) {
    sae_fast::topk_finish(B, k, P<float>(vals), P<int32_t>(idx), P<int64_t>(count), P<float>(pre),
                          P<int32_t>(out_idx), threads);
  }, nogil);

  m.def("threshold_scan", [](ptr tile, int64_t ld, ptr b_enc, ptr cutoff, int64_t B, int64_t c0, int64_t m,
                             int64_t cap, ptr vals, ptr idx, ptr count, int threads) {
    sae_fast::threshold_scan(P<const float>(tile), ld, P<const float>(b_enc), P<const float>(cutoff), B, c0, m,
                             cap, P<float>(vals), P<int32_t>(idx), P<int64_t>(count), threads);
  }, nogil);
  // Matryoshka SAEs (cpu/matryoshka.h): widths is an int64 array of the G cumulative prefix widths.
  m.def("matryoshka_decode", [](ptr values, ptr idx, ptr W, bool bf16, ptr bias, ptr widths, int64_t G, ptr out,
                                int64_t B, int64_t K, int64_t n, int64_t d, int threads) {
    return sae_fast::matryoshka_decode(P<const float>(values), P<const int32_t>(idx), P<const void>(W), bf16,
                                       P<const float>(bias), P<const int64_t>(widths), G, P<float>(out), B, K, n, d,
                                       threads);
  }, nogil);

  m.def("matryoshka_gather_dot", [](ptr S, ptr idx, ptr W, bool bf16, ptr widths, int64_t G, ptr out, int64_t B,
                                    int64_t K, int64_t n, int64_t d, int threads) {
    return sae_fast::matryoshka_gather_dot(P<const float>(S), P<const int32_t>(idx), P<const void>(W), bf16,
                                           P<const int64_t>(widths), G, P<float>(out), B, K, n, d, threads);
  }, nogil);

  m.def("matryoshka_latent_backward", [](ptr idx, int64_t B, int64_t K, int64_t n, int64_t d, ptr dp, ptr xc, ptr v,
                                         ptr S, ptr widths, int64_t G, ptr dW_enc, ptr db_enc, ptr dW_dec, bool bf16,
                                         int threads) {
    return sae_fast::matryoshka_latent_backward(P<const int32_t>(idx), B, K, n, d, P<const float>(dp),
                                                P<const float>(xc), P<const float>(v), P<const float>(S),
                                                P<const int64_t>(widths), G, P<void>(dW_enc), P<void>(db_enc),
                                                P<void>(dW_dec), bf16, threads);
  }, nogil);
}
