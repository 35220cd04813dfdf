"""What the three encoders (topk_encoder, threshold_encoder, scan_encoder) share: the score tile
``p = x @ W_enc.T + c`` their partial kernels select from, the folded bias ``c``, and the tile configs.

``c = b_enc - W_enc @ b_dec`` (one GEMV, fp32) folds the decoder bias into the encoder bias: the tiles
then multiply x and W_enc as stored (bf16 on tensor cores) and p keeps fp32 accuracy, where rounding
``x - b_dec`` to bf16 first would not.

The partial kernels run on a grid (row blocks, n splits): each program walks its split of the latents in
BLOCK_N tiles, multiplying each tile here or (FROM_SCORES, the scan encoder) reading it from a buffer of
cuBLAS products, so the (B, n) pre-activations are never written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


# ============================================================================ jit helpers
@triton.jit
def score_tile(x_ptr, w_ptr, c_ptr, rows, cols, row_ok, col_ok, d, stride_xb, stride_xd, stride_wn, stride_wd,
               BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 tile of x @ W.T + c."""
    ks = tl.arange(0, BLOCK_K)
    x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_xb
    w_row = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < d
        a = tl.load(x_row + kk[None, :] * stride_xd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_row + kk[None, :] * stride_wd, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        b = b.to(a.dtype)  # fp32 master weights beside 16-bit x: rounded as an autocast copy would be
        if DOT_FP32:  # Triton's interpreter multiplies bf16 bit patterns as integers; it gets fp32 operands
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    c = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
    return acc + c[None, :]


@triton.jit
def program_span(B, col_lo, col_hi, n_per_split, BLOCK_M: tl.constexpr):
    """A partial kernel's program (row block, split): its rows, which of them exist, its latents [lo, hi)
    within [col_lo, col_hi), and each row's (row, split) slot of the (B, S, ...) partials."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    lo = col_lo + split * n_per_split
    hi = tl.minimum(lo + n_per_split, col_hi)
    return rows, rows < B, lo, hi, rows.to(tl.int64) * tl.num_programs(1) + split


@triton.jit
def tile_scores(x_ptr, w_ptr, c_ptr, s_ptr, rows, cols, row_ok, col_ok, B, col_lo, d,
                stride_xb, stride_xd, stride_wn, stride_wd, stride_sb,
                BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, FROM_SCORES: tl.constexpr):
    """The partial kernels' fp32 scores x @ W.T + c: multiplied here, or (FROM_SCORES) read from a (B, chunk)
    buffer of cuBLAS products whose column 0 is latent col_lo."""
    if FROM_SCORES:  # rows past B read row B - 1 (never stored): a column-only mask
        s_row = s_ptr + tl.minimum(rows, B - 1).to(tl.int64)[:, None] * stride_sb
        s = tl.load(s_row + (cols - col_lo)[None, :], mask=col_ok[None, :], other=0.0)
        s += tl.load(c_ptr + cols, mask=col_ok, other=0.0)[None, :]
    else:
        s = score_tile(x_ptr, w_ptr, c_ptr, rows, cols, row_ok, col_ok, d, stride_xb, stride_xd,
                       stride_wn, stride_wd, BLOCK_K, DOT_FP32, PRECISION)
    return s


# ============================================================================ kernels
@triton.jit
def _fold_bias_kernel(w_ptr, b_enc_ptr, b_dec_ptr, c_ptr, n, d, stride_wn, stride_wd,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c = b_enc - W_enc @ b_dec in fp32."""
    lat = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    lat_ok = lat < n
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        kk = k0 + ks
        w = tl.load(w_ptr + lat.to(tl.int64)[:, None] * stride_wn + kk[None, :] * stride_wd,
                    mask=lat_ok[:, None] & (kk < d)[None, :], other=0.0).to(tl.float32)
        bd = tl.load(b_dec_ptr + kk, mask=kk < d, other=0.0).to(tl.float32)
        acc += tl.sum(w * bd[None, :], 1)
    be = tl.load(b_enc_ptr + lat, mask=lat_ok, other=0.0).to(tl.float32)
    tl.store(c_ptr + lat, be - acc, mask=lat_ok)


# ============================================================================ configs
@dataclass(frozen=True)
class Device:
    """What the configs depend on: compute capability (major*10+minor; 0 = Triton's CPU interpreter)
    and the number of SMs."""
    cap: int
    sms: int

    @staticmethod
    def of(t: torch.Tensor) -> Device:
        if t.device.type != "cuda":
            return Device(0, 4)
        props = torch.cuda.get_device_properties(t.device)
        return Device(props.major * 10 + props.minor, props.multi_processor_count)


@dataclass(frozen=True)
class EncoderConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int
    splits: int
    SMALL: int  # < KP: a tile with more winners than this in some row is merged with tl.topk


def splits_for(row_blocks: int, tiles: int, slots: int, min_tiles: int) -> int:
    """n-splits that minimise waves x program length, a program costing its tiles plus about two tiles
    of fixed work (filling the first list, writing partials, its share of the merge)."""
    best, best_cost = 1, math.inf
    for s in range(1, max(1, tiles // min_tiles) + 1):
        cost = math.ceil(row_blocks * s / slots) * (math.ceil(tiles / s) + 2)
        if cost < best_cost:
            best, best_cost = s, cost
    return best


def encoder_config(B: int, d: int, n: int, kp: int, dtype: torch.dtype, dev: Device, aux: bool = False,
                   threshold: bool = False) -> EncoderConfig:
    """The tile config of the fused encoders (the GEMM in the tiles), chosen with the static checks
    (benchmarks/triton_resources.py): the largest tiles that compile without spills for sm_80 and sm_90.
    GPU: 64-row tiles (Hopper's warpgroup MMA needs them), 8 warps, 3 stages; 128 latents x 64 of d per
    step for 16-bit inputs (256 latents for k <= 32 without AuxK), 64 x 16 for fp32 (tf32x3 triples the
    operand registers); 64 latents for the threshold kernel (its scan needs registers); winners merged one
    at a time (tl.topk's sorting network costs about 80 more registers per thread). Splits fill the SMs.
    Interpreter: small tiles (it runs numpy)."""
    if dev.cap == 0:
        bn = max(32, kp)
        bk = min(32, max(16, triton.next_power_of_2(d)))
        return EncoderConfig(16, bn, bk, 4, 1, splits_for(triton.cdiv(B, 16), triton.cdiv(n, bn), dev.sms, 2), kp)
    wide = dtype.itemsize <= 2 and not threshold
    bn = max(128 if wide else 64, kp)
    if wide and kp <= 32 and not aux:
        bn = 256  # measured on an H100: W2 3.6 vs 4.5 ms, W1 1.35 vs 1.42 (benchmarks/results/*-encoder-ab.txt)
    bk = min(64 if dtype.itemsize <= 2 else 16, max(16, triton.next_power_of_2(d)))
    return EncoderConfig(64, bn, bk, 8, 3, splits_for(triton.cdiv(B, 64), triton.cdiv(n, bn), dev.sms, 8), kp)


def precision(dtype: torch.dtype) -> str:
    """fp32 inputs: three tf32 products recover fp32 accuracy and keep the tensor cores."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def multiplies_in_fp32(x: torch.Tensor, dev: Device) -> bool:
    """Whether the tiles multiply in fp32: 16-bit x under the interpreter (see score_tile)."""
    return dev.cap == 0 and x.dtype != torch.float32


# ============================================================================ launchers
def fold_bias(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """c = b_enc - W_enc @ b_dec, fp32 (n,)."""
    n, d = W_enc.shape
    assert b_enc.shape == (n,) and b_dec.shape == (d,)
    c = torch.empty(n, dtype=torch.float32, device=W_enc.device)
    block_n = 32 if W_enc.device.type == "cpu" else 64
    _fold_bias_kernel[(triton.cdiv(n, block_n),)](
        W_enc, b_enc.contiguous(), b_dec.contiguous(), c, n, d, W_enc.stride(0), W_enc.stride(1),
        BLOCK_N=block_n, BLOCK_K=min(128, triton.next_power_of_2(max(d, 1))),  # d = 0: a 1-wide, empty loop
        num_warps=4, enable_fp_fusion=True)
    return c


def check_weights(x: torch.Tensor, W_enc: torch.Tensor) -> None:
    assert W_enc.dtype == x.dtype or (W_enc.dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16)), \
        f"W_enc {W_enc.dtype} beside x {x.dtype}: same dtype, or fp32 master weights beside 16-bit x"


def split_grid(x: torch.Tensor, W_enc: torch.Tensor, cfg: EncoderConfig):
    """A fused partial kernel's grid over all n latents: (grid, latents per split, number of splits)."""
    B, d = x.shape
    n = W_enc.shape[0]
    tiles = triton.cdiv(n, cfg.BLOCK_N)
    per_split = triton.cdiv(tiles, cfg.splits) * cfg.BLOCK_N
    splits = triton.cdiv(n, per_split)
    return (triton.cdiv(B, cfg.BLOCK_M), splits), per_split, splits
