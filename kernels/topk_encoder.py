"""Fused top-k encoder: the GEMM ``p = x @ W_enc.T + c`` in tiles (encoder_common) with a running top-k in
the epilogue, so the (B, n) pre-activations are never written.

Grid (row blocks, n splits). Each program walks its split in BLOCK_N tiles and keeps a running top-k per
row as sortable int64 keys (score bits in the high word, ~latent in the low word, so one integer order is
"score descending, then lower latent first" - the tie rule of every backend). A tile only reaches the
merge through a cheap test against each row's current k-th best: a few winners are inserted one at a
time; many (the first tiles) go through ``tl.topk``. The (B, S, KP) partial keys are merged to k per row
by a second kernel. An optional second running list takes only dead latents (AuxK).

The scan encoder (scan_encoder.py) runs the same two kernels over chunks of cuBLAS scores.
"""
from __future__ import annotations

from dataclasses import dataclass

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

# Key of (score = -inf, latent = 2**31 - 1): below every finite score's key. Pads lists and masked tiles.
_PAD_KEY = tl.constexpr(-9187343241983295488)
_NEG_INF = tl.constexpr(float("-inf"))
_INT_MAX = tl.constexpr(2147483647)


# ============================================================================ jit helpers
@triton.jit
def _key(score, latent):
    """Sortable int64 key: larger score first, then lower latent first. NaN (whatever its sign bit: x86
    makes negative ones) becomes the positive quiet NaN, whose key is above +inf's: NaN ranks first, as
    in reference.py (torch.topk), and decodes back to NaN."""
    bits = (score + 0.0).to(tl.int32, bitcast=True)  # + 0.0 turns -0.0 into +0.0
    bits = tl.where(score != score, 0x7FC00000, bits)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (bits.to(tl.int64) << 32) | (latent.to(tl.int64) ^ 0xFFFFFFFF)


@triton.jit
def _key_score(key):
    bits = (key >> 32).to(tl.int32)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _key_latent(key):
    return ((key & 0xFFFFFFFF) ^ 0xFFFFFFFF).to(tl.int32)


@triton.jit
def _merge_tile(run, s, cols, ok, KP: tl.constexpr, SMALL: tl.constexpr, PACKED: tl.constexpr):
    """Merge the tile's scores ``s`` (entries where ``ok``) into the running keys ``run`` (BLOCK_M, KP).
    With SMALL < KP, a tile where some row has more than SMALL winners goes through tl.topk."""
    thr = tl.min(run, 1)
    thr_s = _key_score(thr)
    thr_l = _key_latent(thr)
    # NaN compares false with everything, so it is tested apart: it beats any number, and ties with NaN.
    s_nan, thr_nan = s != s, (thr_s != thr_s)[:, None]
    ties = (s == thr_s[:, None]) | (s_nan & thr_nan)
    beats = (s > thr_s[:, None]) | (s_nan & ~thr_nan) | (ties & (cols[None, :] < thr_l[:, None]))
    cand = ok & beats
    most = tl.max(tl.sum(cand.to(tl.int32), 1), 0)
    if SMALL < KP:
        if most > SMALL:
            # Non-candidates get distinct keys below the list's padding, so the merged list stays unique.
            below = tl.full(cols.shape, _PAD_KEY, tl.int64) - 1 - KP - cols.to(tl.int64)
            keys = tl.where(cand, _key(s, cols[None, :]), below[None, :])
            best = tl.topk(keys, KP)
            run = tl.topk(tl.reshape(tl.join(run, best), (run.shape[0], 2 * KP)), KP)
            most = 0
    # The few winners, best first, each replacing its row's current minimum; after KP of them the rest
    # of the tile cannot beat the list. Keys are unique (the list's padding too, see _pad_list), so one
    # integer max finds a row's next winner and one comparison finds the slot it replaces.
    if PACKED:
        keys = tl.where(cand, _key(s, cols[None, :]), _PAD_KEY)
        for _ in range(tl.minimum(most, KP)):
            best = tl.max(keys, 1)
            low = tl.min(run, 1)
            put = (best != _PAD_KEY) & (best > low)
            run = tl.where(put[:, None] & (run == low[:, None]), best[:, None], run)
            keys = tl.where(keys == best[:, None], _PAD_KEY, keys)
    else:  # the tile's keys are not kept live: fewer registers (AuxK's second list beside the first)
        for _ in range(tl.minimum(most, KP)):
            # A float max does not rank NaN: a row's NaN candidates (lowest latent first) go before its numbers.
            nan_c = cand & s_nan
            has_nan = tl.max(nan_c.to(tl.int32), 1) > 0
            top_s = tl.max(tl.where(cand & ~s_nan, s, _NEG_INF), 1)
            pick = tl.where(has_nan[:, None], nan_c, cand & (s == top_s[:, None]))
            top_l = tl.min(tl.where(pick, cols[None, :], _INT_MAX), 1)
            top_s = tl.where(has_nan, float("nan"), top_s)
            new = _key(top_s, top_l)
            low = tl.min(run, 1)
            put = (has_nan | (top_s > _NEG_INF)) & (new > low)
            run = tl.where(put[:, None] & (run == low[:, None]), new[:, None], run)
            cand = cand & (cols[None, :] != top_l[:, None])
    return run


