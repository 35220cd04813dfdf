// pybind11 glue for sae_fast._C: tensors arrive as data pointers (integers) plus sizes; nothing else here.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu/sparse_ops.h"
#include "cpu/topk_encode.h"

namespace py = pybind11;
using ptr = std::uintptr_t;

template <typename T>
static T* P(ptr p) { return reinterpret_cast<T*>(p); }

PYBIND11_MODULE(_C, m) {
  m.doc() = "sae-fast CPU kernels (OpenMP, fp32). Called by sae_fast.backends.cpu; not a public API.";
  auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("sparse_decode", [](ptr values, ptr idx, ptr W, ptr bias, ptr out, int64_t B, int64_t K,
                            int64_t d, int threads) {
    sae_fast::sparse_decode(P<const float>(values), P<const int32_t>(idx), P<const float>(W),
                            P<const float>(bias), P<float>(out), B, K, d, threads);
  }, nogil);

  m.def("gather_dot", [](ptr g, ptr idx, ptr W, ptr out, int64_t B, int64_t K, int64_t d, int threads) {
    sae_fast::gather_dot(P<const float>(g), P<const int32_t>(idx), P<const float>(W), P<float>(out),
                         B, K, d, threads);
  }, nogil);

  m.def("latent_backward", [](ptr idx, int64_t B, int64_t K, int64_t n, int64_t d, ptr dp, ptr xc,
                              ptr v, ptr g, ptr dW_enc, ptr db_enc, ptr dW_dec, int threads) {
    sae_fast::latent_backward(P<const int32_t>(idx), B, K, n, d, P<const float>(dp), P<const float>(xc),
                              P<const float>(v), P<const float>(g), P<float>(dW_enc), P<float>(db_enc),
                              P<float>(dW_dec), threads);
  }, nogil);

  m.def("topk_encode", [](ptr sgemm, ptr xc, ptr W, ptr b_enc, int64_t B, int64_t d, int64_t n, int64_t k, ptr dead,
                          int64_t k_aux, ptr pre, ptr idx, ptr aux_pre, ptr aux_idx, int threads) {
    sae_fast::topk_encode(reinterpret_cast<sae_fast::SgemmFn>(sgemm), P<const float>(xc), P<const float>(W), P<const float>(b_enc), B, d, n, k,
                          P<const uint8_t>(dead), k_aux, P<float>(pre), P<int32_t>(idx), P<float>(aux_pre),
                          P<int32_t>(aux_idx), threads);
  }, nogil);

  m.def("topk_state_bytes", &sae_fast::topk_state_bytes);

  m.def("topk_scan_tile", [](ptr scores, int64_t ld, ptr b_enc, int64_t B, int64_t c0, int64_t m, int64_t k,
                             ptr cand, ptr count, ptr thr, ptr dead, int64_t k_aux, ptr aux_cand,
                             ptr aux_count, ptr aux_thr, int threads) {
    sae_fast::topk_scan_tile(P<const float>(scores), ld, P<const float>(b_enc), B, c0, m, k, P<void>(cand),
                             P<int32_t>(count), P<float>(thr), P<const uint8_t>(dead), k_aux, P<void>(aux_cand),
                             P<int32_t>(aux_count), P<float>(aux_thr), threads);
  }, nogil);

  m.def("topk_state_finish", [](int64_t B, int64_t k, ptr cand, ptr count, ptr pre, ptr idx, int threads) {
    sae_fast::topk_state_finish(B, k, P<const void>(cand), P<const int32_t>(count), P<float>(pre),
                                P<int32_t>(idx), threads);
  }, nogil);
}
