"""Differentiable sparse-autoencoder ops, the package's public kernels API.

Every op checks its inputs (checks.py), asks dispatch.py for the backend of the tensors' device, and then
either runs reference.py's dense math (the ``reference`` backend, differentiated by autograd) or an
autograd Function below whose primitives run as torch.library custom ops (custom_ops.py) on that backend.
Backends, their defaults per device and how to force one: see dispatch.py.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import custom_ops, reference
from .backends.base import cast_or_none
from .checks import (
    check_code,
    check_count,
    check_dead_mask,
    check_encoder,
    check_float,
    check_index_range,
    check_k,
    check_number,
    check_widths,
    is_master,
    set_check_finite,
)
from .dispatch import ReferenceBackend, available_backends, get_backend, register_backend, use_backend

try:  # newer torch; with older ones eager code decides as before, and compiling ops._gathered on a
    # data-dependent code width may fail to guard
    from torch.fx.experimental.symbolic_shapes import guard_or_false
except ImportError:
    guard_or_false = bool

__all__ = ["topk_encode", "topk_encode_with_aux", "relu_encode", "jumprelu_encode", "batch_topk_encode",
           "threshold_encode", "sparse_decode", "gather_latents", "decoder_norm_l1", "topk_sae", "TopKSAEResult",
           "MatryoshkaTopKSAEResult",
           "available_backends", "get_backend", "use_backend", "register_backend", "set_check_finite", "is_master"]


# ============================================================================ autograd Functions
# ``backend`` below is a registered backend's name: the Functions call its primitives through custom_ops.
def _gemv_for_bias_grad(W_enc: Tensor) -> bool:
    return W_enc.device.type != "cpu"


def _sum_rows(t: Tensor) -> Tensor:
    """Column sums accumulated and returned in at least fp32 (bias gradients of 16-bit activations)."""
    return t.sum(0, dtype=torch.promote_types(t.dtype, torch.float32))


def _encoder_input_grad_sum(backend: str, dp, idx, W_enc, db_enc, dx):
    """sum_b dL/dx[b] through the encoder, = sum_{b,j} dp[b,j] W_enc[idx[b,j]] = db_enc @ W_enc.

    On GPUs the GEMV reads W_enc once instead of gathering B*k rows. Not on CPU: MKL's GEMV splits the sum
    over n by thread count, and CPU gradients must be bitwise the same for any thread count."""
    if dx is not None:
        return _sum_rows(dx)
    if db_enc is not None and _gemv_for_bias_grad(W_enc):
        return db_enc.to(W_enc.dtype) @ W_enc
    return custom_ops.sparse_decode(backend, dp, idx, W_enc).sum(0)


def _like(grads, dtypes):
    """Gradients in their inputs' dtypes (fp32 for master weights, 16-bit for 16-bit activations)."""
    return tuple(cast_or_none(g, dt) for g, dt in zip(grads, dtypes))


def _gathered(W: Tensor, dtype: torch.dtype, rows: int, gathers: int) -> Tensor:
    """The decoder weights that ``gathers`` gathers of ``rows`` rows each will read. fp32 master weights beside
    16-bit codes are read as they are, unless a 16-bit copy costs fewer bytes: one pass (read 4 + write 2 per
    weight) against 2 bytes saved per weight of every gathered row, i.e. when rows * gathers > 3 n (W1, W3:
    B*k is several times n). Made inside an autograd Function, the copy is not differentiated through."""
    if not is_master(W.dtype, dtype):
        return W
    wide, narrow = W.element_size(), torch.finfo(dtype).bits // 8
    # Under torch.compile a code's width may be data-dependent (threshold lists): undecided means no copy.
    return W.to(dtype) if guard_or_false(rows * gathers * (wide - narrow) > W.shape[0] * (wide + narrow)) else W