@triton.jit
def _pad_list(BLOCK_M: tl.constexpr, KP: tl.constexpr):
    """An empty running list: KP distinct keys below every real key (score -inf, out-of-range latents)."""
    pads = tl.full((KP,), _PAD_KEY, tl.int64) - 1 - tl.arange(0, KP).to(tl.int64)
    return tl.zeros((BLOCK_M, KP), dtype=tl.int64) + pads[None, :]


# ============================================================================ kernels
@triton.jit
def _topk_partial_kernel(x_ptr, w_ptr, c_ptr, dead_ptr, part_ptr, aux_part_ptr, s_ptr,
                         B, col_lo, col_hi, d, n_per_split,
                         stride_xb, stride_xd, stride_wn, stride_wd, stride_sb,
                         KP: tl.constexpr, KP_AUX: tl.constexpr, HAS_AUX: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SMALL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                         FROM_SCORES: tl.constexpr, RESUME: tl.constexpr):
    """Per (row block, split) of the latents [col_lo, col_hi): the KP best keys of each row within the
    split -> part (B, S, KP). FROM_SCORES: the tiles are read from ``s`` (B, col_hi - col_lo) fp32
    products x @ W.T (the GEMM ran elsewhere) instead of multiplied here. RESUME: the running lists
    start from ``part`` (an earlier chunk of latents) instead of empty."""
    rows, row_ok, lo, hi, slot = program_span(B, col_lo, col_hi, n_per_split, BLOCK_M)
    base = slot[:, None]
    if RESUME:
        run = tl.load(part_ptr + base * KP + tl.arange(0, KP)[None, :], mask=row_ok[:, None], other=_PAD_KEY)
        if HAS_AUX:
            aux = tl.load(aux_part_ptr + base * KP_AUX + tl.arange(0, KP_AUX)[None, :], mask=row_ok[:, None],
                          other=_PAD_KEY)
        else:
            aux = _pad_list(BLOCK_M, KP_AUX)
    else:
        run = _pad_list(BLOCK_M, KP)
        aux = _pad_list(BLOCK_M, KP_AUX)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        s = tile_scores(x_ptr, w_ptr, c_ptr, s_ptr, rows, cols, row_ok, col_ok, B, col_lo, d, stride_xb, stride_xd,
                        stride_wn, stride_wd, stride_sb, BLOCK_K, DOT_FP32, PRECISION, FROM_SCORES)
        run = _merge_tile(run, s, cols, col_ok[None, :], KP, SMALL, not HAS_AUX)
        if HAS_AUX:
            dead = tl.load(dead_ptr + cols, mask=col_ok, other=0) != 0
            aux = _merge_tile(aux, s, cols, (col_ok & dead)[None, :], KP_AUX, SMALL, False)
    tl.store(part_ptr + base * KP + tl.arange(0, KP)[None, :], run, mask=row_ok[:, None])
    if HAS_AUX:
        tl.store(aux_part_ptr + base * KP_AUX + tl.arange(0, KP_AUX)[None, :], aux, mask=row_ok[:, None])


