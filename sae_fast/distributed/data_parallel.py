"""Data-parallel SAE training: every rank holds the whole SAE and encodes its own rows of the batch.

The SAE losses are not means of per-rank losses: FVU divides by the variance of the *global* batch
around its *global* mean, and BatchTopK picks the B k best entries of the global batch. So the
denominators (row counts, means, variances) are all_reduced first (no gradient needed), each rank's
loss is its share of the global loss (the shares sum to it), and the gradients are all_reduced with
SUM in one flat bucket before the optimizer step (``attach_grad_sync``). The reported metrics are the
global values (each output field carries its share's gradient and the global value). Dead-latent
counters advance by the global batch and reset where any rank fired (all_reduce MAX); BatchTopK's
threshold EMA uses the global minimum. A Matryoshka SAE's prefix errors are shared the same way (each
prefix's SSE over the global variance). Every rank then takes the single-process step on the
concatenated batch, up to float summation order.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import ops
from ..matryoshka import matryoshka_decode
from ..sae import SAEOutput, SparseAutoencoder
from .collectives import all_gather_cat, all_reduce_, merge_top, pad_candidates, rank_world
from .wrapper import WrapsSAE


def _with_value(share: Tensor, total: Tensor) -> Tensor:
    """``total``'s value with ``share``'s gradient."""
    return share + (total - share).detach()


class DataParallelSAE(WrapsSAE):
    """Wraps a SparseAutoencoder (identical on every rank); ``forward(x)`` takes this rank's rows, or with
    ``takes_global_batch`` the whole batch, of which it encodes its ``tensor_split`` part (the trainer's
    use: every rank reads the same stream)."""

    def __init__(self, sae: SparseAutoencoder, group=None, takes_global_batch: bool = False):
        super().__init__()
        self.module, self.group, self.takes_global_batch = sae, group, takes_global_batch
        self.rank, self.world = rank_world(group)
        self.cfg = sae.cfg

    @property
    def inner(self) -> SparseAutoencoder:
        return self.module

    @property
    def dead_mask(self) -> Tensor:
        return self.module.dead_mask

    def forward(self, x: Tensor) -> SAEOutput:
        cfg, sae = self.cfg, self.module
        lead = x.shape[:-1]
        x2 = sae._flatten(x)
        if self.takes_global_batch:
            x2 = x2.tensor_split(self.world)[self.rank]
            lead = x2.shape[:-1]
        dtype, (W_enc, b_enc, W_dec, b_dec) = sae._weights(x2)
        xc = x2.to(dtype)
        B = x2.shape[0]
        counts = all_gather_cat(torch.tensor([B], device=x2.device), 0, self.group)
        B_g, offset = int(counts.sum()), int(counts[:self.rank].sum())
        zero = x2.new_zeros((), dtype=torch.float32)
        l0_soft, e_hat = None, None
        if cfg.activation == "topk":
            use_aux = self.training and cfg.k_aux > 0 and torch.is_grad_enabled()
            dead = self.dead_mask if use_aux else None
            res = ops.topk_sae(xc, W_enc, b_enc, W_dec, b_dec, cfg.k, dead, cfg.k_aux if use_aux else 0,
                               matryoshka=cfg.matryoshka)
            values, indices, x_hat = res.values, res.indices, res.x_hat
            prefixes = None if cfg.matryoshka is None else res.prefixes
            if res.aux_values.shape[1]:
                e_hat = ops.sparse_decode(res.aux_values, res.aux_indices, W_dec, None).float()
        elif cfg.activation == "batchtopk" and (self.training or sae.threshold < 0):
            # This rank's candidates: its best min(B_g k, B n) entries; the global B_g k best are among them.
            k_local = min(cfg.n_latents, math.ceil(B_g * cfg.k / max(B, 1)))
            lv, li = ops.batch_topk_encode(xc, W_enc, b_enc, b_dec, k_local)
            keys = (torch.arange(B, device=x2.device)[:, None] + offset) * cfg.n_latents + li.long()
            c = int(all_reduce_(torch.tensor([lv.numel()], device=x2.device), dist.ReduceOp.MAX, self.group))
            v, kk = pad_candidates(lv.reshape(1, -1), keys.reshape(1, -1), max(c, 1))
            won = merge_top(v, kk, B_g * cfg.k, self.group)[0][:, :lv.numel()].view_as(lv) & (lv > 0)
            values = torch.where(won, lv, torch.zeros((), dtype=lv.dtype, device=x2.device))
            indices = li
        else:
            values, indices, l0_soft = sae._encode2d(xc, W_enc, b_enc, b_dec, return_l0=True)
        if cfg.activation != "topk":
            prefixes = None if cfg.matryoshka is None else matryoshka_decode(values, indices, W_dec, b_dec,
                                                                             cfg.matryoshka)
            x_hat = ops.sparse_decode(values, indices, W_dec, b_dec) if prefixes is None else prefixes[-1]

        xf, x_hat_f = x2.float(), x_hat.float()
        residual = (xf - x_hat_f).detach() if e_hat is not None else None
        sums = torch.cat([xf.sum(0), residual.sum(0) if residual is not None else xf.new_zeros(x2.shape[1])])
        means = all_reduce_(sums.detach(), group=self.group) / B_g
        mx, mr = means[:cfg.d_in], means[cfg.d_in:]
        sse = (x_hat_f - xf).pow(2).sum()
        aux_sse = (e_hat - residual).pow(2).sum() if e_hat is not None else zero
        l1_sum = ops.decoder_norm_l1(values, indices, W_dec) * B
        l0_sum = (values > 0).sum().float()
        psse = None if prefixes is None else (prefixes.float() - xf).pow(2).sum((1, 2))  # (G,) prefix SSEs
        parts = torch.stack([(xf - mx).pow(2).sum(), (residual - mr).pow(2).sum() if e_hat is not None else zero,
                             sse.detach(), aux_sse.detach(), l1_sum.detach(), l0_sum,
                             l0_soft.detach().float() * B if l0_soft is not None else zero])
        if psse is not None:
            parts = torch.cat([parts, psse.detach()])
        var_x, var_r, sse_g, aux_g, l1_g, l0_g, l0s_g, *psse_g = all_reduce_(parts, group=self.group).unbind()
        tiny = torch.finfo(torch.float32).tiny
        var_x, var_r = var_x.clamp_min(tiny), var_r.clamp_min(tiny)
        mse = _with_value(sse / B_g, sse_g / B_g)
        fvu = _with_value(sse / var_x, sse_g / var_x)
        aux_loss = _with_value(aux_sse / var_r, aux_g / var_r) if e_hat is not None else zero
        l1 = _with_value(l1_sum / B_g, l1_g / B_g)
        l0 = l0_g / B_g
        prefix_fvu = None if psse is None else _with_value(psse / var_x, torch.stack(psse_g) / var_x)
        if prefix_fvu is not None:
            loss = prefix_fvu.sum() + cfg.aux_coeff * aux_loss
        elif cfg.activation in ("topk", "batchtopk"):
            loss = fvu + cfg.aux_coeff * aux_loss
        elif cfg.activation == "relu":
            loss = mse + cfg.l1_coeff * l1
        else:
            loss = mse + cfg.l0_coeff * _with_value(l0_soft.float() * B / B_g, l0s_g / B_g)
        if self.training:
            self._update_training_state(values, indices, B_g)
        return SAEOutput(x_hat.reshape(*lead, cfg.d_in), values.reshape(*lead, -1), indices.reshape(*lead, -1),
                         loss, mse, fvu, aux_loss, l1, l0, prefix_fvu)

    @torch.no_grad()
    def _update_training_state(self, values: Tensor, indices: Tensor, B_g: int) -> None:
        sae = self.module
        fired = torch.zeros(self.n_latents, dtype=torch.int32, device=values.device)
        fired[indices[values > 0].long()] = 1
        fired = all_reduce_(fired, dist.ReduceOp.MAX, self.group).bool()
        sae.tokens_since_fired += B_g
        sae.tokens_since_fired[fired] = 0
        if self.cfg.activation == "batchtopk":
            pos = values[values > 0]
            m = pos.min().float() if pos.numel() else torch.tensor(float("inf"), device=values.device)
            m = all_reduce_(m.reshape(1), dist.ReduceOp.MIN, self.group)[0]
            if torch.isfinite(m):
                sae.threshold.copy_(m if sae.threshold < 0 else 0.99 * sae.threshold + 0.01 * m)


def sync_gradients(module: nn.Module, group=None) -> None:
    """all_reduce(SUM) every parameter's gradient in one flat bucket (a missing gradient counts as 0)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    dist.all_reduce(flat, group=group)
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset:offset + n].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        offset += n


def attach_grad_sync(optimizer: torch.optim.Optimizer, module: nn.Module, group=None):
    """Sum the gradients over ranks right before every ``optimizer.step()``; returns the hook handle."""
    return optimizer.register_step_pre_hook(lambda opt, args, kwargs: sync_gradients(module, group))
