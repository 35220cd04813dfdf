"""Matryoshka kernels (sae_fast/reference.py: matryoshka_decode; backends/base.py: the matryoshka_* primitives).

``widths`` (G,) int64 on the device: cumulative prefix widths m_1 < ... < m_G = n; latent i is in group
g(i) = #{p < G - 1: m_p <= i}. S (G, B, d): S_g = sum_{p >= g} dL/dx_hat_p.

    matryoshka_decode      out[p, b] = bias + sum_{idx[b,j] < m_p} v[b, j] W[idx[b, j]]      one pass
    matryoshka_gather_dot  out[b, j] = <S[g(idx[b,j]), b], W[idx[b, j]]>
    matryoshka_latent_backward   latent_backward.py's pass, decoder rows from S[g(i)]

The decode sorts each row's active entries by latent (torch, (B, K)) and counts the entries below every
width; a program then runs over its row's entries once in latent order, storing the running sum at every
group boundary. The backward is one latent-sorted pass for every prefix's loss.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decoder import decode_config, gather_dot_config
from .latent_backward import latent_backward_config, sort_by_latent


# ============================================================================ kernels
@triton.jit
def _group_of(lat, widths_ptr, G):
    """g(lat) for a block of latents: how many of the first G - 1 widths are <= lat."""
    grp = lat * 0
    for p in range(0, G - 1):
        grp += (lat >= tl.load(widths_ptr + p)).to(grp.dtype)
    return grp


@triton.jit
def _matryoshka_decode_kernel(v_ptr, idx_ptr, ends_ptr, w_ptr, bias_ptr, out_ptr, K, d, G,
                              stride_wn, stride_op, stride_ob,
                              HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (row b, d block). v, idx (B, K) contiguous, the row's active entries first in latent order;
    ends (B, G): entries of the row below each width. One running sum, stored once per prefix."""
    b = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < d
    js = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)
    begin = tl.load(ends_ptr + b * G) * 0
    for p in range(0, G):
        end = tl.load(ends_ptr + b * G + p)
        for j0 in range(begin, end, BLOCK_K):
            j_ok = (j0 + js) < end
            lat = tl.load(idx_ptr + b * K + j0 + js, mask=j_ok, other=0).to(tl.int64)
            v = tl.load(v_ptr + b * K + j0 + js, mask=j_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + lat[:, None] * stride_wn + ds[None, :],
                        mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(v[:, None] * w, 0)
        tl.store(out_ptr + p * stride_op + b * stride_ob + ds, acc.to(out_ptr.dtype.element_ty), mask=d_ok)
        begin = end


@triton.jit
def _matryoshka_gather_dot_kernel(s_ptr, idx_ptr, w_ptr, widths_ptr, out_ptr, K, d, G,
                                  stride_sg, stride_sb, stride_wn,
                                  BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (row b, entry block): out[b, js] = <S[g(idx), b], W[idx]>; S and W contiguous in d."""
    b = tl.program_id(0).to(tl.int64)
    js = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    j_ok = js < K
    lat = tl.load(idx_ptr + b * K + js, mask=j_ok, other=0).to(tl.int64)
    srow = _group_of(lat, widths_ptr, G) * stride_sg + b * stride_sb
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        ds = d0 + dd
        m2 = j_ok[:, None] & (ds < d)[None, :]
        s = tl.load(s_ptr + srow[:, None] + ds[None, :], mask=m2, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + lat[:, None] * stride_wn + ds[None, :], mask=m2, other=0.0).to(tl.float32)
        acc += tl.sum(w * s, 1)
    tl.store(out_ptr + b * K + js, acc.to(out_ptr.dtype.element_ty), mask=j_ok)


@triton.jit
def _matryoshka_backward_kernel(entry_ptr, offset_ptr, widths_ptr, dp_ptr, xc_ptr, v_ptr, s_ptr,
                                dW_enc_ptr, db_enc_ptr, dW_dec_ptr, n, d, K, G,
                                stride_xb, stride_sg, stride_sb,
                                HAS_ENC: tl.constexpr, HAS_DEC: tl.constexpr,
                                BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """latent_backward.py's (latent block, d block) tile, dp and v (B, K) contiguous, the decoder rows
    of each latent from its group's block of S."""
    lats = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    lat_ok = lats < n
    first_d = (lats * 0 + tl.program_id(1)) == 0
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < d
    start = tl.load(offset_ptr + lats, mask=lat_ok, other=0)
    count = tl.load(offset_ptr + lats + 1, mask=lat_ok, other=0) - start
    sbase = _group_of(lats.to(tl.int64), widths_ptr, G) * stride_sg
    acc_enc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    acc_dec = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for j in range(0, tl.max(count, 0)):
        e_ok = j < count
        entry = tl.load(entry_ptr + start + j, mask=e_ok, other=0)
        row = entry // K
        m2 = e_ok[:, None] & d_ok[None, :]
        if HAS_ENC:
            c = tl.load(dp_ptr + entry, mask=e_ok, other=0.0).to(tl.float32)
            xr = tl.load(xc_ptr + row[:, None] * stride_xb + ds[None, :], mask=m2, other=0.0)
            acc_enc += c[:, None] * xr.to(tl.float32)
            acc_b += c
        if HAS_DEC:
            c = tl.load(v_ptr + entry, mask=e_ok, other=0.0).to(tl.float32)
            sr = tl.load(s_ptr + (sbase + row * stride_sb)[:, None] + ds[None, :], mask=m2, other=0.0)
            acc_dec += c[:, None] * sr.to(tl.float32)
    out_ok = lat_ok[:, None] & d_ok[None, :]
    if HAS_ENC:
        tl.store(dW_enc_ptr + lats.to(tl.int64)[:, None] * d + ds[None, :],
                 acc_enc.to(dW_enc_ptr.dtype.element_ty), mask=out_ok)
        tl.store(db_enc_ptr + lats, acc_b.to(db_enc_ptr.dtype.element_ty), mask=lat_ok & first_d)
    if HAS_DEC:
        tl.store(dW_dec_ptr + lats.to(tl.int64)[:, None] * d + ds[None, :],
                 acc_dec.to(dW_dec_ptr.dtype.element_ty), mask=out_ok)


# ============================================================================ launchers
def _widths(widths, device) -> torch.Tensor:
    return torch.as_tensor(list(widths), dtype=torch.int64, device=device)


def matryoshka_decode(values: torch.Tensor, idx: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None,
                      widths) -> torch.Tensor:
    """(G, B, d) in W's dtype. idx must lie in [0, n) (the triton backend checks it before this launch)."""
    B, K = idx.shape
    n, d = W.shape
    G = len(widths)
    out = torch.empty(G, B, d, dtype=W.dtype, device=W.device)
    if B == 0:
        return out
    W = W.contiguous()
    # Each row's active entries in latent order (inactive ones sorted past every latent), then the count
    # of entries below each width: the prefix boundaries in the row.
    key = torch.where(values != 0, idx.long(), n)
    key, order = torch.sort(key, dim=1, stable=True)
    v = values.gather(1, order).contiguous()
    ends = torch.searchsorted(key, _widths(widths, idx.device).expand(B, G).contiguous()).contiguous()
    cfg = decode_config(K, d)
    grid = (B, triton.cdiv(d, cfg.BLOCK_D))
    _matryoshka_decode_kernel[grid](
        v, key.to(torch.int32).clamp_max(n - 1).contiguous(), ends, W, bias if bias is not None else W, out, K, d, G,
        W.stride(0), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, BLOCK_K=cfg.BLOCK_K, BLOCK_D=cfg.BLOCK_D, num_warps=cfg.num_warps,
        enable_fp_fusion=True)
    return out


def matryoshka_gather_dot(S: torch.Tensor, idx: torch.Tensor, W: torch.Tensor, widths) -> torch.Tensor:
    """(B, K) in W's dtype: <S[g(idx[b, j]), b], W[idx[b, j]]>."""
    B, K = idx.shape
    d = W.shape[1]
    assert S.shape == (len(widths), B, d)
    out = torch.empty(B, K, dtype=W.dtype, device=W.device)
    if B == 0 or K == 0:
        return out
    S, idx, W = S.contiguous(), idx.contiguous(), W.contiguous()
    cfg = gather_dot_config(K, d)
    grid = (B, triton.cdiv(K, cfg.BLOCK_K))
    _matryoshka_gather_dot_kernel[grid](
        S, idx, W, _widths(widths, idx.device), out, K, d, len(widths), S.stride(0), S.stride(1), W.stride(0),
        BLOCK_K=cfg.BLOCK_K, BLOCK_D=cfg.BLOCK_D, num_warps=cfg.num_warps, enable_fp_fusion=True)
    return out


def matryoshka_latent_backward(idx: torch.Tensor, n: int, dp, xc, v, S, widths, grad_dtype=None):
    """(dW_enc, db_enc, dW_dec) as latent_backward.latent_backward, dW_dec's rows from S[g(i)] (S (G, B, d))."""
    B, K = idx.shape
    has_enc, has_dec = dp is not None, v is not None
    assert has_enc == (xc is not None) and has_dec == (S is not None) and (has_enc or has_dec)
    ref = xc if has_enc else S
    d = ref.shape[-1]
    dev = idx.device
    dp = dp.contiguous() if has_enc else None
    v = v.contiguous() if has_dec else None
    xc = xc.contiguous() if has_enc else None
    S = S.contiguous() if has_dec else None
    dW_enc = torch.empty(n, d, dtype=grad_dtype or xc.dtype, device=dev) if has_enc else None
    db_enc = torch.empty(n, dtype=grad_dtype or xc.dtype, device=dev) if has_enc else None
    dW_dec = torch.empty(n, d, dtype=grad_dtype or S.dtype, device=dev) if has_dec else None
    live = (dp != 0) if has_enc else None
    if has_dec:
        live = (v != 0) if live is None else live | (v != 0)
    entries, offsets = sort_by_latent(idx, n, live)
    cfg = latent_backward_config(n, d)
    grid = (triton.cdiv(n, cfg.BLOCK_L), triton.cdiv(d, cfg.BLOCK_D))
    dummy = ref
    _matryoshka_backward_kernel[grid](
        entries, offsets, _widths(widths, dev), dp if has_enc else dummy, xc if has_enc else dummy,
        v if has_dec else dummy, S if has_dec else dummy, dW_enc if has_enc else dummy,
        db_enc if has_enc else dummy, dW_dec if has_dec else dummy, n, d, K, len(widths),
        xc.stride(0) if has_enc else 0, S.stride(0) if has_dec else 0, S.stride(1) if has_dec else 0,
        HAS_ENC=has_enc, HAS_DEC=has_dec, BLOCK_L=cfg.BLOCK_L, BLOCK_D=cfg.BLOCK_D,
        num_warps=cfg.num_warps, enable_fp_fusion=True)
    return dW_enc, db_enc, dW_dec
