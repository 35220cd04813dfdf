"""GEMM + scan encoders for 16-bit x: cuBLAS writes the fp32 products x @ W_enc.T of a chunk of latents
into one reused (B, chunk) buffer, and the fused encoders' partial kernels read it (FROM_SCORES) instead
of multiplying. Memory: the buffer, whatever n is.

Top-k (``topk_scan``): the running lists persist in the (B, S, KP) partials from chunk to chunk (RESUME);
topk_encoder's merge kernel finishes. Threshold (``threshold_scan``): one list per row, appended chunk by
chunk, so it grows in ascending latent order; threshold_encoder reruns an overflow and compacts.

Which encoder the backend runs is ``EncoderOptions.scan_chunk`` (sae_fast/backends/triton.py).
"""
from __future__ import annotations

import torch
import triton

from . import threshold_encoder, topk_encoder
from .encoder_common import Device, EncoderConfig


# ============================================================================ configs
def scan_config(B: int, chunk: int, kp: int, dev: Device, aux: bool = False) -> EncoderConfig:
    """topk_scan's kernel reads fp32 scores instead of multiplying: 32-row x 128-latent tiles on 8 warps;
    beside an AuxK list 8 x 128 on 4 warps, the one shape tried without local loads/stores for k = 32 and 64,
    sm_80 and sm_90, Triton 3.6 and 3.9 (LLVM lowers the merge's i1-vector counts through local memory in
    shape-dependent ways). Splits give about two programs per SM. Interpreter: small tiles."""
    if dev.cap == 0:
        return EncoderConfig(16, max(32, kp), 16, 4, 1, 2, kp)
    bm, warps = (8, 4) if aux else (32, 8)
    bn = max(128, kp)
    splits = max(1, min(triton.cdiv(chunk, 2 * bn), triton.cdiv(2 * dev.sms, triton.cdiv(B, bm))))
    return EncoderConfig(bm, bn, 16, warps, 1, splits, kp)


def scan_threshold_config(B: int, chunk: int, dev: Device) -> EncoderConfig:
    """threshold_partial's scan of fp32 scores: one split, so each row's list grows in ascending latent
    order chunk after chunk (splits would interleave chunks); 16 x 128 tiles on 4 warps (B / 16 programs)."""
    if dev.cap == 0:
        return EncoderConfig(16, 32, 16, 4, 1, 1, 1)
    return EncoderConfig(16, 128, 16, 4, 1, 1, 1)


