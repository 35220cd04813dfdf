"""The math of a sparse autoencoder in plain torch: the specification every kernel is tested against.

Shapes and layout (row i of both matrices belongs to latent i):
    x (B, d)   W_enc (n, d)   b_enc (n,)   W_dec (n, d)   b_dec (d,)

    pre-activations   p = (x - b_dec) @ W_enc.T + b_enc                        (B, n)
    decode            x_hat = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec  (B, d)

A sparse code is a pair ``values (B, K)``, ``indices (B, K) int32``. An entry is *active* iff its value
is > 0; inactive entries (value 0) may carry any valid index and contribute nothing.
    TopK         K = k, sorted by pre-activation, descending; ties go to the lower latent index.
                 Backends must agree on values and indices exactly (up to float rounding of values).
    others       Only the set of active (index, value) pairs is specified: compare through
                 ``sparse_to_dense``. This file returns them in ascending latent order, padded with
                 (value 0, index 0) to the largest row count.

Activations:
    topk       keep the k largest p per row, then ReLU.
    batchtopk  training: keep the B*k largest p over the whole batch (ties: lower row, then lower
               latent), then ReLU; inference: p where p > a learned global threshold.
    relu       f = relu(p), trained with lambda * sum_i f_i * ||W_dec_i|| (decoder-norm-weighted L1).
    jumprelu   f = p * (p > theta_i); theta gets gradients through a straight-through estimator
               with a rectangle kernel of width ``bandwidth`` (Rajamanoharan et al., 2024).

Matryoshka (Bussmann et al., 2025, arXiv:2503.17547), on topk or batchtopk codes:
    ``matryoshka = [m_1, ..., m_G]`` are cumulative prefix widths, 0 < m_1 < ... < m_G = n: SAELens'
    ``MatryoshkaBatchTopKTrainingSAEConfig.matryoshka_widths`` convention. (dictionary_learning's
    ``MatryoshkaBatchTopKSAE(group_sizes=...)`` gives the per-group sizes instead: its group_sizes are
    our m_i - m_{i-1}.) Prefix i reconstructs with the latents j < m_i only:
        x_hat_i = sum_{j: indices[:, j] < m_i} values[:, j] * W_dec[indices[:, j]] + b_dec
    and the loss is the SUM over prefixes of their FVUs, ``sum_i fvu(x_hat_i, x)``, plus AuxK on the full
    residual x - x_hat_G. SAELens sums the prefixes' MSEs the same way (its outer prefix is the plain loss,
    the inner ones are added); FVU is that MSE over the variance of x, the same constant for every prefix,
    so this is SAELens' objective rescaled exactly as our plain TopK loss is. (dictionary_learning weights
    the groups 1/G, a rescaling of the same sum.) The latents a code picks do not depend on the prefixes.

Transcoders (sparsify's SparseCoder with transcode=True; SAELens' Transcoder and SkipTranscoder) read a
module's input x (B, d_in) and predict its output y (B, d_out): W_enc (n, d_in), W_dec (n, d_out),
b_dec (d_out,), and with a skip connection W_skip (d_out, d_in).
    pre-activations   p = x @ W_enc.T + b_enc        no b_dec subtracted: b_dec lives in y's space
                      (sparsify's SparseCoder.encode subtracts b_dec only when not transcode; SAELens'
                      Transcoder.process_sae_in skips it and its config refuses apply_b_dec_to_input)
    prediction        y_hat = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec  (+ x @ W_skip.T)
    loss              fvu(y_hat, y) + aux_coeff * AuxK, AuxK = fvu(e_hat, y - y_hat) on the detached residual
                      of the target (sparsify's e = y - sae_out, skip term included)
The activations are an SAE's. An SAE with a skip connection (sparsify allows one) is the same with y = x and
b_dec subtracted in the encoder. sparsify starts W_dec (and W_skip) at zero and keeps no unit-norm decoder
rows for transcoders; ``transcoder_forward`` below is the whole forward.
"""
from __future__ import annotations

import torch
from torch import Tensor

INDEX_DTYPE = torch.int32