@triton.jit
def _topk_merge_kernel(part_ptr, pre_ptr, idx_ptr, B, S, k, stride_ob,
                       KP: tl.constexpr, SP: tl.constexpr, BLOCK_M: tl.constexpr):
    """(B, S, KP) partial keys -> the k best per row, best first: pre (B, k) scores, idx (B, k) int32.
    k rounds of "take the row maximum": keys are unique, and k <= KP is small."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    j = tl.arange(0, SP * KP)
    ok = row_ok[:, None] & (j < S * KP)[None, :]
    keys = tl.load(part_ptr + rows.to(tl.int64)[:, None] * (S * KP) + j[None, :], mask=ok, other=_PAD_KEY)
    out = pre_ptr + rows.to(tl.int64) * stride_ob
    out_idx = idx_ptr + rows.to(tl.int64) * stride_ob
    for col in range(k):
        best = tl.max(keys, 1)
        tl.store(out + col, _key_score(best).to(pre_ptr.dtype.element_ty), mask=row_ok)
        tl.store(out_idx + col, _key_latent(best), mask=row_ok)
        keys = tl.where(keys == best[:, None], _PAD_KEY, keys)


# ============================================================================ configs
MAX_K = 128  # KP above this holds too many keys in registers; the backend falls back to plain torch
MAX_K_AUX = 32  # a larger AuxK list does not fit beside the main one; the backend uses a GEMM over the dead rows


def fuses_aux(k_aux: int, dtype: torch.dtype) -> bool:
    """Whether the AuxK list rides in the encoder pass: small lists beside 16-bit tiles. fp32 tiles
    (tf32x3) leave no registers for it, and Triton before 3.9 needs a K step of 16, so fp32 AuxK is a
    GEMM over the dead rows."""
    return 0 < k_aux <= MAX_K_AUX and dtype.itemsize <= 2


def merge_block_m(keys_per_row: int) -> int:
    return max(1, min(32, 4096 // keys_per_row))


def list_widths(k: int, k_aux: int) -> tuple[int, int]:
    """KP and KP_AUX, the running lists' widths: powers of two, KP_AUX = 1 without AuxK."""
    return triton.next_power_of_2(k), triton.next_power_of_2(max(k_aux, 1))


# ============================================================================ launchers
@dataclass(frozen=True)
class Partials:
    """The running lists of every (row, split), as _topk_partial_kernel reads and writes them: ``keys``
    (B, S, KP); ``aux`` (B, S, KP_AUX) with AuxK, else ``keys`` again (never touched, KP_AUX = 1);
    ``dead`` the int8 dead mask, else a placeholder pointer."""
    keys: torch.Tensor
    aux: torch.Tensor
    dead: torch.Tensor
    k: int
    k_aux: int

    @property
    def kp(self) -> int:
        return list_widths(self.k, self.k_aux)[0]

    @property
    def kp_aux(self) -> int:
        return list_widths(self.k, self.k_aux)[1]


def check_args(x, W_enc, c, k, dead_mask, k_aux) -> None:
    B, d = x.shape
    n = W_enc.shape[0]
    assert W_enc.shape == (n, d) and c.shape == (n,) and c.dtype == torch.float32
    assert 1 <= k <= n and k <= MAX_K and k_aux <= MAX_K_AUX
    assert not k_aux or (dead_mask is not None and dead_mask.shape == (n,))
    check_weights(x, W_enc)
    assert x.device == W_enc.device == c.device