class _Select(torch.autograd.Function):
    """Select entries of p = (x - b_dec) @ W_enc.T + b_enc without forming p; returns (pre, idx).
    ``mode`` names the selection primitive (topk, threshold, batchtopk); ``arg`` is its k or cutoff."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, backend, mode, arg):
        if mode == "topk":
            pre, idx, _, _ = custom_ops.topk_select(backend, x, W_enc, b_enc, b_dec, arg)
        elif mode == "threshold":
            pre, idx = custom_ops.threshold_select(backend, x, W_enc, b_enc, b_dec, arg)
        else:
            pre, idx = custom_ops.batch_topk_select(backend, x, W_enc, b_enc, b_dec, arg)
        ctx.backend = backend
        ctx.dtypes = [t.dtype for t in (x, W_enc, b_enc, b_dec)]
        ctx.save_for_backward(x, W_enc, b_dec, pre, idx)
        ctx.mark_non_differentiable(idx)
        return pre, idx

    @staticmethod
    def backward(ctx, d_pre, _):
        x, W_enc, b_dec, pre, idx = ctx.saved_tensors
        return (*_select_backward(ctx, x, W_enc, b_dec, pre, idx, d_pre), None, None, None)


class _SelectWithAux(torch.autograd.Function):
    """TopK selection plus AuxK's top-k_aux dead latents from one encoder pass (for a decoder that is a
    separate op: transcoders with d_out != d_in); returns (pre, idx, aux_pre, aux_idx)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, backend, k, dead_mask, k_aux):
        pre, idx, aux_pre, aux_idx = custom_ops.topk_select(backend, x, W_enc, b_enc, b_dec, k, dead_mask, k_aux)
        ctx.backend, ctx.k = backend, pre.shape[1]
        ctx.dtypes = [t.dtype for t in (x, W_enc, b_enc, b_dec)]
        ctx.save_for_backward(x, W_enc, b_dec, torch.cat([pre, aux_pre], 1), torch.cat([idx, aux_idx], 1))
        ctx.mark_non_differentiable(idx, aux_idx)
        return pre, idx, aux_pre, aux_idx

    @staticmethod
    def backward(ctx, d_pre, _, d_aux, __):
        x, W_enc, b_dec, pre, idx = ctx.saved_tensors
        k = ctx.k
        d_pre = torch.zeros_like(pre[:, :k]) if d_pre is None else d_pre
        d_aux = torch.zeros_like(pre[:, k:]) if d_aux is None else d_aux
        return (*_select_backward(ctx, x, W_enc, b_dec, pre, idx, torch.cat([d_pre, d_aux.to(d_pre.dtype)], 1)),
                None, None, None, None)


def _select_backward(ctx, x, W_enc, b_dec, pre, idx, d_pre):
    """Gradients of (x, W_enc, b_enc, b_dec) from those of the selected pre-activations."""
    need_x, need_W, need_b_enc, need_b_dec = ctx.needs_input_grad[:4]
    dp = torch.where(torch.isfinite(pre), d_pre, 0.0)  # padding entries (-inf) carry no gradient
    dW_enc = db_enc = dx = db_dec = None
    if need_W or need_b_enc:
        # Gathered rows stay in x's dtype; master weights get fp32 gradients straight from the kernel.
        xc = (x - b_dec).to(x.dtype)
        dW_enc, db_enc, _ = custom_ops.latent_backward(ctx.backend, idx, W_enc.shape[0], dp=dp, xc=xc,
                                                       grad_dtype=W_enc.dtype)
    if need_x:
        dx = custom_ops.sparse_decode(ctx.backend, dp, idx, W_enc)
    if need_b_dec:
        db_dec = -_encoder_input_grad_sum(ctx.backend, dp, idx, W_enc, db_enc, dx)
    grads = _like((dx, dW_enc, db_enc, db_dec), ctx.dtypes)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4]))


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, idx, W_dec, b_dec, backend):
        ctx.backend = backend
        ctx.bias_dtype = None if b_dec is None else b_dec.dtype
        ctx.weight_dtype = W_dec.dtype
        W = _gathered(W_dec, values.dtype, idx.numel(), 2 if ctx.needs_input_grad[0] else 1)
        ctx.save_for_backward(values, idx, W)
        # Backends return W's dtype; a decode over master weights comes back in the code's dtype.
        return custom_ops.sparse_decode(backend, values, idx, W, b_dec).to(values.dtype)

    @staticmethod
    def backward(ctx, g):
        values, idx, W = ctx.saved_tensors
        need_v, _, need_W, need_b = ctx.needs_input_grad[:4]
        g = g.contiguous()
        dv = custom_ops.gather_dot(ctx.backend, g, idx, W).to(values.dtype) if need_v else None
        dW_dec = (custom_ops.latent_backward(ctx.backend, idx, W.shape[0], v=values, g=g,
                                             grad_dtype=ctx.weight_dtype)[2] if need_W else None)
        db_dec = _sum_rows(g).to(ctx.bias_dtype) if (need_b and ctx.bias_dtype) else None
        return dv, None, dW_dec, db_dec, None


