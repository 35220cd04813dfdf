"""The training step's latent-row work fused (sae_fast.optim.FusedAdam on the triton backend): the entries
of a step sorted by latent (CSR, as latent_backward.py), then one program per block of latents, per row:

    pass 1  over d in chunks: the W_enc gradient chunk (sum dp * xc) and Adam on W_enc; the W_dec gradient
            chunk (sum v * g) dotted with the W_dec row, and the row's squared norm
    pass 2  over d again: the W_dec gradient chunk recomputed, plus the L1 term d_norm * W / ||W||, minus
            the parallel component (its coefficient from pass 1), then Adam on W_dec
    pass 3  the decoder row renormalised (when asked); Adam on b_enc

No (n, d) gradient is written: pass 2 re-reads the latent's few entries' rows instead (they are in L2).
Latents with no entry get Adam's exact zero-gradient update in the same passes. Each latent's sums run in
entry order in one program: deterministic, no atomics. fp32 weights and moments; xc and g in any float
dtype (bf16 activations beside fp32 master weights).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .latent_backward import sort_by_latent


# ============================================================================ kernels
@triton.jit
def _adam(p, m, s, g, step_size, bc2_sqrt, w1, b2, w2, eps):
    """torch.optim.Adam's update of a block (lerp for the first moment)."""
    m = m + w1 * (g - m)
    s = s * b2 + w2 * g * g
    p = p - step_size * (m / (tl.sqrt(s) / bc2_sqrt + eps))
    return p, m, s


