"""Autograd-aware collectives and the cross-rank top-k merge, on a torch.distributed process group.

    SumShards   forward all_reduce(sum), backward identity: for a value every rank then uses identically
                (the reconstruction, an L1 sum), each rank already holds the whole upstream gradient.
    Replicate   forward identity, backward all_reduce(sum): for a replicated tensor (b_dec) entering
                per-shard computation, whose gradient is the sum of the shards' parts.
    merge_top   the m best of every rank's candidates, ranked exactly as reference.py ranks them (larger
                first, NaN first as torch.topk does, ties to the lower global key).
"""
from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist
from torch import Tensor


def rank_world(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group`` (the default group when None)."""
    return dist.get_rank(group), dist.get_world_size(group)


class SumShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        out = t.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        return g, None


class Replicate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def sum_shards(t: Tensor, group=None) -> Tensor:
    return SumShards.apply(t, group)


def replicate(t: Tensor, group=None) -> Tensor:
    return Replicate.apply(t, group)


def all_reduce_(t: Tensor, op=dist.ReduceOp.SUM, group=None) -> Tensor:
    """In-place all_reduce of a tensor that needs no gradient; returns it."""
    dist.all_reduce(t, op=op, group=group)
    return t


def all_gather_cat(t: Tensor, dim: int, group=None) -> Tensor:
    """Every rank's ``t`` (same shape on all ranks) concatenated along ``dim`` in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim)


def merge_top(values: Tensor, keys: Tensor, m: int, group=None) -> tuple[Tensor, Tensor, Tensor]:
    """Per row, the ``m`` best candidates over all ranks' ``values (R, c)`` with distinct global ``keys
    (R, c)`` (int64): larger value first, NaN before everything (torch.topk's order), equal values to the
    lower key -- reference.topk_indices's rule. Pad a rank's candidates with -inf to a common c.

    Returns (won (R, c) bool: which of this rank's candidates were chosen, the chosen values (R, m) and
    their keys (R, m), best first). Moves R * c values and keys per rank (an all_gather), never R x n."""
    rank, world = rank_world(group)
    R, c = values.shape
    V = all_gather_cat(values.detach(), 1, group)
    K = all_gather_cat(keys, 1, group)
    by_key = K.argsort(dim=1, stable=True)
    order = torch.sort(V.gather(1, by_key), dim=1, descending=True, stable=True).indices[:, :m]
    chosen = by_key.gather(1, order)
    won = torch.zeros(R, world * c, dtype=torch.bool, device=values.device).scatter_(1, chosen, True)
    return won.view(R, world, c)[:, rank], V.gather(1, chosen), K.gather(1, chosen)


def pad_candidates(values: Tensor, keys: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """Pad (R, c0) candidates to (R, c) with -inf values and keys past every real one (they never win
    while enough real candidates exist)."""
    extra = c - values.shape[1]
    if extra <= 0:
        return values, keys
    R = values.shape[0]
    pad_v = values.new_full((R, extra), float("-inf"))
    pad_k = torch.full((R, extra), torch.iinfo(torch.int64).max, dtype=torch.int64, device=keys.device)
    return torch.cat([values.detach(), pad_v], 1), torch.cat([keys, pad_k], 1)


def config_digest(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same_config(d: dict, what: str = "configuration", group=None) -> None:
    """Raise a ValueError on every rank when the ranks were started with different ``d``."""
    digests = [None] * dist.get_world_size(group)
    dist.all_gather_object(digests, config_digest(d), group=group)
    if len(set(digests)) > 1:
        odd = [r for r, h in enumerate(digests) if h != digests[0]]
        raise ValueError(f"ranks {odd} were started with a different {what} than rank 0; "
                         "pass the same arguments to every rank")
