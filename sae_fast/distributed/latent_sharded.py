"""Latent-sharded SAE (tensor parallel over latents): rank r owns latents [r n/w, (r+1) n/w).

Each rank holds its rows of W_enc, b_enc, W_dec (and JumpReLU's thresholds), their Adam state and their
dead-latent counters; b_dec is replicated. Every rank sees the whole batch x (B, d). Forward:
    TopK       local fused top-k (and AuxK's top-k_aux over local dead latents) -> all_gather (values,
               global indices), B x k per rank -> the global top-k (reference.py's order and tie rule)
               -> each rank decodes its own winners -> x_hat = SumShards(partials) + b_dec.
    BatchTopK  local batch top-(B k) -> all_gather of the candidates -> the global B k best -> as TopK.
    ReLU, JumpReLU  local threshold encode, x_hat, L1 and L0 are sums of per-shard parts.
The loss is then computed identically on every rank from the summed x_hat, so SumShards passes the
gradient through unchanged and each shard's weight gradients are the single-process gradients restricted
to the shard; b_dec's encoder-side gradient is summed over shards (Replicate). Collectives per step: two
all_gathers of B x k (values, indices; AuxK adds B x k_aux) and an all_reduce of B x d per decode, forward
only; the backward's one collective is the all_reduce of b_dec's gradient (d).
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from .. import ops, reference
from ..sae import SAEConfig, SAEOutput, SparseAutoencoder
from .collectives import all_gather_cat, all_reduce_, merge_top, pad_candidates, rank_world, replicate, sum_shards
from .wrapper import WrapsSAE

LATENT_PARAMS = ("W_enc", "b_enc", "W_dec", "log_threshold")  # row i belongs to latent i
LATENT_BUFFERS = ("tokens_since_fired",)
INIT_CHUNK_VALUES = 1 << 22  # random values drawn at a time by shard_init_state (16 MB)


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    if n % world:
        raise ValueError(f"n_latents={n} must be divisible by the world size {world} for --distributed latent "
                         f"(each rank owns n / world latents); pick n_latents a multiple of {world}")
    size = n // world
    return rank * size, (rank + 1) * size


def local_config(cfg: SAEConfig, world: int) -> SAEConfig:
    n_local = cfg.n_latents // world
    return dataclasses.replace(cfg, n_latents=n_local, k=min(cfg.k, n_local))


def shard_init_state(cfg: SAEConfig, seed: int | None, start: int, stop: int) -> dict:
    """Rows [start, stop) of ``SparseAutoencoder(cfg=cfg, seed=seed)``'s initial state, without the whole
    n x d matrix: the generator is streamed in chunks of 16-row multiples (torch's CPU normal_ fills blocks
    of 16 values, so the chunks draw the same numbers as one call; tests/test_distributed.py checks it) and
    only this shard's rows are kept. ``seed=None`` streams torch's global generator, as the module does."""
    n, d = cfg.n_latents, cfg.d_in
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    rows = 16 * max(1, INIT_CHUNK_VALUES // (16 * d))
    kept = []
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        block = torch.randn(hi - lo, d, generator=gen, dtype=torch.float32)
        if hi > start and lo < stop:
            kept.append(block[max(start, lo) - lo:min(stop, hi) - lo])
        if hi >= stop and seed is not None:
            break  # later rows are not ours (the global generator is streamed to the end, as one call would)
    W_dec = torch.cat(kept)
    W_dec /= W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    state = {"W_dec": W_dec, "W_enc": W_dec.clone(), "b_enc": torch.zeros(stop - start), "b_dec": torch.zeros(d)}
    if cfg.activation == "jumprelu":
        state["log_threshold"] = torch.full((stop - start,), math.log(cfg.jumprelu_init_threshold))
    return state


class LatentShardedSAE(WrapsSAE):
    """One rank's shard of an SAE with ``cfg.n_latents`` latents. ``forward`` returns the global
    SAEOutput (the same on every rank; for relu/jumprelu ``values``/``indices`` are this shard's code,
    with global indices). ``local`` is an ordinary SparseAutoencoder holding the shard's rows.

    ``LatentShardedSAE(full)`` keeps this rank's rows of an existing SAE; ``LatentShardedSAE(cfg=...,
    seed=...)`` initialises only them, equal to the rows of ``SparseAutoencoder(cfg=cfg, seed=seed)``."""

    def __init__(self, full: SparseAutoencoder | None = None, group=None, *, cfg: SAEConfig | None = None,
                 seed: int | None = None, device=None):
        super().__init__()
        self.group = group
        self.rank, self.world = rank_world(group)
        self.cfg = full.cfg if full is not None else cfg
        if self.cfg is None:
            raise TypeError("LatentShardedSAE needs an SAE to shard or cfg=")
        self.start, self.stop = shard_range(self.cfg.n_latents, self.rank, self.world)
        if full is not None:
            state = {k: (v[self.start:self.stop] if k in LATENT_PARAMS + LATENT_BUFFERS else v).detach().clone()
                     for k, v in full.state_dict().items()}
            device, dtype = full.W_enc.device, full.W_enc.dtype
            buffers = {k: state.pop(k) for k in ("tokens_since_fired", "threshold")}
        else:
            state, dtype, buffers = shard_init_state(self.cfg, seed, self.start, self.stop), torch.float32, None
        self.local = SparseAutoencoder.from_weights(local_config(self.cfg, self.world), state, device=device,
                                                    dtype=dtype, buffers=buffers)

    # The trainer reaches these on any SAE-like module.
    @property
    def inner(self) -> SparseAutoencoder:
        return self.local

    @property
    def dead_mask(self) -> Tensor:
        """The global (n,) dead mask (a collective: call it on every rank)."""
        return all_gather_cat(self.local.dead_mask.to(torch.uint8), 0, self.group).bool()

    # ------------------------------------------------------------------ forward
    def _merge_topk(self, values: Tensor, local_idx: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor]:
        keys = local_idx.long() + self.start
        v, kk = pad_candidates(values, keys, m)
        won, gv, gk = merge_top(v, kk, m, self.group)
        return won[:, :values.shape[1]], gv, gk

    def _decode_sum(self, values: Tensor, idx: Tensor, won: Tensor | None, W_dec: Tensor, like: Tensor) -> Tensor:
        """SumShards of this shard's decode of its winning entries (fp32, (B, d))."""
        if values.shape[1] == 0:
            part = like.new_zeros(like.shape, dtype=torch.float32)
        else:
            if won is not None:
                values = torch.where(won, values, torch.zeros((), dtype=values.dtype, device=values.device))
            part = ops.sparse_decode(values, idx, W_dec, None).float()
        return sum_shards(part, self.group)

    def forward(self, x: Tensor) -> SAEOutput:
        cfg, sae = self.cfg, self.local
        lead = x.shape[:-1]
        x2 = sae._flatten(x)
        dtype, (W_enc, b_enc, W_dec, b_dec) = sae._weights(x2)
        xc = x2.to(dtype)
        b_dec_enc = replicate(b_dec, self.group)  # the encoder's use of b_dec: its gradient sums over shards
        B = x2.shape[0]
        aux_loss = x2.new_zeros((), dtype=torch.float32)
        l0_soft = None
        if cfg.activation == "topk":
            use_aux = self.training and cfg.k_aux > 0 and torch.is_grad_enabled()
            dead = sae.dead_mask
            n_dead = int(all_reduce_(dead.sum().reshape(1), group=self.group)) if use_aux else 0
            k_aux = min(cfg.k_aux, n_dead)
            k_aux_local = min(k_aux, int(dead.sum()))
            res = ops.topk_sae(xc, W_enc, b_enc, W_dec, b_dec_enc, sae.cfg.k, dead if k_aux_local else None,
                               k_aux_local)
            won, values, keys = self._merge_topk(res.values, res.indices, cfg.k)
            x_hat = self._decode_sum(res.values, res.indices, won, W_dec, x2) + b_dec.float()
            mine = torch.where(won, res.values, torch.zeros((), dtype=res.values.dtype, device=x2.device))
            local_vals, local_idx = mine, res.indices
            values = values.to(res.values.dtype)
            indices = keys.to(reference.INDEX_DTYPE)
            if k_aux:
                a_won = self._merge_topk(res.aux_values, res.aux_indices, k_aux)[0]  # (B, 0) ranks pad
                e_hat = self._decode_sum(res.aux_values, res.aux_indices, a_won, W_dec, x2)
                residual = (x2.float() - x_hat).detach()
                aux_loss = reference.fvu(e_hat, residual)
        elif cfg.activation == "batchtopk" and (self.training or sae.threshold < 0):
            lv, li = ops.batch_topk_encode(xc, W_enc, b_enc, b_dec_enc, sae.cfg.k)
            flat_keys = (torch.arange(B, device=x2.device)[:, None] * cfg.n_latents + li.long() + self.start)
            c = int(all_reduce_(torch.tensor([lv.numel()], device=x2.device), torch.distributed.ReduceOp.MAX,
                                self.group))
            v, kk = pad_candidates(lv.reshape(1, -1), flat_keys.reshape(1, -1), max(c, 1))
            won = merge_top(v, kk, min(B * cfg.k, B * cfg.n_latents), self.group)[0][:, :lv.numel()]
            won = won.view_as(lv) & (lv > 0)
            x_hat = self._decode_sum(lv, li, won, W_dec, x2) + b_dec.float()
            local_vals = torch.where(won, lv, torch.zeros((), dtype=lv.dtype, device=x2.device))
            local_idx = li
            values, indices = local_vals, li + self.start
        else:
            if cfg.activation == "jumprelu":
                theta = sae._as(sae.log_threshold.exp(), xc.dtype)
                lv, li, l0_local = ops.jumprelu_encode(xc, W_enc, b_enc, b_dec_enc, theta,
                                                       cfg.jumprelu_bandwidth, return_l0=True)
                l0_soft = sum_shards(l0_local.float().reshape(1), self.group)[0]
            elif cfg.activation == "relu":
                lv, li = ops.relu_encode(xc, W_enc, b_enc, b_dec_enc)
            else:  # batchtopk at inference: the learned global threshold, applied per shard
                lv, li = ops.threshold_encode(xc, W_enc, b_enc, b_dec_enc, float(sae.threshold))
            x_hat = self._decode_sum(lv, li, None, W_dec, x2) + b_dec.float()
            local_vals, local_idx = lv, li
            values, indices = lv, li + self.start

        xf = x2.float()
        mse = reference.mse(x_hat, xf)
        fvu = reference.fvu(x_hat, xf)
        l1_local = ops.decoder_norm_l1(local_vals, local_idx, W_dec)
        l0_local = (local_vals > 0).sum(-1).float().mean()
        if cfg.activation == "relu":
            l1 = sum_shards(l1_local.reshape(1), self.group)[0]
            l0 = all_reduce_(l0_local.detach().reshape(1), group=self.group)[0]
        else:
            l1, l0 = all_reduce_(torch.stack([l1_local.detach(), l0_local.detach()]), group=self.group)
        if cfg.activation in ("topk", "batchtopk"):
            loss = fvu + cfg.aux_coeff * aux_loss
        elif cfg.activation == "relu":
            loss = mse + cfg.l1_coeff * l1
        else:
            loss = mse + cfg.l0_coeff * l0_soft
        if self.training:
            self._update_training_state(local_vals, local_idx, B)
        return SAEOutput(x_hat.to(x2.dtype).reshape(*lead, cfg.d_in), values.reshape(*lead, -1),
                         indices.reshape(*lead, -1), loss, mse, fvu, aux_loss, l1, l0)

    @torch.no_grad()
    def _update_training_state(self, local_vals: Tensor, local_idx: Tensor, B: int) -> None:
        sae = self.local
        sae.tokens_since_fired += B
        sae.tokens_since_fired[local_idx[local_vals > 0].long()] = 0
        if self.cfg.activation == "batchtopk":  # EMA of the smallest kept activation over all shards
            pos = local_vals[local_vals > 0]
            m = pos.min().float() if pos.numel() else torch.tensor(float("inf"), device=pos.device)
            m = all_reduce_(m.reshape(1), torch.distributed.ReduceOp.MIN, self.group)[0]
            if torch.isfinite(m):
                sae.threshold.copy_(m if sae.threshold < 0 else 0.99 * sae.threshold + 0.01 * m)
