"""Fused threshold encoder (ReLU, JumpReLU, BatchTopK inference): the GEMM ``p = x @ W_enc.T + c`` in tiles
(encoder_common) that append every entry with p > cutoff[latent] to per-(row, split) lists, so the (B, n)
pre-activations are never written.

The lists have a capacity; counts keep counting past it, so an overflow is detected and rerun with the
exact capacity. A compaction kernel then packs the splits' lists into (B, K) rows in ascending latent
order. The scan encoder (scan_encoder.py) runs the same kernels over chunks of cuBLAS scores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .encoder_common import (
    Device,
    EncoderConfig,
    check_weights,
    encoder_config,
    multiplies_in_fp32,
    precision,
    program_span,
    split_grid,
    tile_scores,
)


# ============================================================================ kernels
@triton.jit
def _threshold_partial_kernel(x_ptr, w_ptr, c_ptr, cut_ptr, pre_ptr, idx_ptr, count_ptr, s_ptr,
                              B, col_lo, col_hi, d, n_per_split, cap,
                              stride_xb, stride_xd, stride_wn, stride_wd, stride_sb,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                              FROM_SCORES: tl.constexpr, RESUME: tl.constexpr):
    """Per (row block, split) of the latents [col_lo, col_hi): entries with p > cutoff, ascending latent,
    into (B, S, cap) lists; count (B, S) is the true number (it may exceed cap: the launcher then reruns).
    FROM_SCORES and RESUME as in _topk_partial_kernel (RESUME appends to the lists of earlier chunks)."""
    rows, row_ok, lo, hi, base = program_span(B, col_lo, col_hi, n_per_split, BLOCK_M)
    if RESUME:
        count = tl.load(count_ptr + base, mask=row_ok, other=0)
    else:
        count = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        s = tile_scores(x_ptr, w_ptr, c_ptr, s_ptr, rows, cols, row_ok, col_ok, B, col_lo, d, stride_xb, stride_xd,
                        stride_wn, stride_wd, stride_sb, BLOCK_K, DOT_FP32, PRECISION, FROM_SCORES)
        cut = tl.load(cut_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        hit = (s > cut[None, :]) & col_ok[None, :] & row_ok[:, None]
        if tl.max(tl.max(hit.to(tl.int32), 1), 0) > 0:
            pos = count[:, None] + tl.cumsum(hit.to(tl.int32), 1) - 1
            keep = hit & (pos < cap)
            dst = base[:, None] * cap + pos
            tl.store(pre_ptr + dst, s.to(pre_ptr.dtype.element_ty), mask=keep)
            tl.store(idx_ptr + dst, tl.broadcast_to(cols[None, :], (BLOCK_M, BLOCK_N)), mask=keep)
            count += tl.sum(hit.to(tl.int32), 1)
    tl.store(count_ptr + base, count, mask=row_ok)


@triton.jit
def _compact_kernel(part_pre_ptr, part_idx_ptr, count_ptr, offset_ptr, pre_ptr, idx_ptr, S, cap, K, stride_ob,
                    BLOCK: tl.constexpr):
    """Copy list (row, split) to its offset in output row ``row`` (splits ascend in latent order). Counts
    are given as kept (<= cap); entries past the row's width K are left out (a fixed-width list that
    overflowed: the caller checks the counts)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    slot = row.to(tl.int64) * S + split
    offset = tl.load(offset_ptr + slot)
    count = tl.minimum(tl.load(count_ptr + slot), K - offset)
    j = tl.arange(0, BLOCK)
    for j0 in range(0, count, BLOCK):
        m = (j0 + j) < count
        v = tl.load(part_pre_ptr + slot * cap + j0 + j, mask=m)
        i = tl.load(part_idx_ptr + slot * cap + j0 + j, mask=m)
        tl.store(pre_ptr + row.to(tl.int64) * stride_ob + offset + j0 + j, v, mask=m)
        tl.store(idx_ptr + row.to(tl.int64) * stride_ob + offset + j0 + j, i, mask=m)


# ============================================================================ launchers
def check_args(x: torch.Tensor, W_enc: torch.Tensor, c: torch.Tensor, cutoff: torch.Tensor, capacity: int) -> None:
    B, d = x.shape
    n = W_enc.shape[0]
    assert W_enc.shape == (n, d) and c.shape == (n,) and cutoff.shape == (n,) and capacity >= 1
    check_weights(x, W_enc)
    assert x.device == W_enc.device == c.device == cutoff.device


def new_lists(x: torch.Tensor, splits: int, capacity: int):
    """Empty per-(row, split) lists: pre (B, S, cap) in x's dtype, idx (B, S, cap) int32, count (B, S) int32."""
    B = x.shape[0]
    part_pre = torch.empty(B, splits, capacity, dtype=x.dtype, device=x.device)
    part_idx = torch.empty(B, splits, capacity, dtype=torch.int32, device=x.device)
    count = torch.empty(B, splits, dtype=torch.int32, device=x.device)
    return part_pre, part_idx, count


