"""Decoder kernels over a sparse code (values (B, K), idx (B, K)):

    sparse_decode  out[b] = sum_j values[b, j] * W[idx[b, j]] (+ bias)   gather-accumulate of K rows
    gather_dot     out[b, j] = <g[b], W[idx[b, j]]>                        its backward for the values

Both read only the K selected rows of W per token (B*K*d), accumulate in fp32 and store in W's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


# ============================================================================ kernels
@triton.jit
def _sparse_decode_kernel(v_ptr, idx_ptr, w_ptr, bias_ptr, out_ptr, K, d,
                          stride_vb, stride_vk, stride_ib, stride_ik, stride_wn, stride_wd, stride_ob,
                          HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (row b, d block): out[b, ds] = sum over the row's K entries, BLOCK_K at a time."""
    b = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < d
    js = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j0 in range(0, K, BLOCK_K):
        j_ok = (j0 + js) < K
        lat = tl.load(idx_ptr + b * stride_ib + (j0 + js) * stride_ik, mask=j_ok, other=0).to(tl.int64)
        v = tl.load(v_ptr + b * stride_vb + (j0 + js) * stride_vk, mask=j_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + lat[:, None] * stride_wn + ds[None, :] * stride_wd,
                    mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v[:, None] * w, 0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * stride_ob + ds, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _gather_dot_kernel(g_ptr, idx_ptr, w_ptr, out_ptr, K, d,
                       stride_gb, stride_gd, stride_ib, stride_ik, stride_wn, stride_wd, stride_ob,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (row b, entry block): out[b, js] = <g[b], W[idx[b, js]]>, over d in BLOCK_D steps."""
    b = tl.program_id(0).to(tl.int64)
    js = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    j_ok = js < K
    lat = tl.load(idx_ptr + b * stride_ib + js * stride_ik, mask=j_ok, other=0).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        ds = d0 + dd
        d_ok = ds < d
        g = tl.load(g_ptr + b * stride_gb + ds * stride_gd, mask=d_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + lat[:, None] * stride_wn + ds[None, :] * stride_wd,
                    mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * g[None, :], 1)
    tl.store(out_ptr + b * stride_ob + js, acc.to(out_ptr.dtype.element_ty), mask=j_ok)


# ============================================================================ configs
@dataclass(frozen=True)
class DecoderConfig:
    BLOCK_K: int
    BLOCK_D: int
    num_warps: int


def decode_config(K: int, d: int) -> DecoderConfig:
    """(BLOCK_K, BLOCK_D) tile of gathered rows: at most 8192 fp32 values live per program."""
    bd = min(512, max(16, triton.next_power_of_2(d)))
    bk = min(max(1, 8192 // bd), max(2, triton.next_power_of_2(K)), 32)
    return DecoderConfig(bk, bd, 4)


def gather_dot_config(K: int, d: int) -> DecoderConfig:
    bk = min(32, max(2, triton.next_power_of_2(K)))
    bd = min(256, max(16, triton.next_power_of_2(d)))
    return DecoderConfig(bk, bd, 4)


# ============================================================================ launchers
def _check(idx: torch.Tensor, W: torch.Tensor):
    assert idx.dim() == 2 and W.dim() == 2 and idx.device == W.device
    assert idx.dtype in (torch.int32, torch.int64)


def sparse_decode(values: torch.Tensor, idx: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None = None,
                  config: DecoderConfig | None = None) -> torch.Tensor:
    """(B, d) in W's dtype. idx must lie in [0, n) (the triton backend checks it before this launch)."""
    _check(idx, W)
    B, K = idx.shape
    d = W.shape[1]
    assert values.shape == (B, K) and (bias is None or bias.shape == (d,))
    out = torch.empty(B, d, dtype=W.dtype, device=W.device)
    if B == 0:
        return out
    cfg = config or decode_config(K, d)
    grid = (B, triton.cdiv(d, cfg.BLOCK_D))
    _sparse_decode_kernel[grid](
        values, idx, W, bias if bias is not None else W, out, K, d,
        values.stride(0), values.stride(1), idx.stride(0), idx.stride(1), W.stride(0), W.stride(1), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_K=cfg.BLOCK_K, BLOCK_D=cfg.BLOCK_D, num_warps=cfg.num_warps,
        enable_fp_fusion=True)
    return out


def gather_dot(g: torch.Tensor, idx: torch.Tensor, W: torch.Tensor,
               config: DecoderConfig | None = None) -> torch.Tensor:
    """(B, K) in W's dtype: <g[b], W[idx[b, j]]>."""
    _check(idx, W)
    B, K = idx.shape
    d = W.shape[1]
    assert g.shape == (B, d)
    out = torch.empty(B, K, dtype=W.dtype, device=W.device)
    if B == 0 or K == 0:
        return out
    cfg = config or gather_dot_config(K, d)
    grid = (B, triton.cdiv(K, cfg.BLOCK_K))
    _gather_dot_kernel[grid](
        g, idx, W, out, K, d,
        g.stride(0), g.stride(1), idx.stride(0), idx.stride(1), W.stride(0), W.stride(1), out.stride(0),
        BLOCK_K=cfg.BLOCK_K, BLOCK_D=cfg.BLOCK_D, num_warps=cfg.num_warps, enable_fp_fusion=True)
    return out
