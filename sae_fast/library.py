"""The backend primitives as ``torch.library`` custom ops with shape-only fake implementations.

Native kernels are opaque to torch.compile; registering each primitive as ``sae_fast::<name>`` with a fake
(meta) implementation lets the compiler trace ops.py's autograd Functions without running a kernel.
``Dispatched(name)`` has the ``SparseBackend`` method interface and routes every call through these ops
to the backend registered under ``name``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reference import INDEX_DTYPE

_registry: dict = {}  # name -> backend object; filled by ops.register_backend


def _empty_aux(x: Tensor):
    return x.new_empty(x.shape[0], 0), x.new_empty(x.shape[0], 0, dtype=INDEX_DTYPE)


@torch.library.custom_op("sae_fast::topk_select", mutates_args=())
def topk_select(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, dead_mask: Optional[Tensor],
                k_aux: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    pre, idx, aux_pre, aux_idx = _registry[backend].topk_select(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux)
    if aux_pre is None:
        aux_pre, aux_idx = _empty_aux(x)
    return pre, idx, aux_pre, aux_idx


@topk_select.register_fake
def _(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, backend):
    B = x.shape[0]
    return (x.new_empty(B, k), x.new_empty(B, k, dtype=INDEX_DTYPE),
            x.new_empty(B, k_aux), x.new_empty(B, k_aux, dtype=INDEX_DTYPE))


@torch.library.custom_op("sae_fast::threshold_select", mutates_args=())
def threshold_select(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, cutoff: Tensor,
                     backend: str) -> tuple[Tensor, Tensor]:
    return _registry[backend].threshold_select(x, W_enc, b_enc, b_dec, cutoff)


@threshold_select.register_fake
def _(x, W_enc, b_enc, b_dec, cutoff, backend):
    K = torch.library.get_ctx().new_dynamic_size()  # the longest row's count is data-dependent
    return x.new_empty(x.shape[0], K), x.new_empty(x.shape[0], K, dtype=INDEX_DTYPE)


@torch.library.custom_op("sae_fast::batch_topk_select", mutates_args=())
def batch_topk_select(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int,
                      backend: str) -> tuple[Tensor, Tensor]:
    return _registry[backend].batch_topk_select(x, W_enc, b_enc, b_dec, k)


@batch_topk_select.register_fake
def _(x, W_enc, b_enc, b_dec, k, backend):
    K = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty(x.shape[0], K), x.new_empty(x.shape[0], K, dtype=INDEX_DTYPE)


def check_index_range(idx: Tensor, n: int) -> None:
    """A kernel must never read out of bounds: indices from callers are checked before any kernel runs."""
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"indices must lie in [0, n_latents={n}); got values in [{lo}, {hi}]")


@torch.library.custom_op("sae_fast::sparse_decode", mutates_args=())
def sparse_decode(values: Tensor, idx: Tensor, W: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    check_index_range(idx, W.shape[0])
    return _registry[backend].sparse_decode(values, idx, W, bias)


@sparse_decode.register_fake
def _(values, idx, W, bias, backend):
    return W.new_empty(values.shape[0], W.shape[1])


@torch.library.custom_op("sae_fast::gather_dot", mutates_args=())
def gather_dot(g: Tensor, idx: Tensor, W: Tensor, backend: str) -> Tensor:
    return _registry[backend].gather_dot(g, idx, W)


@gather_dot.register_fake
def _(g, idx, W, backend):
    return W.new_empty(idx.shape)


@torch.library.custom_op("sae_fast::latent_backward", mutates_args=())
def latent_backward(idx: Tensor, n: int, dp: Optional[Tensor], xc: Optional[Tensor], v: Optional[Tensor],
                    g: Optional[Tensor], grad_dtype: Optional[torch.dtype], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    dW_enc, db_enc, dW_dec = _registry[backend].latent_backward(idx, n, dp, xc, v, g, grad_dtype)
    # A custom op cannot return None: absent halves come back as empty tensors.
    ref = xc if xc is not None else g
    return tuple(ref.new_empty(0) if t is None else t for t in (dW_enc, db_enc, dW_dec))


@latent_backward.register_fake
def _(idx, n, dp, xc, v, g, grad_dtype, backend):
    ref = xc if xc is not None else g
    enc = dp is not None
    dec = v is not None
    enc_dtype = grad_dtype or (xc.dtype if enc else ref.dtype)
    dec_dtype = grad_dtype or (g.dtype if dec else ref.dtype)
    return (ref.new_empty((n, xc.shape[1]) if enc else (0,), dtype=enc_dtype),
            ref.new_empty((n,) if enc else (0,), dtype=enc_dtype),
            ref.new_empty((n, g.shape[1]) if dec else (0,), dtype=dec_dtype))


class Dispatched:
    """A backend's primitive interface, called through the ``sae_fast::`` custom ops."""

    def __init__(self, name: str):
        self.name = name

    def topk_select(self, x, W_enc, b_enc, b_dec, k, dead_mask=None, k_aux=0):
        pre, idx, aux_pre, aux_idx = topk_select(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, self.name)
        return (pre, idx, aux_pre, aux_idx) if k_aux else (pre, idx, None, None)

    def threshold_select(self, x, W_enc, b_enc, b_dec, cutoff):
        return threshold_select(x, W_enc, b_enc, b_dec, cutoff, self.name)

    def batch_topk_select(self, x, W_enc, b_enc, b_dec, k):
        return batch_topk_select(x, W_enc, b_enc, b_dec, k, self.name)

    def sparse_decode(self, values, idx, W, bias=None):
        return sparse_decode(values, idx, W, bias, self.name)

    def gather_dot(self, g, idx, W):
        return gather_dot(g, idx, W, self.name)

    def latent_backward(self, idx, n, dp=None, xc=None, v=None, g=None, grad_dtype=None):
        dW_enc, db_enc, dW_dec = latent_backward(idx, n, dp, xc, v, g, grad_dtype, self.name)
        return (dW_enc if dp is not None else None, db_enc if dp is not None else None,
                dW_dec if v is not None else None)