def launch_partial(grid, x: torch.Tensor, W_enc: torch.Tensor, c: torch.Tensor, cutoff: torch.Tensor, lists,
                   cfg: EncoderConfig, per_split: int, col_lo: int = 0, col_hi: int | None = None,
                   scores: torch.Tensor | None = None, dot_fp32: bool = False, resume: bool = False) -> None:
    """One launch of _threshold_partial_kernel over the latents [col_lo, col_hi) (default all) into ``lists``
    (new_lists): the tiles multiply x @ W_enc.T, or read ``scores`` (B, col_hi - col_lo) fp32 products;
    ``resume`` appends to the lists."""
    B, d = x.shape
    col_hi = W_enc.shape[0] if col_hi is None else col_hi
    part_pre, part_idx, count = lists
    s = c if scores is None else scores
    _threshold_partial_kernel[grid](
        x, W_enc, c, cutoff, part_pre, part_idx, count, s, B, col_lo, col_hi, d, per_split, part_pre.shape[2],
        x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), 0 if scores is None else scores.stride(0),
        DOT_FP32=dot_fp32, FROM_SCORES=scores is not None, RESUME=resume, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
        BLOCK_K=cfg.BLOCK_K, PRECISION=precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        enable_fp_fusion=True)


def threshold_partial(x: torch.Tensor, W_enc: torch.Tensor, c: torch.Tensor, cutoff: torch.Tensor, capacity: int,
                      config: EncoderConfig | None = None):
    """First pass of threshold_select: per (row, split) lists (pre (B, S, cap), idx (B, S, cap)) and the
    true counts (B, S) int32, which exceed ``capacity`` where a list overflowed."""
    check_args(x, W_enc, c, cutoff, capacity)
    B, d = x.shape
    dev = Device.of(x)
    cfg = config or encoder_config(B, d, W_enc.shape[0], 1, x.dtype, dev, threshold=True)
    grid, per_split, S = split_grid(x, W_enc, cfg)
    lists = new_lists(x, S, capacity)
    launch_partial(grid, x, W_enc, c, cutoff.contiguous(), lists, cfg, per_split, dot_fp32=multiplies_in_fp32(x, dev))
    return lists


def threshold_compact(part_pre: torch.Tensor, part_idx: torch.Tensor, count: torch.Tensor, K: int):
    """Pack the (row, split) lists into (B, K) rows: pre padded with -inf, idx with 0. Lists that overflowed
    their capacity keep their first ``capacity`` entries, rows their first K (see select_fixed)."""
    B, S, capacity = part_pre.shape
    assert part_idx.shape == part_pre.shape and count.shape == (B, S) and K >= 1
    count = count.clamp(max=capacity).to(torch.int32)
    offsets = (torch.cumsum(count, 1, dtype=torch.int64) - count).contiguous()
    pre = torch.full((B, K), float("-inf"), dtype=part_pre.dtype, device=part_pre.device)
    idx = torch.zeros((B, K), dtype=torch.int32, device=part_pre.device)
    _compact_kernel[(B, S)](part_pre, part_idx, count, offsets, pre, idx, S, capacity, K, pre.stride(0),
                            BLOCK=min(1024, triton.next_power_of_2(max(capacity, 16))), num_warps=4,
                            enable_fp_fusion=True)
    return pre, idx


def select_lists(partial, capacity: int):
    """(pre (B, K), idx (B, K), per-split capacity needed) from ``partial(capacity)`` (a first pass that
    returns lists and true counts): a pass that overflows is rerun once with the exact capacity, then the
    lists are compacted."""
    part_pre, part_idx, count = partial(capacity)
    need = int(count.max())
    if need > capacity:  # the counts are exact, so one rerun always fits
        part_pre, part_idx, count = partial(need)
    K = max(int(count.sum(1).max()), 1)
    pre, idx = threshold_compact(part_pre, part_idx, count, K)
    return pre, idx, need


def select_fixed(partial, capacity: int, K: int):
    """select_lists without a host read: ``capacity`` slots per (row, split), rows K wide. (pre (B, K),
    idx (B, K), per-split need, per-row need): the needs are 0-d device tensors; the lists are exact
    when need <= capacity and row need <= K, else cut short (the caller checks, later)."""
    part_pre, part_idx, count = partial(capacity)
    pre, idx = threshold_compact(part_pre, part_idx, count, K)
    return pre, idx, count.max(), count.sum(1).max()


def threshold_select(x: torch.Tensor, W_enc: torch.Tensor, c: torch.Tensor, cutoff: torch.Tensor, capacity: int = 64,
                     config: EncoderConfig | None = None, width: int | None = None):
    """Every entry with p > cutoff[latent]: (pre (B, K) in x's dtype, padded with -inf; idx (B, K) int32,
    padded with 0; per-split capacity needed). Entries are in ascending latent order per row. A first
    pass with ``capacity`` slots per (row, split) that overflows is rerun with the exact capacity.
    ``width`` K given: select_fixed (no host read; the needs come back as device tensors)."""
    partial = lambda cap: threshold_partial(x, W_enc, c, cutoff, cap, config)  # noqa: E731
    return select_lists(partial, capacity) if width is None else select_fixed(partial, capacity, width)
