"""Latent-sorted backward: the B*K (row, latent) pairs of a sparse code sorted by latent (CSR), then one
program per block of latents writes whole gradient rows:

    dW_enc[i] = sum_{idx[b,j]=i} dp[b,j] * xc[b]     db_enc[i] = sum dp[b,j]     dW_dec[i] = sum v[b,j] * g[b]

Each row is summed by one program in a fixed order (the stable sort keeps row order), so there are no
atomics and the gradients are bitwise deterministic; latents without entries get their zero rows in the
same pass (no separate memset). Entries whose coefficients are all zero (padding of variable-length
codes, inactive TopK entries) add nothing and are sorted past the last latent, so padding that points at
latent 0 does not pile onto one program. The sort is torch's (a radix sort on CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


# ============================================================================ kernels
@triton.jit
def _latent_backward_kernel(entry_ptr, offset_ptr, dp_ptr, xc_ptr, v_ptr, g_ptr, dW_enc_ptr, db_enc_ptr, dW_dec_ptr,
                            n, d, K,
                            stride_dpb, stride_dpk, stride_xb, stride_xd, stride_vb, stride_vk, stride_gb, stride_gd,
                            stride_encn, stride_decn,
                            HAS_ENC: tl.constexpr, HAS_DEC: tl.constexpr,
                            BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (latent block, d block) as a (BLOCK_L, BLOCK_D) tile: step j gathers the j-th entry of
    every latent in the block at once, so BLOCK_L rows are in flight instead of one (most latents have
    about B*K/n entries, a handful). Each latent still sums its entries in entry order: deterministic."""
    lats = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    lat_ok = lats < n
    first_d = (lats * 0 + tl.program_id(1)) == 0  # a block, not a splatted scalar bool (the interpreter's int32)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < d
    start = tl.load(offset_ptr + lats, mask=lat_ok, other=0)
    count = tl.load(offset_ptr + lats + 1, mask=lat_ok, other=0) - start
    acc_enc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    acc_dec = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for j in range(0, tl.max(count, 0)):
        e_ok = j < count
        entry = tl.load(entry_ptr + start + j, mask=e_ok, other=0)
        row = entry // K
        col = entry % K
        m2 = e_ok[:, None] & d_ok[None, :]
        if HAS_ENC:
            c = tl.load(dp_ptr + row * stride_dpb + col * stride_dpk, mask=e_ok, other=0.0).to(tl.float32)
            xr = tl.load(xc_ptr + row[:, None] * stride_xb + ds[None, :] * stride_xd, mask=m2, other=0.0)
            acc_enc += c[:, None] * xr.to(tl.float32)
            acc_b += c
        if HAS_DEC:
            c = tl.load(v_ptr + row * stride_vb + col * stride_vk, mask=e_ok, other=0.0).to(tl.float32)
            gr = tl.load(g_ptr + row[:, None] * stride_gb + ds[None, :] * stride_gd, mask=m2, other=0.0)
            acc_dec += c[:, None] * gr.to(tl.float32)
    out_ok = lat_ok[:, None] & d_ok[None, :]
    if HAS_ENC:
        tl.store(dW_enc_ptr + lats.to(tl.int64)[:, None] * stride_encn + ds[None, :],
                 acc_enc.to(dW_enc_ptr.dtype.element_ty), mask=out_ok)
        tl.store(db_enc_ptr + lats, acc_b.to(db_enc_ptr.dtype.element_ty), mask=lat_ok & first_d)
    if HAS_DEC:
        tl.store(dW_dec_ptr + lats.to(tl.int64)[:, None] * stride_decn + ds[None, :],
                 acc_dec.to(dW_dec_ptr.dtype.element_ty), mask=out_ok)


# ============================================================================ configs
@dataclass(frozen=True)
class LatentBackwardConfig:
    BLOCK_L: int
    BLOCK_D: int
    num_warps: int


def latent_backward_config(n: int, d: int) -> LatentBackwardConfig:
    """8 latents x up to 256 columns per program, 4 warps: the fastest on an H100 for W1-W3 of
    benchmarks/triton_tune.py (0.40 ms at W2 where one latent at a time took 4.7 ms; 32 latents do not
    compile with Triton 3.6)."""
    return LatentBackwardConfig(8, min(256, max(16, triton.next_power_of_2(d))), 4)


# ============================================================================ launchers
def sort_by_latent(idx: torch.Tensor, n: int, live: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of the pairs by latent: entries (B*K,) int64 flat positions b*K + j in (latent, row) order,
    offsets (n + 1,) int64. Pairs where ``live`` is False go after latent n - 1, outside every range."""
    flat = idx.reshape(-1)
    if live is not None:
        flat = torch.where(live.reshape(-1), flat, torch.full_like(flat, n))
    lat, entries = torch.sort(flat, stable=True)
    offsets = torch.searchsorted(lat, torch.arange(n + 1, device=idx.device, dtype=lat.dtype))
    return entries.contiguous(), offsets.contiguous()


def latent_backward(idx: torch.Tensor, n: int, dp: torch.Tensor | None = None, xc: torch.Tensor | None = None,
                    v: torch.Tensor | None = None, g: torch.Tensor | None = None,
                    config: LatentBackwardConfig | None = None, grad_dtype: torch.dtype | None = None):
    """(dW_enc (n, d), db_enc (n,), dW_dec (n, d)) in ``grad_dtype``, else in xc's and g's dtypes; a pair
    left as None gives None. idx must lie in [0, n)."""
    assert idx.dim() == 2 and idx.dtype in (torch.int32, torch.int64)
    B, K = idx.shape
    has_enc, has_dec = dp is not None, v is not None
    assert has_enc == (xc is not None) and has_dec == (g is not None) and (has_enc or has_dec)
    ref = xc if has_enc else g
    d = ref.shape[1]
    for t in (dp, v):
        assert t is None or (t.shape == (B, K) and t.device == idx.device)
    for t in (xc, g):
        assert t is None or (t.shape == (B, d) and t.device == idx.device)
    dev = idx.device
    dW_enc = torch.empty(n, d, dtype=grad_dtype or xc.dtype, device=dev) if has_enc else None
    db_enc = torch.empty(n, dtype=grad_dtype or xc.dtype, device=dev) if has_enc else None
    dW_dec = torch.empty(n, d, dtype=grad_dtype or g.dtype, device=dev) if has_dec else None
    live = (dp != 0) if has_enc else None
    if has_dec:
        live = (v != 0) if live is None else live | (v != 0)
    entries, offsets = sort_by_latent(idx, n, live)
    cfg = config or latent_backward_config(n, d)
    grid = (triton.cdiv(n, cfg.BLOCK_L), triton.cdiv(d, cfg.BLOCK_D))
    dummy = ref
    _latent_backward_kernel[grid](
        entries, offsets, dp if has_enc else dummy, xc if has_enc else dummy, v if has_dec else dummy,
        g if has_dec else dummy, dW_enc if has_enc else dummy, db_enc if has_enc else dummy,
        dW_dec if has_dec else dummy, n, d, K,
        *(dp.stride() if has_enc else (0, 0)), *(xc.stride() if has_enc else (0, 0)),
        *(v.stride() if has_dec else (0, 0)), *(g.stride() if has_dec else (0, 0)),
        dW_enc.stride(0) if has_enc else 0, dW_dec.stride(0) if has_dec else 0,
        HAS_ENC=has_enc, HAS_DEC=has_dec, BLOCK_L=cfg.BLOCK_L, BLOCK_D=cfg.BLOCK_D,
        num_warps=cfg.num_warps, enable_fp_fusion=True)
    return dW_enc, db_enc, dW_dec