# ============================================================================ launchers
def _mm_fp32(x: torch.Tensor, W: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = x @ W.T in fp32: cuBLAS with fp32 output on CUDA; elsewhere (the interpreter) the same 16-bit
    values multiplied in fp32."""
    if x.device.type == "cuda":
        return torch.mm(x, W.T, out_dtype=torch.float32, out=out)
    return torch.mm(x.float(), W.float().T, out=out)


def mm_fp32(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """x @ W.T in fp32, as the encoder tiles compute it (16-bit W: fp32 master weights rounded to x's dtype
    first); a new (B, rows) tensor (the triton backend's AuxK dead-row block)."""
    W = W if W.dtype == x.dtype else W.to(x.dtype)
    if x.dtype == torch.float32:
        return torch.mm(x, W.T)
    return _mm_fp32(x, W, torch.empty(x.shape[0], W.shape[0], dtype=torch.float32, device=x.device))


def _score_chunks(x: torch.Tensor, W_enc: torch.Tensor, chunk: int):
    """(c0, c1, x @ W_enc[c0:c1].T in fp32) for consecutive chunks of latents, all in one reused buffer (each
    is consumed before the next is written: same stream). fp32 master weights are rounded per chunk."""
    B, n = x.shape[0], W_enc.shape[0]
    buf = torch.empty(B * chunk, dtype=torch.float32, device=x.device)
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        W = W_enc[c0:c1] if W_enc.dtype == x.dtype else W_enc[c0:c1].to(x.dtype)
        yield c0, c1, _mm_fp32(x, W, buf[: B * (c1 - c0)].view(B, c1 - c0))


def topk_scan(x: torch.Tensor, W_enc: torch.Tensor, c: torch.Tensor, k: int, dead_mask: torch.Tensor | None = None,
              k_aux: int = 0, out_dtype: torch.dtype | None = None, chunk: int | None = None,
              config: EncoderConfig | None = None):
    """topk_encoder.topk_select for 16-bit x as GEMM + scan: cuBLAS writes ``chunk`` latents' fp32 scores at
    a time (default all n at once) into one reused (B, chunk) buffer, and _topk_partial_kernel merges them
    into running lists kept in the (B, S, KP) partials across chunks."""
    assert x.dtype.itemsize == 2, "GEMM + scan multiplies 16-bit x on cuBLAS"
    topk_encoder.check_args(x, W_enc, c, k, dead_mask, k_aux)
    B = x.shape[0]
    n = W_enc.shape[0]
    chunk = max(1, min(n, chunk or n))
    cfg = config or scan_config(B, chunk, max(topk_encoder.list_widths(k, k_aux)), Device.of(x), aux=bool(k_aux))
    S = cfg.splits
    lists = topk_encoder.new_partials(x, c, S, k, dead_mask, k_aux)
    for c0, c1, s in _score_chunks(x, W_enc, chunk):
        per_split = triton.cdiv(triton.cdiv(c1 - c0, cfg.BLOCK_N), S) * cfg.BLOCK_N
        topk_encoder.launch_partial((triton.cdiv(B, cfg.BLOCK_M), S), x, W_enc, c, lists, cfg, per_split,
                                    col_lo=c0, col_hi=c1, scores=s, resume=c0 > 0)
    return topk_encoder.merge_partials(lists, out_dtype or x.dtype)


def threshold_scan_partial(x: torch.Tensor, W_enc: torch.Tensor, c: torch.Tensor, cutoff: torch.Tensor,
                           capacity: int, chunk: int | None = None, config: EncoderConfig | None = None):
    """threshold_encoder.threshold_partial as GEMM + scan, ``chunk`` latents at a time (default all n): one
    list per row (S = 1), appended chunk by chunk in ascending latent order."""
    assert x.dtype.itemsize == 2, "GEMM + scan multiplies 16-bit x on cuBLAS"
    threshold_encoder.check_args(x, W_enc, c, cutoff, capacity)
    B = x.shape[0]
    n = W_enc.shape[0]
    chunk = max(1, min(n, chunk or n))
    cfg = config or scan_threshold_config(B, chunk, Device.of(x))
    assert cfg.splits == 1, "GEMM + scan keeps one list per row (splits would interleave the chunks)"
    grid = (triton.cdiv(B, cfg.BLOCK_M), 1)
    lists = threshold_encoder.new_lists(x, 1, capacity)
    cutoff = cutoff.contiguous()
    for c0, c1, s in _score_chunks(x, W_enc, chunk):
        per_split = triton.cdiv(c1 - c0, cfg.BLOCK_N) * cfg.BLOCK_N
        threshold_encoder.launch_partial(grid, x, W_enc, c, cutoff, lists, cfg, per_split, col_lo=c0, col_hi=c1,
                                         scores=s, resume=c0 > 0)
    return lists


def threshold_scan(x: torch.Tensor, W_enc: torch.Tensor, c: torch.Tensor, cutoff: torch.Tensor, capacity: int = 64,
                   chunk: int | None = None, config: EncoderConfig | None = None, width: int | None = None):
    """threshold_encoder.threshold_select as GEMM + scan: (pre (B, K), idx (B, K), per-row capacity needed);
    ``width`` as there."""
    partial = lambda cap: threshold_scan_partial(x, W_enc, c, cutoff, cap, chunk, config)  # noqa: E731
    if width is None:
        return threshold_encoder.select_lists(partial, capacity)
    return threshold_encoder.select_fixed(partial, capacity, width)
