"""Matryoshka SAEs: nested dictionaries whose every prefix reconstructs the input (math in reference.py).

Every prefix's reconstruction comes out of one sparse decode pass (``matryoshka_decode``: each row's
entries in latent order, the running sum written out where the latents cross a group boundary), and
the backward of all prefix losses is one latent-sorted pass: a latent of group g sees the sum of the
gradients of every prefix that holds it, S_g = sum_{p >= g} dL/dx_hat_p (``ops.suffix_sums``), so its
decoder-row gradient is sum v * S_g[row] and an entry's value gradient <S_g[row], W_dec[i]>, the plain
kernels with the row block chosen per latent (backends/base.py: the ``matryoshka_*`` primitives). For
TopK the decode and that backward are inside the fused ``ops.topk_sae`` node (its ``matryoshka=``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import custom_ops, reference
from .backends.base import cast_or_none
from .checks import check_code, check_index_range, check_widths
from .dispatch import ReferenceBackend, get_backend
from .ops import _gathered, _sum_rows, suffix_sums


class _MatryoshkaDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, idx, W_dec, b_dec, widths, backend):
        ctx.backend, ctx.widths = backend, widths
        ctx.bias_dtype = None if b_dec is None else b_dec.dtype
        ctx.weight_dtype = W_dec.dtype
        W = _gathered(W_dec, values.dtype, idx.numel(), 2 if ctx.needs_input_grad[0] else 1)
        ctx.save_for_backward(values, idx, W)
        return custom_ops.matryoshka_decode(backend, values, idx, W, b_dec, widths).to(values.dtype)

    @staticmethod
    def backward(ctx, g):
        values, idx, W = ctx.saved_tensors
        need_v, _, need_W, need_b = ctx.needs_input_grad[:4]
        S = suffix_sums(g).contiguous()
        dv = custom_ops.matryoshka_gather_dot(ctx.backend, S, idx, W, ctx.widths).to(values.dtype) if need_v else None
        dW_dec = (custom_ops.matryoshka_latent_backward(ctx.backend, idx, W.shape[0], None, None, values, S, ctx.widths,
                                                        ctx.weight_dtype)[2] if need_W else None)
        db_dec = _sum_rows(S[0]).to(ctx.bias_dtype) if (need_b and ctx.bias_dtype) else None
        return dv, None, dW_dec, db_dec, None, None


def matryoshka_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None,
                      widths: list[int]) -> Tensor:
    """(G, B, d): every prefix's reconstruction (reference.matryoshka_decode) in one decode pass;
    differentiable in values, W_dec and b_dec, with one latent-sorted backward pass for all prefixes."""
    check_code(values, indices, W_dec, b_dec)
    widths = check_widths(widths, W_dec.shape[0])
    backend = get_backend(values.device)
    if isinstance(backend, ReferenceBackend):
        check_index_range(indices, W_dec.shape[0])
        W, b = (cast_or_none(t, values.dtype) for t in (W_dec, b_dec))
        if b is None:
            b = values.new_zeros(W_dec.shape[1])
        return reference.matryoshka_decode(values, indices, W, b, widths)
    return _MatryoshkaDecode.apply(values.contiguous(), indices.contiguous(), W_dec, b_dec, widths, backend.name)


def prefix_reconstructions(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, widths: list[int],
                           x_hat: Tensor | None = None) -> Tensor:
    """(G, B, d): x_hat_i for every prefix i (``matryoshka_decode``); ``x_hat`` is accepted for callers that
    have the full reconstruction (it is the last prefix) and not needed."""
    return matryoshka_decode(values, indices, W_dec, b_dec, widths)


class _PrefixSSE(torch.autograd.Function):
    """(G,) sum of squared errors of every prefix; the backward is one (G, B, d) multiply."""

    @staticmethod
    def forward(ctx, prefixes, x):
        diff = prefixes.to(x.dtype) - x
        ctx.save_for_backward(diff)
        ctx.dtype = prefixes.dtype
        return torch.linalg.vector_norm(diff, dim=(1, 2)).square()  # no (G, B, d) temporary

    @staticmethod
    def backward(ctx, g):
        (diff,) = ctx.saved_tensors
        d_pre = diff * (2 * g)[:, None, None]
        return d_pre.to(ctx.dtype), (-d_pre.sum(0) if ctx.needs_input_grad[1] else None)


def prefix_fvus(prefixes: Tensor, x: Tensor) -> Tensor:
    """(G,) fvu(x_hat_p, x) of every prefix (reference.fvu, all prefixes in one reduction)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32, or fp64 as given
    total = (xf - xf.mean(0)).pow(2).sum()
    return _PrefixSSE.apply(prefixes, xf) / total.clamp_min(torch.finfo(xf.dtype).tiny)


def grouped_adam_step(backend, widths: list[int], idx: Tensor, pre: Tensor, k_main: int, dp: Tensor, xc: Tensor,
                      v: Tensor, g: Tensor, g_aux: Tensor | None, d_norm: Tensor | None, params, moments, adam,
                      project: bool, renorm: bool) -> Tensor | None:
    """The backend's ``fused_adam_step`` for a Matryoshka SAE: a group's latents take their decoder rows from
    S_p = sum_{q >= p} g_q (g (G, B, d): the prefixes' gradients), so the step runs once per group on that
    group's rows of the parameters and moments (contiguous row slices), the entries of other groups left out
    as padding (pre = -inf). Every latent is still updated exactly once, in one streaming pass over the rows;
    only the entries' counting sort is repeated per group. The groups go last to first, so S_p is built in
    place in one (B, d) buffer (beside AuxK's own decoder rows ``g_aux`` (B, d), when given), no (G, B, d) copy.
    Returns the sum of the groups' encoder sums where the backend has them (``fused_step_sums_encoder``)."""
    B = g.shape[1]
    group = torch.bucketize(idx.long(), torch.tensor(widths[:-1], dtype=torch.int64, device=idx.device), right=True)
    rows = torch.empty(B if g_aux is None else 2 * B, g.shape[2], dtype=g.dtype, device=g.device)
    if g_aux is not None:
        rows[B:] = g_aux
    S = rows[:B]
    enc_sum = None
    for p in range(len(widths) - 1, -1, -1):
        if p == len(widths) - 1:
            S.copy_(g[p])
        else:
            S.add_(g[p])
        lo, hi = (widths[p - 1] if p else 0), widths[p]
        mine = group == p
        cut = slice(lo, hi)
        part = backend.fused_adam_step(torch.where(mine, idx - lo, 0), torch.where(mine, pre, float("-inf")), k_main,
                                       dp, xc, v, rows, None if d_norm is None else d_norm[cut],
                                       [t[cut] for t in params], [t[cut] for t in moments], adam, project, renorm)
        enc_sum = part if enc_sum is None else enc_sum + part
    return enc_sum
