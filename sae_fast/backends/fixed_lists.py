"""Selections of a data-dependent size computed into lists of a width fixed on the host, so the triton
backend's training step reads nothing back (the widths come from bounds; the device says whether they held).

    keyed_topk(scores, k)                the k best per row, ties to the lower position, exactly
    dead_rows_topk(..., capacity)        AuxK's top-k_aux over at most ``capacity`` dead latents
    batch_winners / pack_winners         BatchTopK's global B*k best among per-row candidates

Exact ties without a host read: each score becomes a unique int64 key (the score's order-preserving bits
above, the complement of its position below), so one torch.topk on keys has no ties to settle.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference


def order_keys(scores: Tensor, pos: Tensor) -> Tensor:
    """int64 keys: larger fp32 score first, then lower ``pos`` (< 2**32) first. NaN (either sign) ranks
    first, as torch.topk ranks it; -0.0 ties +0.0."""
    bits = (scores.float() + 0.0).view(torch.int32)
    bits = torch.where(torch.isnan(scores), 0x7FC00000, bits)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (bits.long() << 32) | (pos.long() ^ 0xFFFFFFFF)


def key_pos(keys: Tensor) -> Tensor:
    return (keys & 0xFFFFFFFF) ^ 0xFFFFFFFF


def keyed_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values (B, k), positions (B, k) int64): the k largest per row, best first, ties to the lower position
    (reference.topk_indices' order, without its host read)."""
    pos = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    top = key_pos(torch.topk(order_keys(scores, pos), k, dim=1).values)
    return scores.gather(1, top), top


def dead_rows_topk(x: Tensor, W: Tensor, c: Tensor, dead_mask: Tensor, k_aux: int, capacity: int,
                   mm) -> tuple[Tensor, Tensor, Tensor]:
    """AuxK as a GEMM over a block of ``capacity`` rows of the encoder's scores p = x @ W.T + c (W as the
    encoder tiles read it, c the folded bias; ``mm(x, rows) -> (B, capacity) fp32``): the dead latents
    first, in latent order (a stable sort of the mask), slots past the dead count scored -inf.
    (aux_pre (B, k_aux) fp32, aux_idx (B, k_aux) int32, dead count (0-d, on the device)); padding is
    (-inf, 0). Exact when the dead count <= capacity."""
    B, n = x.shape[0], W.shape[0]
    dead_count = dead_mask.sum()
    aux_pre = torch.full((B, k_aux), float("-inf"), dtype=torch.float32, device=x.device)
    aux_idx = torch.zeros((B, k_aux), dtype=reference.INDEX_DTYPE, device=x.device)
    capacity = min(capacity, n)
    if capacity == 0:
        return aux_pre, aux_idx, dead_count
    rows = torch.sort((~dead_mask).to(torch.uint8), stable=True).indices[:capacity]
    live = torch.arange(capacity, device=x.device) < dead_count
    scores = mm(x, W[rows]).add_(torch.where(live, c[rows], float("-inf")))
    m = min(k_aux, capacity)
    pre, pos = keyed_topk(scores, m)
    aux_pre[:, :m] = pre
    aux_idx[:, :m] = torch.where(torch.isneginf(pre), 0, rows[pos]).to(aux_idx.dtype)
    return aux_pre, aux_idx, dead_count


def batch_winners(pre: Tensor, idx: Tensor, n: int, total: int) -> Tensor:
    """(B, m) bool: which of the per-row candidates (pre, idx: each row's m best, any order) are among the
    ``total`` best of the batch in reference.py's order (value descending, then row * n + latent
    ascending). Exact when no row has all m of its candidates winning (unless m == n)."""
    B, m = pre.shape
    flat = torch.arange(B, device=pre.device)[:, None] * n + idx.long()
    by_flat = torch.sort(flat.view(-1)).indices
    rank = torch.empty_like(by_flat)  # each candidate's place in flat-index order: its tie key
    rank[by_flat] = torch.arange(B * m, device=pre.device)
    top = key_pos(torch.topk(order_keys(pre.reshape(-1), rank), min(total, B * m)).values)
    win = torch.zeros(B * m, dtype=torch.bool, device=pre.device)
    win[by_flat[top]] = True
    return win.view(B, m)


def pack_winners(pre: Tensor, idx: Tensor, win: Tensor, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Each row's winners in ascending latent order, padded (-inf, 0) to the candidates' width m."""
    order = torch.sort(torch.where(win, idx.long(), n), dim=1).indices
    kept = win.gather(1, order)
    out_pre = torch.where(kept, pre.gather(1, order), float("-inf")).to(dtype)
    out_idx = torch.where(kept, idx.gather(1, order), 0).to(reference.INDEX_DTYPE)
    return out_pre, out_idx