@triton.jit
def _dec_grad_chunk(entry_ptr, start, count, n_max, v_ptr, g_ptr, ds, d_ok, K, K_main, B, stride_gb,
                    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for j in range(0, n_max):
        e_ok = j < count
        entry = tl.load(entry_ptr + start + j, mask=e_ok, other=0)
        row = entry // K
        grow = tl.where(entry % K < K_main, row, row + B)  # AuxK's entries read their own rows of g
        c = tl.load(v_ptr + entry, mask=e_ok, other=0.0).to(tl.float32)
        gr = tl.load(g_ptr + grow[:, None] * stride_gb + ds[None, :], mask=e_ok[:, None] & d_ok[None, :], other=0.0)
        acc += c[:, None] * gr.to(tl.float32)
    return acc


@triton.jit
def _fused_adam_kernel(entry_ptr, offset_ptr, dp_ptr, xc_ptr, v_ptr, g_ptr, dnorm_ptr,
                       We_ptr, be_ptr, Wd_ptr, mWe_ptr, sWe_ptr, mbe_ptr, sbe_ptr, mWd_ptr, sWd_ptr,
                       n, d, K, K_main, B, stride_xb, stride_gb,
                       step_size, bc2_sqrt, w1, b2, w2, eps,
                       HAS_DNORM: tl.constexpr, PROJECT: tl.constexpr, RENORM: tl.constexpr,
                       BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    lats = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    lat_ok = lats < n
    start = tl.load(offset_ptr + lats, mask=lat_ok, other=0)
    count = tl.load(offset_ptr + lats + 1, mask=lat_ok, other=0) - start
    n_max = tl.max(count, 0)
    rows64 = lats.to(tl.int64) * d
    # b_enc's gradient, and pass 1
    gb = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for j in range(0, n_max):
        e_ok = j < count
        entry = tl.load(entry_ptr + start + j, mask=e_ok, other=0)
        gb += tl.load(dp_ptr + entry, mask=e_ok, other=0.0).to(tl.float32)
    dot_gw = tl.zeros((BLOCK_L,), dtype=tl.float32)
    ww = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < d
        m2 = lat_ok[:, None] & d_ok[None, :]
        acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        for j in range(0, n_max):
            e_ok = j < count
            entry = tl.load(entry_ptr + start + j, mask=e_ok, other=0)
            c = tl.load(dp_ptr + entry, mask=e_ok, other=0.0).to(tl.float32)
            xr = tl.load(xc_ptr + (entry // K)[:, None] * stride_xb + ds[None, :], mask=e_ok[:, None] & d_ok[None, :],
                         other=0.0)
            acc += c[:, None] * xr.to(tl.float32)
        off = rows64[:, None] + ds[None, :]
        p, m, s = _adam(tl.load(We_ptr + off, mask=m2, other=0.0), tl.load(mWe_ptr + off, mask=m2, other=0.0),
                        tl.load(sWe_ptr + off, mask=m2, other=0.0), acc, step_size, bc2_sqrt, w1, b2, w2, eps)
        tl.store(We_ptr + off, p, mask=m2)
        tl.store(mWe_ptr + off, m, mask=m2)
        tl.store(sWe_ptr + off, s, mask=m2)
        wd = tl.load(Wd_ptr + off, mask=m2, other=0.0)
        ww += tl.sum(wd * wd, 1)
        if PROJECT:
            gd = _dec_grad_chunk(entry_ptr, start, count, n_max, v_ptr, g_ptr, ds, d_ok, K, K_main, B, stride_gb,
                                 BLOCK_L, BLOCK_D)
            dot_gw += tl.sum(gd * wd, 1)
    scale = tl.zeros((BLOCK_L,), dtype=tl.float32)
    if HAS_DNORM:  # d||w|| / dw = w / ||w||, zero at w = 0 (torch's norm backward)
        dn = tl.load(dnorm_ptr + lats, mask=lat_ok, other=0.0).to(tl.float32)
        norm = tl.sqrt(ww)
        scale = tl.where(norm == 0.0, 0.0, dn / norm)
    coef = tl.zeros((BLOCK_L,), dtype=tl.float32)
    if PROJECT:  # SparseAutoencoder.remove_parallel_grad_, on the weights before the update
        coef = (dot_gw + scale * ww) / tl.maximum(ww, 1e-12)
    # pass 2: W_dec's gradient and Adam
    new_ww = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < d
        m2 = lat_ok[:, None] & d_ok[None, :]
        off = rows64[:, None] + ds[None, :]
        wd = tl.load(Wd_ptr + off, mask=m2, other=0.0)
        gd = _dec_grad_chunk(entry_ptr, start, count, n_max, v_ptr, g_ptr, ds, d_ok, K, K_main, B, stride_gb,
                             BLOCK_L, BLOCK_D)
        gd = gd + (scale - coef)[:, None] * wd
        p, m, s = _adam(wd, tl.load(mWd_ptr + off, mask=m2, other=0.0), tl.load(sWd_ptr + off, mask=m2, other=0.0),
                        gd, step_size, bc2_sqrt, w1, b2, w2, eps)
        tl.store(Wd_ptr + off, p, mask=m2)
        tl.store(mWd_ptr + off, m, mask=m2)
        tl.store(sWd_ptr + off, s, mask=m2)
        new_ww += tl.sum(p * p, 1)
    if RENORM:  # SparseAutoencoder.normalize_decoder_
        # Pass 2's stores must be visible before they are read back (they are, thread by thread, with the
        # same layout; the barrier makes it so whatever layout the compiler picks).
        tl.debug_barrier()
        inv = 1.0 / tl.maximum(tl.sqrt(new_ww), 1e-12)
        for d0 in range(0, d, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            m2 = lat_ok[:, None] & (ds < d)[None, :]
            off = rows64[:, None] + ds[None, :]
            tl.store(Wd_ptr + off, tl.load(Wd_ptr + off, mask=m2, other=0.0) * inv[:, None], mask=m2)
    p, m, s = _adam(tl.load(be_ptr + lats, mask=lat_ok, other=0.0), tl.load(mbe_ptr + lats, mask=lat_ok, other=0.0),
                    tl.load(sbe_ptr + lats, mask=lat_ok, other=0.0), gb, step_size, bc2_sqrt, w1, b2, w2, eps)
    tl.store(be_ptr + lats, p, mask=lat_ok)
    tl.store(mbe_ptr + lats, m, mask=lat_ok)
    tl.store(sbe_ptr + lats, s, mask=lat_ok)


# ============================================================================ configs
@dataclass(frozen=True)
class FusedStepConfig:
    BLOCK_L: int
    BLOCK_D: int
    num_warps: int


def fused_step_config(n: int, d: int) -> FusedStepConfig:
    """8 latents x up to 128 columns per program, as latent_backward's tiles but half as wide: each
    chunk holds a gradient, a weight and two moment tiles at once. Not yet timed on a GPU."""
    return FusedStepConfig(8, min(128, max(16, triton.next_power_of_2(d))), 4)


# ============================================================================ launchers
def fused_adam_step(idx, pre, k_main, dp, xc, v, g, d_norm, params, moments, adam, project, renorm,
                    config: FusedStepConfig | None = None) -> None:
    """In place on ``params`` (W_enc, b_enc, W_dec) and ``moments`` (m, s per parameter), fp32, contiguous;
    the arguments as the backends' ``fused_adam_step`` (sae_fast/backends/base.py). idx must lie in [0, n)."""
    W_enc, b_enc, W_dec = params
    B, K = idx.shape
    n, d = W_enc.shape
    for t in (*params, *moments):
        assert t.dtype == torch.float32 and t.is_contiguous()
    dp, v, xc, g = dp.contiguous(), v.contiguous(), xc.contiguous(), g.contiguous()
    live = ~torch.isneginf(pre) & ((dp != 0) | (v != 0))  # padding and all-zero entries add nothing
    entries, offsets = sort_by_latent(idx, n, live)
    step_size, bc2_sqrt, beta1, beta2, eps = adam
    cfg = config or fused_step_config(n, d)
    _fused_adam_kernel[(triton.cdiv(n, cfg.BLOCK_L),)](
        entries, offsets, dp, xc, v, g, d_norm if d_norm is not None else b_enc, W_enc, b_enc, W_dec, *moments,
        n, d, K, k_main, B, xc.stride(0), g.stride(0),
        float(step_size), float(bc2_sqrt), float(1 - beta1), float(beta2), float(1 - beta2), float(eps),
        HAS_DNORM=d_norm is not None, PROJECT=bool(project), RENORM=bool(renorm),
        BLOCK_L=cfg.BLOCK_L, BLOCK_D=cfg.BLOCK_D, num_warps=cfg.num_warps)
