"""The ``cpu`` backend: C++/OpenMP kernels from ``sae_fast._C``, fp32.

Inputs of other float dtypes are computed in fp32 and cast back. Primitives the C++ module does not
implement yet fall through to the plain-torch ``SparseBackend``.
"""
from __future__ import annotations

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


def _threads() -> int:
    return torch.get_num_threads()


def _native(t: Tensor) -> bool:
    # fp64 keeps its precision through the torch implementation (gradcheck); the kernels compute in fp32.
    return t.dtype != torch.float64


class CpuBackend(SparseBackend):
    name = "cpu"

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def sparse_decode(self, values, idx, W, bias=None):
        if not _native(W):
            return super().sparse_decode(values, idx, W, bias)
        B, K = idx.shape
        d = W.shape[1]
        values, idx, Wf = _f32(values), _i32(idx), _f32(W)
        bias_f = None if bias is None else _f32(bias)
        out = torch.empty(B, d, dtype=torch.float32)
        _C.sparse_decode(values.data_ptr(), idx.data_ptr(), Wf.data_ptr(), _ptr(bias_f), out.data_ptr(),
                         B, K, d, _threads())
        return out.to(W.dtype)

    def gather_dot(self, g, idx, W):
        if not _native(W):
            return super().gather_dot(g, idx, W)
        B, K = idx.shape
        d = W.shape[1]
        g, idx, Wf = _f32(g), _i32(idx), _f32(W)
        out = torch.empty(B, K, dtype=torch.float32)
        _C.gather_dot(g.data_ptr(), idx.data_ptr(), Wf.data_ptr(), out.data_ptr(), B, K, d, _threads())
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
                           _ptr(dW_enc), _ptr(db_enc), _ptr(dW_dec), _threads())
        cast = (lambda t: None if t is None else t.to(ref.dtype))
        return cast(dW_enc), cast(db_enc), cast(dW_dec)