# ----------------------------------------------------------------------------- encoder
def pre_activations(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    """(B, n) pre-activations ``(x - b_dec) @ W_enc.T + b_enc``."""
    return (x - b_dec) @ W_enc.T + b_enc


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Indices (int64) of the k largest scores per row, sorted by score descending, ties to the lower index."""
    _, idx = torch.topk(scores, k, dim=-1, sorted=True)
    kth = scores.gather(-1, idx[:, -1:])
    # torch.topk does not promise which of several equal scores it keeps; fix the rare rows with a
    # tie at the boundary (or inside the kept set) with a stable sort, which keeps lower indices first.
    n_ge = (scores >= kth).sum(-1)
    kept = scores.gather(-1, idx)
    unsure = (n_ge != k) | (kept[:, 1:] == kept[:, :-1]).any(-1)
    if unsure.any():
        rows = unsure.nonzero().squeeze(1)
        order = torch.sort(scores[rows], dim=-1, descending=True, stable=True).indices[:, :k]
        idx = idx.clone()
        idx[rows] = order
    return idx


def topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """TopK activation: (values (B, k), indices (B, k) int32)."""
    idx = topk_indices(pre, k)
    return torch.relu(pre.gather(-1, idx)), idx.to(INDEX_DTYPE)


def dense_to_sparse(f: Tensor, listed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Compact a dense (B, n) activation with f >= 0 into (values, indices): the ``listed`` entries
    (default: the active ones, f > 0) in ascending latent order, padded to the largest row count with
    (0, index 0). Differentiable in f, including at listed entries whose value is 0."""
    listed = f > 0 if listed is None else listed
    counts = listed.sum(-1)
    K = max(int(counts.max()) if f.shape[0] else 0, 1)
    # A stable sort of "not listed" flags brings listed latents to the front in ascending order.
    order = torch.sort((~listed).to(torch.uint8), dim=-1, stable=True).indices[:, :K]
    slot_used = torch.arange(K, device=f.device)[None, :] < counts[:, None]
    idx = torch.where(slot_used, order, torch.zeros_like(order))
    values = torch.where(slot_used, f.gather(-1, idx), torch.zeros((), dtype=f.dtype, device=f.device))
    return values, idx.to(INDEX_DTYPE)


def sparse_to_dense(values: Tensor, indices: Tensor, n: int) -> Tensor:
    """Scatter a sparse code back into a dense (B, n) tensor (inactive padding adds zero)."""
    out = torch.zeros(values.shape[0], n, dtype=values.dtype, device=values.device)
    return out.scatter_add(-1, indices.long(), values)


def batch_topk_mask(pre: Tensor, k: int) -> Tensor:
    """Mask of the B*k largest pre-activations over the whole batch (ties: lower flat index wins)."""
    B, n = pre.shape
    flat_idx = topk_indices(pre.reshape(1, -1), min(B * k, B * n))[0]
    mask = torch.zeros(B * n, dtype=torch.bool, device=pre.device)
    mask[flat_idx] = True
    return mask.view(B, n)


def batch_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """BatchTopK activation for training: the B*k largest entries of the batch, ReLU'd, as a sparse code."""
    return dense_to_sparse(torch.relu(pre) * batch_topk_mask(pre, k))


def threshold_relu(pre: Tensor, threshold: Tensor | float) -> tuple[Tensor, Tensor]:
    """BatchTopK at inference: ``p * (p > threshold)`` with one global threshold (>= 0)."""
    return dense_to_sparse(torch.where(pre > threshold, pre, torch.zeros_like(pre)).relu())


def relu(pre: Tensor) -> tuple[Tensor, Tensor]:
    """ReLU activation as a sparse code."""
    return dense_to_sparse(torch.relu(pre))


def _rectangle(z: Tensor) -> Tensor:
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class JumpReLUFn(torch.autograd.Function):
    """f = p * (p > theta). d f / d p = (p > theta); d f / d theta = -(theta / bw) * rect((p - theta) / bw)."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return torch.where(pre > theta, pre, torch.zeros_like(pre))

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        d_pre = grad * (pre > theta)
        d_theta = -(theta / bw) * _rectangle((pre - theta) / bw) * grad
        return d_pre, _sum_to(d_theta, theta.shape), None


class StepFn(torch.autograd.Function):
    """H(p - theta), the L0 count. d / d p = 0; d / d theta = -(1 / bw) * rect((p - theta) / bw)."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        d_theta = -(1.0 / bw) * _rectangle((pre - theta) / bw) * grad
        return None, _sum_to(d_theta, theta.shape), None


def _sum_to(t: Tensor, shape) -> Tensor:
    while t.dim() > len(shape):
        t = t.sum(0)
    return t


def jumprelu_dense(pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    """Dense JumpReLU activation with its straight-through estimator for theta (n,)."""
    return JumpReLUFn.apply(pre, theta, bandwidth)


def jumprelu(pre: Tensor, theta: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
    """JumpReLU activation as a sparse code. Entries inside the estimator's window (p > theta - bw/2) are
    listed even when inactive (value 0): theta's gradient through the reconstruction needs their dL/df."""
    return dense_to_sparse(jumprelu_dense(pre, theta, bandwidth), listed=pre > theta - bandwidth / 2)


def l0_step(pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    """Mean over rows of the number of latents with p > theta, differentiable in theta (the JumpReLU L0 loss)."""
    return StepFn.apply(pre, theta, bandwidth).sum(-1).mean()


# ----------------------------------------------------------------------------- decoder
def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    """x_hat[b] = sum_j values[b, j] * W_dec[indices[b, j]] (+ b_dec)."""
    out = (values.unsqueeze(-1) * W_dec[indices.long()]).sum(-2)
    return out if b_dec is None else out + b_dec


def matryoshka_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
                      widths: list[int]) -> Tensor:
    """(G, B, d): every prefix's reconstruction x_hat_i, each decoded afresh from the entries below m_i."""
    return torch.stack([sparse_decode(torch.where(indices < m, values, 0.0), indices, W_dec, b_dec)
                        for m in widths])


def matryoshka_loss(x: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
                    widths: list[int]) -> tuple[Tensor, Tensor]:
    """(sum_i fvu(x_hat_i, x), (G,) the FVU of each prefix); add AuxK on x - x_hat_G to train."""
    prefix = torch.stack([fvu(x_hat, x) for x_hat in matryoshka_decode(values, indices, W_dec, b_dec, widths)])
    return prefix.sum(), prefix


# ----------------------------------------------------------------------------- losses
def mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """Squared reconstruction error per token, summed over d and averaged over the batch."""
    return (x_hat - x).pow(2).sum(-1).mean()


def fvu(x_hat: Tensor, x: Tensor) -> Tensor:
    """Fraction of variance unexplained: sum of squared errors over the total variance of x around its mean."""
    total = (x - x.mean(0)).pow(2).sum()
    return (x_hat - x).pow(2).sum() / total.clamp_min(torch.finfo(x.dtype).tiny)


def l1_penalty(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """Decoder-norm-weighted L1, ``sum_i f_i * ||W_dec_i||``, averaged over the batch."""
    return (values * W_dec.norm(dim=-1)[indices.long()]).sum(-1).mean()


def auxk_loss(residual: Tensor, aux_values: Tensor, aux_indices: Tensor, W_dec: Tensor) -> Tensor:
    """AuxK (Gao et al., 2024): how well the top-k_aux *dead* latents reconstruct the residual x - x_hat
    (detached by the caller), as a fraction of the residual's variance."""
    return fvu(sparse_decode(aux_values, aux_indices, W_dec, None), residual)


def dead_topk(pre: Tensor, dead_mask: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
    """The k_aux largest pre-activations per row among dead latents (k_aux <= number of dead), ReLU'd."""
    masked = pre.masked_fill(~dead_mask, float("-inf"))
    return topk(masked, k_aux)


# ----------------------------------------------------------------------------- transcoders
def transcoder_forward(x: Tensor, y: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,
                       W_skip: Tensor | None, k: int, dead_mask: Tensor | None = None, k_aux: int = 0,
                       aux_coeff: float = 1 / 32) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A TopK transcoder: (y_hat (B, d_out), values, indices, fvu(y_hat, y), loss). AuxK (with ``dead_mask``
    and k_aux > 0) models the residual y - y_hat with the top-k_aux dead latents, zero when none is dead."""
    pre = x @ W_enc.T + b_enc
    values, indices = topk(pre, k)
    y_hat = sparse_decode(values, indices, W_dec, b_dec)
    if W_skip is not None:
        y_hat = y_hat + x @ W_skip.T
    err = fvu(y_hat, y)
    loss = err
    if dead_mask is not None and k_aux:
        aux_v, aux_i = dead_topk(pre, dead_mask, min(k_aux, pre.shape[1]))
        loss = loss + aux_coeff * auxk_loss((y - y_hat).detach(), aux_v, aux_i, W_dec) * dead_mask.any()
    return y_hat, values, indices, err, loss