def new_partials(x: torch.Tensor, c: torch.Tensor, splits: int, k: int, dead_mask: torch.Tensor | None,
                 k_aux: int) -> Partials:
    B = x.shape[0]
    kp, kp_aux = list_widths(k, k_aux)
    keys = torch.empty(B, splits, kp, dtype=torch.int64, device=x.device)
    if not k_aux:
        return Partials(keys, keys, c, k, k_aux)
    aux = torch.empty(B, splits, kp_aux, dtype=torch.int64, device=x.device)
    return Partials(keys, aux, dead_mask.to(torch.int8).contiguous(), k, k_aux)


def launch_partial(grid, x: torch.Tensor, W_enc: torch.Tensor, c: torch.Tensor, lists: Partials, cfg: EncoderConfig,
                   per_split: int, col_lo: int = 0, col_hi: int | None = None, scores: torch.Tensor | None = None,
                   dot_fp32: bool = False, resume: bool = False) -> None:
    """One launch of _topk_partial_kernel over the latents [col_lo, col_hi) (default all): the tiles multiply
    x @ W_enc.T, or read ``scores`` (B, col_hi - col_lo) fp32 products; ``resume`` continues the lists."""
    B, d = x.shape
    col_hi = W_enc.shape[0] if col_hi is None else col_hi
    s = c if scores is None else scores
    _topk_partial_kernel[grid](
        x, W_enc, c, lists.dead, lists.keys, lists.aux, s, B, col_lo, col_hi, d, per_split,
        x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), 0 if scores is None else scores.stride(0),
        KP=lists.kp, KP_AUX=lists.kp_aux, HAS_AUX=bool(lists.k_aux), BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
        BLOCK_K=cfg.BLOCK_K, SMALL=cfg.SMALL, DOT_FP32=dot_fp32, PRECISION=precision(x.dtype),
        FROM_SCORES=scores is not None, RESUME=resume, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        enable_fp_fusion=True)


def merge_partials(lists: Partials, out_dtype: torch.dtype):
    """(pre (B, k), idx (B, k) int32, aux_pre, aux_idx): the k best of every row's split lists, best first;
    the aux pair None without AuxK."""
    pre, idx = _merge(lists.keys, lists.k, out_dtype)
    aux_pre = aux_idx = None
    if lists.k_aux:
        aux_pre, aux_idx = _merge(lists.aux, lists.k_aux, out_dtype)
    return pre, idx, aux_pre, aux_idx


def _merge(part: torch.Tensor, k: int, out_dtype: torch.dtype):
    B, S, kp = part.shape
    sp = triton.next_power_of_2(S)
    pre = torch.empty(B, k, dtype=out_dtype, device=part.device)
    idx = torch.empty(B, k, dtype=torch.int32, device=part.device)
    bm = merge_block_m(sp * kp)
    _topk_merge_kernel[(triton.cdiv(B, bm),)](part, pre, idx, B, S, k, pre.stride(0), KP=kp, SP=sp, BLOCK_M=bm,
                                              num_warps=4, enable_fp_fusion=True)
    return pre, idx


def topk_select(x: torch.Tensor, W_enc: torch.Tensor, c: torch.Tensor, k: int, dead_mask: torch.Tensor | None = None,
                k_aux: int = 0, out_dtype: torch.dtype | None = None, config: EncoderConfig | None = None):
    """Top-k of p = x @ W_enc.T + c per row: (pre (B, k), idx (B, k) int32, aux_pre, aux_idx) - the aux
    pair is the top-k_aux among latents with dead_mask set, or None. pre in ``out_dtype`` (x's)."""
    check_args(x, W_enc, c, k, dead_mask, k_aux)
    B, d = x.shape
    n = W_enc.shape[0]
    dev = Device.of(x)
    cfg = config or encoder_config(B, d, n, max(list_widths(k, k_aux)), x.dtype, dev, aux=bool(k_aux))
    grid, per_split, S = split_grid(x, W_enc, cfg)
    lists = new_partials(x, c, S, k, dead_mask, k_aux)
    launch_partial(grid, x, W_enc, c, lists, cfg, per_split, dot_fp32=multiplies_in_fp32(x, dev))
    return merge_partials(lists, out_dtype or x.dtype)