def suffix_sums(g: Tensor) -> Tensor:
    """S_p = sum_{q >= p} g_q over the first dim: a Matryoshka group's decoder rows see every prefix that
    holds it (backends/base.py)."""
    S = g.clone() if g.shape[0] > 1 else g
    for p in range(g.shape[0] - 2, -1, -1):  # G is small: G - 1 in-place adds, no flipped copies
        S[p] += S[p + 1]
    return S


class _TopKSAE(torch.autograd.Function):
    """TopK encode + decode in one node, so the backward makes one latent-sorted pass for dW_enc, db_enc
    and dW_dec together. Optionally also selects the top-k_aux dead latents (AuxK) in the same pass;
    without them the aux outputs are (B, 0). With Matryoshka ``widths`` the decode output is every
    prefix's reconstruction (G, B, d), from one decode pass, and the one backward pass serves them all."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, k, dead_mask, k_aux, backend, widths=None):
        pre, idx, aux_pre, aux_idx = custom_ops.topk_select(backend, x, W_enc, b_enc, b_dec, k, dead_mask, k_aux)
        values = torch.relu(pre)
        ctx.dtypes = [t.dtype for t in (x, W_enc, b_enc, W_dec, b_dec)]
        W_dec = _gathered(W_dec, x.dtype, idx.numel(), 2 if any(ctx.needs_input_grad[:5]) else 1)
        if widths is None:
            x_hat = custom_ops.sparse_decode(backend, values, idx, W_dec, b_dec).to(x.dtype)
        else:
            x_hat = custom_ops.matryoshka_decode(backend, values, idx, W_dec, b_dec, widths).to(x.dtype)
        ctx.backend, ctx.n, ctx.k_aux, ctx.widths = backend, W_enc.shape[0], k_aux, widths
        aux_values = torch.relu(aux_pre)
        ctx.save_for_backward(x, W_enc, W_dec, b_dec, pre, idx, values, aux_pre, aux_idx)
        ctx.mark_non_differentiable(idx, aux_idx)
        return values, idx, x_hat, aux_values, aux_idx

    @staticmethod
    def backward(ctx, d_values, _, g, d_aux_values, __):
        x, W_enc, W_dec, b_dec, pre, idx, values, aux_pre, aux_idx = ctx.saved_tensors
        backend, widths = ctx.backend, ctx.widths
        if widths is None:
            g = torch.zeros_like(x) if g is None else g.contiguous()
            dv = custom_ops.gather_dot(backend, g, idx, W_dec)
        else:  # g (G, B, d): one row block per group, the sum of the prefixes that hold it
            g = x.new_zeros(len(widths), *x.shape) if g is None else suffix_sums(g).contiguous()
            dv = custom_ops.matryoshka_gather_dot(backend, g, idx, W_dec, widths)
        if d_values is not None:
            dv = dv + d_values
        dp = dv * (pre > 0)
        v = values
        if ctx.k_aux and d_aux_values is not None:
            # AuxK gradients reach W_enc through the aux pre-activations; their dW_dec comes from the aux decode.
            dp = torch.cat([dp, (d_aux_values * (aux_pre > 0)).to(dp.dtype)], dim=1)
            idx = torch.cat([idx, aux_idx], dim=1)
            v = torch.cat([values, torch.zeros_like(aux_pre)], dim=1)
        need_x, need_W_enc, need_b_enc, need_W_dec, need_b_dec = ctx.needs_input_grad[:5]
        dW_enc = db_enc = dW_dec = dx = db_dec = None
        if need_W_enc or need_b_enc or need_W_dec:
            # Gathered rows stay in x's dtype; master weights get fp32 gradients straight from the kernel.
            xc, v = (x - b_dec).to(x.dtype), v if need_W_dec else None
            if widths is None:
                dW_enc, db_enc, dW_dec = custom_ops.latent_backward(backend, idx, ctx.n, dp=dp, xc=xc, v=v, g=g,
                                                                    grad_dtype=W_enc.dtype)
            else:
                dW_enc, db_enc, dW_dec = custom_ops.matryoshka_latent_backward(backend, idx, ctx.n, dp, xc, v, g,
                                                                               widths, W_enc.dtype)
        if need_x:
            dx = custom_ops.sparse_decode(backend, dp, idx, W_enc)
        if need_b_dec:
            db_dec = _sum_rows(g if widths is None else g[0]) - _encoder_input_grad_sum(backend, dp, idx, W_enc,
                                                                                         db_enc, dx)
        grads = _like((dx, dW_enc, db_enc, dW_dec, db_dec), ctx.dtypes)
        return (*(gr if need else None for gr, need in zip(grads, ctx.needs_input_grad[:5])),
                None, None, None, None, None)


# ============================================================================ public ops
def _reference_pre(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    """reference.py's dense pre-activations; master weights rounded to x's dtype first, as autocast would."""
    return reference.pre_activations(x, *(cast_or_none(t, x.dtype) for t in (W_enc, b_enc, b_dec)))


def _encode(x, W_enc, b_enc, b_dec, mode: str, arg, spec, finish=None):
    """The encoders' one path, after their input checks. The reference backend applies ``spec`` (the
    reference.py activation) to the dense pre-activations; any other backend selects entries with the
    ``mode`` primitive without forming them and applies ``finish(pre, idx)`` (default: ReLU)."""
    backend = get_backend(x.device)
    if isinstance(backend, ReferenceBackend):
        return spec(_reference_pre(x, W_enc, b_enc, b_dec))
    pre, idx = _Select.apply(x, W_enc, b_enc, b_dec, backend.name, mode, arg)
    return (torch.relu(pre), idx) if finish is None else finish(pre, idx)


def topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """TopK encode: ``values (B, k)`` (ReLU of the k largest pre-activations per row, descending) and
    ``indices (B, k)`` int32. Differentiable in x, W_enc, b_enc and b_dec."""
    check_encoder(x, W_enc, b_enc, b_dec)
    check_k("k", k, W_enc.shape[0])
    return _encode(x, W_enc, b_enc, b_dec, "topk", k, lambda pre: reference.topk(pre, k))


def relu_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> tuple[Tensor, Tensor]:
    """ReLU encode as a sparse code (only active entries; see reference.py for the layout)."""
    check_encoder(x, W_enc, b_enc, b_dec)
    return _encode(x, W_enc, b_enc, b_dec, "threshold", torch.zeros_like(b_enc), reference.relu)


def jumprelu_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, theta: Tensor,
                    bandwidth: float = 1e-3, return_l0: bool = False):
    """JumpReLU encode, ``f = p * (p > theta)``; theta (n,) > 0 gets straight-through gradients.

    With ``return_l0`` also returns the mean number of active latents per row, differentiable in theta
    through the step function's estimator (JumpReLU's sparsity loss)."""
    check_encoder(x, W_enc, b_enc, b_dec)
    check_float("theta", theta, (W_enc.shape[0],), x.dtype, x.device)

    def spec(pre):
        theta_x = theta.to(x.dtype)
        return (*reference.jumprelu(pre, theta_x, bandwidth), reference.l0_step(pre, theta_x, bandwidth))

    def finish(pre, idx):
        theta_listed = gather_latents(theta, idx)
        return (reference.JumpReLUFn.apply(pre, theta_listed, bandwidth), idx,
                reference.StepFn.apply(pre, theta_listed, bandwidth).sum(-1).mean())

    # List every entry inside the estimator's window too, so theta's gradient sees them.
    values, idx, l0 = _encode(x, W_enc, b_enc, b_dec, "threshold", theta.detach() - bandwidth / 2, spec, finish)
    return (values, idx, l0) if return_l0 else (values, idx)


def batch_topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """BatchTopK encode (training): the B*k largest pre-activations of the whole batch, ReLU'd."""
    check_encoder(x, W_enc, b_enc, b_dec)
    check_k("k", k, W_enc.shape[0])
    return _encode(x, W_enc, b_enc, b_dec, "batchtopk", k, lambda pre: reference.batch_topk(pre, k))


