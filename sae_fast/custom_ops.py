"""The backend primitives as ``torch.library`` custom ops with shape-only fake implementations.

Native kernels are opaque to torch.compile; registering each primitive as ``sae_fast::<name>`` with a fake
(meta) implementation lets the compiler trace ops.py's autograd Functions without running a kernel.
Each op takes the name of a registered backend first (dispatch.py's registry), then the arguments of the
``SparseBackend`` method of the same name (backends/base.py), and calls that method. A custom op cannot
return None: where the interface returns None (an AuxK list not asked for, a gradient half whose inputs
were not given) the op returns an empty tensor.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .dispatch import lookup_backend
from .reference import INDEX_DTYPE


def _new_dynamic_lists(x: Tensor) -> tuple[Tensor, Tensor]:
    K = torch.library.get_ctx().new_dynamic_size()  # the longest row's count is data-dependent
    return x.new_empty(x.shape[0], K), x.new_empty(x.shape[0], K, dtype=INDEX_DTYPE)


@torch.library.custom_op("sae_fast::topk_select", mutates_args=())
def topk_select(backend: str, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int,
                dead_mask: Optional[Tensor] = None, k_aux: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    pre, idx, aux_pre, aux_idx = lookup_backend(backend).topk_select(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux)
    if aux_pre is None:
        aux_pre, aux_idx = x.new_empty(x.shape[0], 0), x.new_empty(x.shape[0], 0, dtype=INDEX_DTYPE)
    return pre, idx, aux_pre, aux_idx


@topk_select.register_fake
def _(backend, x, W_enc, b_enc, b_dec, k, dead_mask=None, k_aux=0):
    B = x.shape[0]
    return (x.new_empty(B, k), x.new_empty(B, k, dtype=INDEX_DTYPE),
            x.new_empty(B, k_aux), x.new_empty(B, k_aux, dtype=INDEX_DTYPE))


@torch.library.custom_op("sae_fast::threshold_select", mutates_args=())
def threshold_select(backend: str, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
                     cutoff: Tensor) -> tuple[Tensor, Tensor]:
    return lookup_backend(backend).threshold_select(x, W_enc, b_enc, b_dec, cutoff)


@threshold_select.register_fake
def _(backend, x, W_enc, b_enc, b_dec, cutoff):
    return _new_dynamic_lists(x)


@torch.library.custom_op("sae_fast::batch_topk_select", mutates_args=())
def batch_topk_select(backend: str, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
                      k: int) -> tuple[Tensor, Tensor]:
    return lookup_backend(backend).batch_topk_select(x, W_enc, b_enc, b_dec, k)


@batch_topk_select.register_fake
def _(backend, x, W_enc, b_enc, b_dec, k):
    return _new_dynamic_lists(x)


@torch.library.custom_op("sae_fast::sparse_decode", mutates_args=())
def sparse_decode(backend: str, values: Tensor, idx: Tensor, W: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    # Every backend's sparse_decode checks the index range itself (on CPU inside the kernel, on an
    # accelerator as a device-side assert), so compiled code checks it too, without a host sync.
    return lookup_backend(backend).sparse_decode(values, idx, W, bias)


@sparse_decode.register_fake
def _(backend, values, idx, W, bias=None):
    return W.new_empty(values.shape[0], W.shape[1])


@torch.library.custom_op("sae_fast::gather_dot", mutates_args=())
def gather_dot(backend: str, g: Tensor, idx: Tensor, W: Tensor) -> Tensor:
    return lookup_backend(backend).gather_dot(g, idx, W)


@gather_dot.register_fake
def _(backend, g, idx, W):
    return W.new_empty(idx.shape)


@torch.library.custom_op("sae_fast::latent_backward", mutates_args=())
def latent_backward(backend: str, idx: Tensor, n: int, dp: Optional[Tensor] = None, xc: Optional[Tensor] = None,
                    v: Optional[Tensor] = None, g: Optional[Tensor] = None,
                    grad_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor]:
    grads = lookup_backend(backend).latent_backward(idx, n, dp, xc, v, g, grad_dtype)
    ref = xc if xc is not None else g
    return tuple(ref.new_empty(0, dtype=grad_dtype or ref.dtype) if t is None else t for t in grads)


@latent_backward.register_fake
def _(backend, idx, n, dp=None, xc=None, v=None, g=None, grad_dtype=None):
    ref = xc if xc is not None else g
    enc = dp is not None
    dec = v is not None
    enc_dtype = grad_dtype or (xc.dtype if enc else ref.dtype)
    dec_dtype = grad_dtype or (g.dtype if dec else ref.dtype)
    return (ref.new_empty((n, xc.shape[1]) if enc else (0,), dtype=enc_dtype),
            ref.new_empty((n,) if enc else (0,), dtype=enc_dtype),
            ref.new_empty((n, g.shape[1]) if dec else (0,), dtype=dec_dtype))


# Matryoshka: ``widths`` are the cumulative prefix widths (backends/base.py's module docstring).
@torch.library.custom_op("sae_fast::matryoshka_decode", mutates_args=())
def matryoshka_decode(backend: str, values: Tensor, idx: Tensor, W: Tensor, bias: Optional[Tensor],
                      widths: list[int]) -> Tensor:
    return lookup_backend(backend).matryoshka_decode(values, idx, W, bias, widths)


@matryoshka_decode.register_fake
def _(backend, values, idx, W, bias, widths):
    return W.new_empty(len(widths), values.shape[0], W.shape[1])


@torch.library.custom_op("sae_fast::matryoshka_gather_dot", mutates_args=())
def matryoshka_gather_dot(backend: str, S: Tensor, idx: Tensor, W: Tensor, widths: list[int]) -> Tensor:
    return lookup_backend(backend).matryoshka_gather_dot(S, idx, W, widths)


@matryoshka_gather_dot.register_fake
def _(backend, S, idx, W, widths):
    return W.new_empty(idx.shape)


@torch.library.custom_op("sae_fast::matryoshka_latent_backward", mutates_args=())
def matryoshka_latent_backward(backend: str, idx: Tensor, n: int, dp: Optional[Tensor], xc: Optional[Tensor],
                               v: Optional[Tensor], S: Optional[Tensor], widths: list[int],
                               grad_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor]:
    grads = lookup_backend(backend).matryoshka_latent_backward(idx, n, dp, xc, v, S, widths, grad_dtype)
    ref = xc if xc is not None else S
    return tuple(ref.new_empty(0, dtype=grad_dtype or ref.dtype) if t is None else t for t in grads)


@matryoshka_latent_backward.register_fake
def _(backend, idx, n, dp, xc, v, S, widths, grad_dtype=None):
    ref = xc if xc is not None else S
    enc, dec = dp is not None, v is not None
    enc_dtype = grad_dtype or (xc.dtype if enc else ref.dtype)
    dec_dtype = grad_dtype or (S.dtype if dec else ref.dtype)
    return (ref.new_empty((n, xc.shape[1]) if enc else (0,), dtype=enc_dtype),
            ref.new_empty((n,) if enc else (0,), dtype=enc_dtype),
            ref.new_empty((n, S.shape[-1]) if dec else (0,), dtype=dec_dtype))
