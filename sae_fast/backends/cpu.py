"""The ``cpu`` backend: C++/OpenMP kernels from ``sae_fast._C``, fp32.

Inputs of other float dtypes are computed in fp32 and cast back. Primitives the C++ module does not
implement yet fall through to the plain-torch ``SparseBackend``.
"""
from __future__ import annotations

import ctypes
import os

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (ImportError here unregisters the backend)
from .base import INDEX_DTYPE, SparseBackend


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


def _i32(t: Tensor) -> Tensor:
    return t.to(INDEX_DTYPE).contiguous()


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _threads(work: int = 1 << 30) -> int:
    # Small jobs run on one thread: waking the pool costs more than it saves, and on a loaded machine
    # a descheduled worker can hold every barrier for a whole time slice.
    return 1 if work < (1 << 18) else torch.get_num_threads()


def _native(t: Tensor) -> bool:
    # fp64 keeps its precision through the torch implementation (gradcheck); the kernels compute in fp32.
    return t.dtype != torch.float64


def _find_sgemm() -> int:
    """Address of the Fortran ``sgemm_`` that torch's CPU library exports (MKL in x86 wheels), or 0."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return ctypes.cast(lib.sgemm_, ctypes.c_void_p).value or 0
    except (OSError, AttributeError):
        return 0


_SGEMM = _find_sgemm()
# Encoder driver: "fused" = tile GEMMs called from the C++ threads, each tile scanned while in L2;
# "torch" = torch.mm tiles into one reused buffer, scanned by C++ after each tile. See csrc/cpu/README.md.
ENCODER = os.environ.get("SAE_FAST_CPU_ENCODER", "fused" if _SGEMM else "torch")
_TILE_ROWS, _TILE_COLS = 1024, 2048  # torch driver: an 8 MiB score buffer, whatever n is


class CpuBackend(SparseBackend):
    name = "cpu"

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    # ------------------------------------------------------------------ encoders
    def topk_select(self, x, W_enc, b_enc, b_dec, k, dead_mask=None, k_aux=0):
        if not _native(x):
            return super().topk_select(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux)
        B, n = x.shape[0], W_enc.shape[0]
        xc = (_f32(x) - _f32(b_dec)).contiguous()
        W, b = _f32(W_enc), _f32(b_enc)
        k_aux = k_aux if dead_mask is not None else 0
        dead = dead_mask.to(torch.uint8).contiguous() if k_aux else None
        pre = torch.empty(B, k, dtype=torch.float32)
        idx = torch.empty(B, k, dtype=INDEX_DTYPE)
        aux_pre = torch.empty(B, k_aux, dtype=torch.float32) if k_aux else None
        aux_idx = torch.empty(B, k_aux, dtype=INDEX_DTYPE) if k_aux else None
        if ENCODER == "fused" and _SGEMM:
            _C.topk_encode(_SGEMM, xc.data_ptr(), W.data_ptr(), b.data_ptr(), B, xc.shape[1], n, k, _ptr(dead),
                           k_aux, pre.data_ptr(), idx.data_ptr(), _ptr(aux_pre), _ptr(aux_idx), _threads(B * n * xc.shape[1]))
        else:
            self._topk_torch_tiles(xc, W, b, k, dead, k_aux, pre, idx, aux_pre, aux_idx)
        cast = (lambda t: None if t is None else t.to(x.dtype))
        return cast(pre), idx, cast(aux_pre), aux_idx

    @staticmethod
    def _topk_torch_tiles(xc, W, b, k, dead, k_aux, pre, idx, aux_pre, aux_idx):
        B, n = xc.shape[0], W.shape[0]
        threads = _threads(B * n * xc.shape[1])
        rows = min(B, _TILE_ROWS)
        cols = min(n, max(_TILE_COLS, (_TILE_ROWS * _TILE_COLS // rows) // 16 * 16))
        buf = torch.empty(rows, cols, dtype=torch.float32)
        state = torch.empty(_C.topk_state_bytes(B, k), dtype=torch.uint8)
        count = torch.zeros(B, dtype=torch.int32)
        thr = torch.full((B,), float("-inf"))
        row_state = _C.topk_state_bytes(1, k)
        if k_aux:
            aux_state = torch.empty(_C.topk_state_bytes(B, k_aux), dtype=torch.uint8)
            aux_count = torch.zeros(B, dtype=torch.int32)
            aux_thr = torch.full((B,), float("-inf"))
            aux_row_state = _C.topk_state_bytes(1, k_aux)
        for r0 in range(0, B, rows):
            r1 = min(B, r0 + rows)
            aux_ptrs = (aux_state.data_ptr() + r0 * aux_row_state, aux_count.data_ptr() + 4 * r0,
                        aux_thr.data_ptr() + 4 * r0) if k_aux else (0, 0, 0)
            for c0 in range(0, n, cols):
                c1 = min(n, c0 + cols)
                tile = buf[: r1 - r0, : c1 - c0]
                torch.mm(xc[r0:r1], W[c0:c1].T, out=tile)
                _C.topk_scan_tile(tile.data_ptr(), cols, b.data_ptr(), r1 - r0, c0, c1 - c0, k,
                                  state.data_ptr() + r0 * row_state, count.data_ptr() + 4 * r0,
                                  thr.data_ptr() + 4 * r0, _ptr(dead), k_aux, *aux_ptrs, threads)
        _C.topk_state_finish(B, k, state.data_ptr(), count.data_ptr(), pre.data_ptr(), idx.data_ptr(), threads)
        if k_aux:
            _C.topk_state_finish(B, k_aux, aux_state.data_ptr(), aux_count.data_ptr(), aux_pre.data_ptr(),
                                 aux_idx.data_ptr(), threads)

    def sparse_decode(self, values, idx, W, bias=None):
        if not _native(W):
            return super().sparse_decode(values, idx, W, bias)
        B, K = idx.shape
        d = W.shape[1]
        values, idx, Wf = _f32(values), _i32(idx), _f32(W)
        bias_f = None if bias is None else _f32(bias)
        out = torch.empty(B, d, dtype=torch.float32)
        _C.sparse_decode(values.data_ptr(), idx.data_ptr(), Wf.data_ptr(), _ptr(bias_f), out.data_ptr(),
                         B, K, d, _threads(B * K * d))
        return out.to(W.dtype)

    def gather_dot(self, g, idx, W):
        if not _native(W):
            return super().gather_dot(g, idx, W)
        B, K = idx.shape
        d = W.shape[1]
        g, idx, Wf = _f32(g), _i32(idx), _f32(W)
        out = torch.empty(B, K, dtype=torch.float32)
        _C.gather_dot(g.data_ptr(), idx.data_ptr(), Wf.data_ptr(), out.data_ptr(), B, K, d, _threads(B * K * d))
        return out.to(W.dtype)

    def latent_backward(self, idx, n, dp=None, xc=None, v=None, g=None):
        B, K = idx.shape
        ref = xc if xc is not None else g
        if not _native(ref):
            return super().latent_backward(idx, n, dp, xc, v, g)
        d = ref.shape[1]
        idx = _i32(idx)
        dW_enc = db_enc = dW_dec = None
        if dp is not None:
            dp, xc = _f32(dp), _f32(xc)
            dW_enc = torch.empty(n, d, dtype=torch.float32)
            db_enc = torch.empty(n, dtype=torch.float32)
        if v is not None:
            v, g = _f32(v), _f32(g)
            dW_dec = torch.empty(n, d, dtype=torch.float32)
        _C.latent_backward(idx.data_ptr(), B, K, n, d, _ptr(dp), _ptr(xc), _ptr(v), _ptr(g),
                           _ptr(dW_enc), _ptr(db_enc), _ptr(dW_dec), _threads(n * d + B * K * d))
        cast = (lambda t: None if t is None else t.to(ref.dtype))
        return cast(dW_enc), cast(db_enc), cast(dW_dec)