def topk_encode_with_aux(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, dead_mask: Tensor | None,
                         k_aux: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``topk_encode``'s (values, indices) and AuxK's (aux_values, aux_indices), the top-min(k_aux, n)
    pre-activations per row among the ``dead_mask`` latents, ReLU'd (padded with inactive entries where fewer
    are dead), from one encoder pass. For an encoder whose decoder is a separate op (a transcoder with
    d_out != d_in); ``topk_sae`` does both with the decoder otherwise. No ``dead_mask`` or k_aux 0: empty
    (B, 0) AuxK lists."""
    if dead_mask is None or not k_aux:
        values, idx = topk_encode(x, W_enc, b_enc, b_dec, k)
        return values, idx, values[:, :0], idx[:, :0]
    check_encoder(x, W_enc, b_enc, b_dec)
    n = W_enc.shape[0]
    check_k("k", k, n)
    check_dead_mask(dead_mask, n)
    k_aux = min(check_count("k_aux", k_aux), n)
    check_k("k_aux", k_aux, n)
    dead = dead_mask.to(x.device)
    backend = get_backend(x.device)
    if isinstance(backend, ReferenceBackend):
        pre = _reference_pre(x, W_enc, b_enc, b_dec)
        return (*reference.topk(pre, k), *reference.dead_topk(pre, dead, k_aux))
    pre, idx, aux_pre, aux_idx = _SelectWithAux.apply(x, W_enc, b_enc, b_dec, backend.name, k, dead, k_aux)
    return torch.relu(pre), idx, torch.relu(aux_pre), aux_idx


def threshold_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """BatchTopK at inference: ``p * (p > threshold)`` with one global threshold."""
    check_encoder(x, W_enc, b_enc, b_dec)
    threshold = check_number("threshold", threshold)
    cutoff = torch.full_like(b_enc, max(threshold, 0.0))
    return _encode(x, W_enc, b_enc, b_dec, "threshold", cutoff, lambda pre: reference.threshold_relu(pre, threshold))


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    """``x_hat[b] = sum_j values[b, j] * W_dec[indices[b, j]] + b_dec``; differentiable in values, W_dec, b_dec."""
    check_code(values, indices, W_dec, b_dec)
    backend = get_backend(values.device)
    if isinstance(backend, ReferenceBackend):
        check_index_range(indices, W_dec.shape[0])
        return reference.sparse_decode(values, indices, *(cast_or_none(t, values.dtype) for t in (W_dec, b_dec)))
    return _SparseDecode.apply(values.contiguous(), indices.contiguous(), W_dec, b_dec, backend.name)


def _segment_sum(src: Tensor, idx: Tensor, n: int) -> Tensor:
    """out[i] = sum of src where idx == i, (n,) float64, in a fixed order: a stable sort and float64
    prefix sums (float32 on MPS). Not index_add_ or an indexing backward: on CUDA those accumulate with atomics (order
    varies run to run) or serialise repeated indices (22 ms of a 25 ms ReLU+L1 step at W4 on an H100)."""
    flat = idx.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    acc = torch.float32 if src.device.type == "mps" else torch.float64  # MPS has no float64
    sums = torch.cat([src.new_zeros(1, dtype=acc), src.reshape(-1)[order].to(acc).cumsum(0)])
    bounds = torch.searchsorted(flat[order], torch.arange(n + 1, device=idx.device))
    return sums[bounds[1:]] - sums[bounds[:-1]]


class _GatherLatents(torch.autograd.Function):
    """table[idx] for a per-latent table (n,); its gradient is a deterministic segment sum."""

    @staticmethod
    def forward(ctx, table: Tensor, idx: Tensor) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.n, ctx.dtype = table.shape[0], table.dtype
        return table[idx.long()]

    @staticmethod
    def backward(ctx, g: Tensor):
        (idx,) = ctx.saved_tensors
        return _segment_sum(g, idx, ctx.n).to(ctx.dtype), None


def gather_latents(table: Tensor, indices: Tensor) -> Tensor:
    """``table[indices]`` for a per-latent table (n,) such as decoder norms or JumpReLU thresholds, with a
    deterministic, fast backward (see ``_segment_sum``)."""
    if isinstance(get_backend(table.device), ReferenceBackend):
        return table[indices.long()]
    return _GatherLatents.apply(table, indices)


def decoder_norm_l1(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """``reference.l1_penalty``: ``sum_i f_i * ||W_dec_i||`` per row, averaged over rows, in float32."""
    if isinstance(get_backend(values.device), ReferenceBackend):
        return reference.l1_penalty(values.float(), indices, W_dec.float())
    return (values.float() * gather_latents(W_dec.float().norm(dim=-1), indices)).sum(-1).mean()


class TopKSAEResult(NamedTuple):
    values: Tensor       # (B, k) ReLU'd top-k pre-activations, descending
    indices: Tensor      # (B, k) int32
    x_hat: Tensor        # (B, d) reconstruction
    aux_values: Tensor   # (B, k_aux) top-k_aux over dead latents (AuxK), or (B, 0)
    aux_indices: Tensor  # (B, k_aux) int32, or (B, 0)


class MatryoshkaTopKSAEResult(NamedTuple):
    """``topk_sae(..., matryoshka=widths)``: TopKSAEResult's fields and every prefix's reconstruction."""
    values: Tensor
    indices: Tensor
    x_hat: Tensor        # (B, d) the full reconstruction, prefixes[-1]
    aux_values: Tensor
    aux_indices: Tensor
    prefixes: Tensor     # (G, B, d)


def topk_sae(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int,
             dead_mask: Tensor | None = None, k_aux: int = 0, pad_aux: bool = False,
             matryoshka: list[int] | None = None) -> TopKSAEResult | MatryoshkaTopKSAEResult:
    """A whole TopK SAE forward in one differentiable op (one fused backward pass on fused backends).

    With ``dead_mask`` (n,) bool and ``k_aux`` > 0 it also returns the top-min(k_aux, #dead) dead latents
    per row, for the AuxK loss. ``pad_aux`` keeps the list min(k_aux, n) wide whatever the dead count, so
    nothing reads the count back to the host: missing dead latents are inactive entries (value 0), and
    with no dead latent at all the caller should zero the AuxK loss (``SparseAutoencoder`` multiplies it
    by ``dead_mask.any()``). ``matryoshka`` (cumulative prefix widths [m_1, ..., n]) adds every prefix's
    reconstruction, ``prefixes`` (G, B, d), from the same decode pass (a MatryoshkaTopKSAEResult; ``x_hat``
    is ``prefixes[-1]``)."""
    check_encoder(x, W_enc, b_enc, b_dec)
    n = W_enc.shape[0]
    check_float("W_dec", W_dec, (n, x.shape[1]), x.dtype, x.device)
    check_k("k", k, n)
    if matryoshka is not None:
        matryoshka = check_widths(matryoshka, n)
    if check_count("k_aux", k_aux) < 0:
        raise ValueError(f"k_aux must be >= 0; got {k_aux}")
    if dead_mask is not None and k_aux:
        check_dead_mask(dead_mask, n)
        k_aux = min(int(k_aux), n if pad_aux else int(dead_mask.sum()))
    else:
        k_aux = 0
    backend = get_backend(x.device)
    if isinstance(backend, ReferenceBackend):
        pre = _reference_pre(x, W_enc, b_enc, b_dec)
        values, idx = reference.topk(pre, k)
        W_x, b_x = (cast_or_none(t, x.dtype) for t in (W_dec, b_dec))
        prefixes = None if matryoshka is None else reference.matryoshka_decode(values, idx, W_x, b_x, matryoshka)
        x_hat = reference.sparse_decode(values, idx, W_x, b_x) if prefixes is None else prefixes[-1]
        if k_aux:
            aux_values, aux_idx = reference.dead_topk(pre, dead_mask.to(x.device), k_aux)
        else:
            aux_values = x.new_zeros(x.shape[0], 0)
            aux_idx = torch.zeros(x.shape[0], 0, dtype=reference.INDEX_DTYPE, device=x.device)
        if prefixes is not None:
            return MatryoshkaTopKSAEResult(values, idx, x_hat, aux_values, aux_idx, prefixes)
        return TopKSAEResult(values, idx, x_hat, aux_values, aux_idx)
    mask = dead_mask.to(x.device) if k_aux else None
    widths = matryoshka
    values, idx, x_hat, aux_values, aux_idx = _TopKSAE.apply(x, W_enc, b_enc, W_dec, b_dec, k, mask, k_aux,
                                                              backend.name, widths)
    if widths is None:
        return TopKSAEResult(values, idx, x_hat, aux_values, aux_idx)
    return MatryoshkaTopKSAEResult(values, idx, x_hat[-1], aux_values, aux_idx, x_hat)
