"""Encoder kernels: the GEMM ``p = x @ W_enc.T + c`` in tiles, with the selection in the epilogue, so the
(B, n) pre-activations are never written.

``c = b_enc - W_enc @ b_dec`` (one GEMV, fp32) folds the decoder bias into the encoder bias: the tiles
then multiply x and W_enc as stored (bf16 on tensor cores) and p keeps fp32 accuracy, where rounding
``x - b_dec`` to bf16 first would not.

TopK: grid (row blocks, n splits). Each program walks its split in BLOCK_N tiles and keeps a running
top-k per row as sortable int64 keys (score bits in the high word, ~latent in the low word, so one
integer order is "score descending, then lower latent first" - the tie rule of every backend). A tile
only reaches the merge through a cheap test against each row's current k-th best: a few winners are
inserted one at a time; many (the first tiles) go through ``tl.topk``. The (B, S, KP) partial keys are
merged to k per row by a second kernel. An optional second running list takes only dead latents (AuxK).

GEMM + scan (``topk_scan``, ``SCAN_CHUNK``): cuBLAS writes the fp32 products of a chunk of latents into one
reused (B, chunk) buffer and the same partial kernel (FROM_SCORES) merges them into running lists that
persist in the (B, S, KP) partials from chunk to chunk (RESUME); the merge kernel finishes as above.

Threshold: the same tiles append every entry with p > cutoff[latent] to per-(row, split) lists with a
capacity; counts keep counting past it, so an overflow is detected and rerun with the exact capacity.
A compaction kernel then packs the splits' lists into (B, K) rows in ascending latent order. With
SCAN_CHUNK, also as GEMM + scan: one list per row, appended chunk by chunk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Key of (score = -inf, latent = 2**31 - 1): below every finite score's key. Pads lists and masked tiles.
_PAD_KEY = tl.constexpr(-9187343241983295488)
_NEG_INF = tl.constexpr(float("-inf"))
_INT_MAX = tl.constexpr(2147483647)


# ============================================================================ jit helpers
@triton.jit
def _key(score, latent):
    """Sortable int64 key: larger score first, then lower latent first."""
    bits = (score + 0.0).to(tl.int32, bitcast=True)  # + 0.0 turns -0.0 into +0.0
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
def _score_tile(x_ptr, w_ptr, c_ptr, rows, cols, row_ok, col_ok, d, stride_xb, stride_xd, stride_wn, stride_wd,
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
def _program_span(B, col_lo, col_hi, n_per_split, BLOCK_M: tl.constexpr):
    """A partial kernel's program (row block, split): its rows, which of them exist, its latents [lo, hi)
    within [col_lo, col_hi), and each row's (row, split) slot of the (B, S, ...) partials."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    lo = col_lo + split * n_per_split
    hi = tl.minimum(lo + n_per_split, col_hi)
    return rows, rows < B, lo, hi, rows.to(tl.int64) * tl.num_programs(1) + split


@triton.jit
def _tile(x_ptr, w_ptr, c_ptr, s_ptr, rows, cols, row_ok, col_ok, B, col_lo, d,
          stride_xb, stride_xd, stride_wn, stride_wd, stride_sb,
          BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, FROM_SCORES: tl.constexpr):
    """The partial kernels' fp32 scores x @ W.T + c: multiplied here, or (FROM_SCORES) read from a (B, chunk)
    buffer of cuBLAS products whose column 0 is latent col_lo."""
    if FROM_SCORES:  # rows past B read row B - 1 (never stored): a column-only mask
        s_row = s_ptr + tl.minimum(rows, B - 1).to(tl.int64)[:, None] * stride_sb
        s = tl.load(s_row + (cols - col_lo)[None, :], mask=col_ok[None, :], other=0.0)
        s += tl.load(c_ptr + cols, mask=col_ok, other=0.0)[None, :]
    else:
        s = _score_tile(x_ptr, w_ptr, c_ptr, rows, cols, row_ok, col_ok, d, stride_xb, stride_xd,
                        stride_wn, stride_wd, BLOCK_K, DOT_FP32, PRECISION)
    return s


@triton.jit
def _merge_tile(run, s, cols, ok, KP: tl.constexpr, SMALL: tl.constexpr, PACKED: tl.constexpr):
    """Merge the tile's scores ``s`` (entries where ``ok``) into the running keys ``run`` (BLOCK_M, KP).
    With SMALL < KP, a tile where some row has more than SMALL winners goes through tl.topk."""
    thr = tl.min(run, 1)
    thr_s = _key_score(thr)
    thr_l = _key_latent(thr)
    beats = (s > thr_s[:, None]) | ((s == thr_s[:, None]) & (cols[None, :] < thr_l[:, None]))
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
            top_s = tl.max(tl.where(cand, s, _NEG_INF), 1)
            top_l = tl.min(tl.where(cand & (s == top_s[:, None]), cols[None, :], _INT_MAX), 1)
            new = _key(top_s, top_l)
            low = tl.min(run, 1)
            put = (top_s > _NEG_INF) & (new > low)
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
    rows, row_ok, lo, hi, slot = _program_span(B, col_lo, col_hi, n_per_split, BLOCK_M)
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
        s = _tile(x_ptr, w_ptr, c_ptr, s_ptr, rows, cols, row_ok, col_ok, B, col_lo, d, stride_xb, stride_xd,
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
    rows, row_ok, lo, hi, base = _program_span(B, col_lo, col_hi, n_per_split, BLOCK_M)
    if RESUME:
        count = tl.load(count_ptr + base, mask=row_ok, other=0)
    else:
        count = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        s = _tile(x_ptr, w_ptr, c_ptr, s_ptr, rows, cols, row_ok, col_ok, B, col_lo, d, stride_xb, stride_xd,
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
def _compact_kernel(part_pre_ptr, part_idx_ptr, count_ptr, offset_ptr, pre_ptr, idx_ptr, S, cap, stride_ob,
                    BLOCK: tl.constexpr):
    """Copy list (row, split) to its offset in output row ``row`` (splits ascend in latent order)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    slot = row.to(tl.int64) * S + split
    count = tl.load(count_ptr + slot)
    offset = tl.load(offset_ptr + slot)
    j = tl.arange(0, BLOCK)
    for j0 in range(0, count, BLOCK):
        m = (j0 + j) < count
        v = tl.load(part_pre_ptr + slot * cap + j0 + j, mask=m)
        i = tl.load(part_idx_ptr + slot * cap + j0 + j, mask=m)
        tl.store(pre_ptr + row.to(tl.int64) * stride_ob + offset + j0 + j, v, mask=m)
        tl.store(idx_ptr + row.to(tl.int64) * stride_ob + offset + j0 + j, i, mask=m)


# ============================================================================ configs
# Encoders of 16-bit x: 0 = the GEMM runs in the kernel's tiles (fused); a chunk width = cuBLAS multiplies that
# many latents at a time into one reused fp32 buffer (B x chunk) and the same kernels scan it (topk_scan,
# threshold_partial).
# Not yet timed on a GPU: benchmarks/encoder_ab.py compares them.
SCAN_CHUNK = 0
# fp32 master weights beside 16-bit x: False = the backend hands the tiles a 16-bit copy made for the call;
# True = the tiles load fp32 and convert (no copy, twice the weight bytes through the GEMM's main loop).
MASTER_IN_KERNEL = False
MAX_K = 128  # KP above this holds too many keys in registers; the backend falls back to plain torch
MAX_K_AUX = 32  # a larger AuxK list does not fit beside the main one; the backend uses a GEMM over the dead rows


def fuses_aux(k_aux: int, dtype: torch.dtype) -> bool:
    """Whether the AuxK list rides in the encoder pass: small lists beside 16-bit tiles. fp32 tiles
    (tf32x3) leave no registers for it, and Triton before 3.9 needs a K step of 16, so fp32 AuxK is a
    GEMM over the dead rows."""
    return 0 < k_aux <= MAX_K_AUX and dtype.itemsize <= 2


@dataclass(frozen=True)
class Device:
    """What the configs depend on: compute capability (major*10+minor; 0 = Triton's CPU interpreter)
    and the number of SMs."""
    cap: int
    sms: int

    @staticmethod
    def of(t: torch.Tensor) -> "Device":
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


def _pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _splits(row_blocks: int, tiles: int, slots: int, min_tiles: int) -> int:
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
    """The tile config the launchers use, chosen with the static checks (kernels/resources.py): the
    largest tiles that compile without spills for sm_80 and sm_90. GPU: 64-row tiles (Hopper's warpgroup
    MMA needs them), 8 warps, 3 stages; 128 latents x 64 of d per step for 16-bit inputs (256 latents
    for k <= 32 without AuxK), 64 x 16 for fp32 (tf32x3 triples the operand registers); 64 latents for the
    threshold kernel (its scan needs registers); winners merged one at a time (tl.topk's sorting network costs about
    80 more registers per thread). Splits fill the SMs. Interpreter: small tiles (it runs numpy)."""
    if dev.cap == 0:
        bn = max(32, kp)
        bk = min(32, max(16, _pow2(d)))
        return EncoderConfig(16, bn, bk, 4, 1, _splits(triton.cdiv(B, 16), triton.cdiv(n, bn), dev.sms, 2), kp)
    wide = dtype.itemsize <= 2 and not threshold
    bn = max(128 if wide else 64, kp)
    if wide and kp <= 32 and not aux:
        bn = 256  # measured on an H100: W2 3.6 vs 4.5 ms, W1 1.35 vs 1.42 (benchmarks/results/*-encoder-ab.txt)
    bk = min(64 if dtype.itemsize <= 2 else 16, max(16, _pow2(d)))
    return EncoderConfig(64, bn, bk, 8, 3, _splits(triton.cdiv(B, 64), triton.cdiv(n, bn), dev.sms, 8), kp)


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


def precision(dtype: torch.dtype) -> str:
    """fp32 inputs: three tf32 products recover fp32 accuracy and keep the tensor cores."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def merge_block_m(keys_per_row: int) -> int:
    return max(1, min(32, 4096 // keys_per_row))


# ============================================================================ launchers
def fold_bias(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """c = b_enc - W_enc @ b_dec, fp32 (n,)."""
    n, d = W_enc.shape
    assert b_enc.shape == (n,) and b_dec.shape == (d,)
    c = torch.empty(n, dtype=torch.float32, device=W_enc.device)
    block_n = 32 if W_enc.device.type == "cpu" else 64
    _fold_bias_kernel[(triton.cdiv(n, block_n),)](
        W_enc, b_enc.contiguous(), b_dec.contiguous(), c, n, d, W_enc.stride(0), W_enc.stride(1),
        BLOCK_N=block_n, BLOCK_K=min(128, _pow2(d)), num_warps=4, enable_fp_fusion=True)
    return c


def _check_weights(x: torch.Tensor, W_enc: torch.Tensor) -> None:
    assert W_enc.dtype == x.dtype or (W_enc.dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16)), \
        f"W_enc {W_enc.dtype} beside x {x.dtype}: same dtype, or fp32 master weights beside 16-bit x"


def _grid_args(x, W_enc, cfg: EncoderConfig):
    B, d = x.shape
    n = W_enc.shape[0]
    tiles = triton.cdiv(n, cfg.BLOCK_N)
    per_split = triton.cdiv(tiles, cfg.splits) * cfg.BLOCK_N
    splits = triton.cdiv(n, per_split)
    return (triton.cdiv(B, cfg.BLOCK_M), splits), per_split, splits


def topk_select(x: torch.Tensor, W_enc: torch.Tensor, c: torch.Tensor, k: int, dead_mask: torch.Tensor | None = None,
                k_aux: int = 0, out_dtype: torch.dtype | None = None, config: EncoderConfig | None = None):
    """Top-k of p = x @ W_enc.T + c per row: (pre (B, k), idx (B, k) int32, aux_pre, aux_idx) - the aux
    pair is the top-k_aux among latents with dead_mask set, or None. pre in ``out_dtype`` (x's)."""
    B, d = x.shape
    n = W_enc.shape[0]
    assert W_enc.shape == (n, d) and c.shape == (n,) and c.dtype == torch.float32
    assert 1 <= k <= n and k <= MAX_K and k_aux <= MAX_K_AUX
    assert not k_aux or (dead_mask is not None and dead_mask.shape == (n,))
    _check_weights(x, W_enc)
    assert x.device == W_enc.device == c.device
    if config is None and SCAN_CHUNK and x.dtype.itemsize == 2:
        return topk_scan(x, W_enc, c, k, dead_mask, k_aux, out_dtype)
    out_dtype = out_dtype or x.dtype
    kp, kp_aux = _pow2(k), _pow2(max(k_aux, 1))
    dev = Device.of(x)
    cfg = config or encoder_config(B, d, n, max(kp, kp_aux if k_aux else 1), x.dtype, dev, aux=bool(k_aux))
    grid, per_split, S = _grid_args(x, W_enc, cfg)
    part = torch.empty(B, S, kp, dtype=torch.int64, device=x.device)
    aux_part = torch.empty(B, S, kp_aux, dtype=torch.int64, device=x.device) if k_aux else part
    dead = dead_mask.to(torch.int8).contiguous() if k_aux else c
    _topk_partial_kernel[grid](
        x, W_enc, c, dead, part, aux_part, c, B, 0, n, d, per_split,
        x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), 0,
        KP=kp, KP_AUX=kp_aux, HAS_AUX=bool(k_aux), BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
        BLOCK_K=cfg.BLOCK_K, SMALL=cfg.SMALL, DOT_FP32=dev.cap == 0 and x.dtype != torch.float32,
        PRECISION=precision(x.dtype), FROM_SCORES=False, RESUME=False,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True)
    return _finish(part, aux_part, k, k_aux, out_dtype)


def _mm_fp32(x: torch.Tensor, W: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = x @ W.T in fp32: cuBLAS with fp32 output on CUDA; elsewhere (the interpreter) the same 16-bit
    values multiplied in fp32."""
    if x.device.type == "cuda":
        return torch.mm(x, W.T, out_dtype=torch.float32, out=out)
    return torch.mm(x.float(), W.float().T, out=out)


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
    """topk_select for 16-bit x as GEMM + scan: cuBLAS writes ``chunk`` latents' fp32 scores at a time into
    one reused (B, chunk) buffer, and _topk_partial_kernel merges them into running lists kept in the
    (B, S, KP) partials across chunks. Memory: the buffer, whatever n is."""
    B, d = x.shape
    n = W_enc.shape[0]
    assert x.dtype.itemsize == 2 and c.shape == (n,) and c.dtype == torch.float32 and 1 <= k <= min(n, MAX_K)
    assert not k_aux or (dead_mask is not None and dead_mask.shape == (n,) and k_aux <= MAX_K_AUX)
    _check_weights(x, W_enc)
    out_dtype = out_dtype or x.dtype
    chunk = max(1, min(n, chunk or SCAN_CHUNK or n))
    kp, kp_aux = _pow2(k), _pow2(max(k_aux, 1))
    cfg = config or scan_config(B, chunk, max(kp, kp_aux if k_aux else 1), Device.of(x), aux=bool(k_aux))
    S = cfg.splits
    part = torch.empty(B, S, kp, dtype=torch.int64, device=x.device)
    aux_part = torch.empty(B, S, kp_aux, dtype=torch.int64, device=x.device) if k_aux else part
    dead = dead_mask.to(torch.int8).contiguous() if k_aux else c
    for c0, c1, s in _score_chunks(x, W_enc, chunk):
        per_split = triton.cdiv(triton.cdiv(c1 - c0, cfg.BLOCK_N), S) * cfg.BLOCK_N
        _topk_partial_kernel[(triton.cdiv(B, cfg.BLOCK_M), S)](
            x, W_enc, c, dead, part, aux_part, s, B, c0, c1, d, per_split,
            x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), s.stride(0),
            KP=kp, KP_AUX=kp_aux, HAS_AUX=bool(k_aux), BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
            BLOCK_K=cfg.BLOCK_K, SMALL=cfg.SMALL, DOT_FP32=False, PRECISION=precision(x.dtype),
            FROM_SCORES=True, RESUME=c0 > 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            enable_fp_fusion=True)
    return _finish(part, aux_part, k, k_aux, out_dtype)


def _finish(part, aux_part, k, k_aux, out_dtype):
    pre, idx = _merge(part, k, out_dtype)
    aux_pre = aux_idx = None
    if k_aux:
        aux_pre, aux_idx = _merge(aux_part, k_aux, out_dtype)
    return pre, idx, aux_pre, aux_idx


def _merge(part: torch.Tensor, k: int, out_dtype: torch.dtype):
    B, S, kp = part.shape
    sp = _pow2(S)
    pre = torch.empty(B, k, dtype=out_dtype, device=part.device)
    idx = torch.empty(B, k, dtype=torch.int32, device=part.device)
    bm = merge_block_m(sp * kp)
    _topk_merge_kernel[(triton.cdiv(B, bm),)](part, pre, idx, B, S, k, pre.stride(0), KP=kp, SP=sp, BLOCK_M=bm,
                                              num_warps=4, enable_fp_fusion=True)
    return pre, idx


def threshold_partial(x: torch.Tensor, W_enc: torch.Tensor, c: torch.Tensor, cutoff: torch.Tensor, capacity: int,
                      config: EncoderConfig | None = None, chunk: int | None = None):
    """First pass of threshold_select: per (row, split) lists (pre (B, S, cap), idx (B, S, cap)) and the
    true counts (B, S) int32, which exceed ``capacity`` where a list overflowed. With ``chunk`` (default
    SCAN_CHUNK for 16-bit x) as GEMM + scan: cuBLAS scores ``chunk`` latents at a time, the lists grow
    chunk by chunk."""
    B, d = x.shape
    n = W_enc.shape[0]
    assert W_enc.shape == (n, d) and c.shape == (n,) and cutoff.shape == (n,) and capacity >= 1
    _check_weights(x, W_enc)
    assert x.device == W_enc.device == c.device == cutoff.device
    chunk = chunk if chunk is not None else (SCAN_CHUNK if config is None and x.dtype.itemsize == 2 else 0)
    scan = bool(chunk)
    assert not scan or x.dtype.itemsize == 2, "GEMM + scan multiplies 16-bit x on cuBLAS"
    chunk = min(n, chunk) if scan else 0
    dev = Device.of(x)
    cfg = config or (scan_threshold_config(B, chunk, dev) if scan else
                     encoder_config(B, d, n, 1, x.dtype, dev, threshold=True))
    if scan:  # one list per row, appended chunk by chunk: ascending latent order
        assert cfg.splits == 1, "GEMM + scan keeps one list per row (splits would interleave the chunks)"
        S = 1
        grid = (triton.cdiv(B, cfg.BLOCK_M), 1)
    else:
        grid, per_split, S = _grid_args(x, W_enc, cfg)
    part_pre = torch.empty(B, S, capacity, dtype=x.dtype, device=x.device)
    part_idx = torch.empty(B, S, capacity, dtype=torch.int32, device=x.device)
    count = torch.empty(B, S, dtype=torch.int32, device=x.device)
    cutoff = cutoff.contiguous()
    common = dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, PRECISION=precision(x.dtype),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True)
    if not scan:
        _threshold_partial_kernel[grid](
            x, W_enc, c, cutoff, part_pre, part_idx, count, c, B, 0, n, d, per_split, capacity,
            x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), 0,
            DOT_FP32=dev.cap == 0 and x.dtype != torch.float32, FROM_SCORES=False, RESUME=False, **common)
        return part_pre, part_idx, count
    for c0, c1, s in _score_chunks(x, W_enc, chunk):  # GEMM + scan, as topk_scan
        per_split = triton.cdiv(c1 - c0, cfg.BLOCK_N) * cfg.BLOCK_N
        _threshold_partial_kernel[grid](
            x, W_enc, c, cutoff, part_pre, part_idx, count, s, B, c0, c1, d, per_split, capacity,
            x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), s.stride(0),
            DOT_FP32=False, FROM_SCORES=True, RESUME=c0 > 0, **common)
    return part_pre, part_idx, count


def threshold_compact(part_pre: torch.Tensor, part_idx: torch.Tensor, count: torch.Tensor, K: int):
    """Pack the (row, split) lists (none overflowed) into (B, K) rows: pre padded with -inf, idx with 0."""
    B, S, capacity = part_pre.shape
    assert part_idx.shape == part_pre.shape and count.shape == (B, S) and K >= 1
    offsets = (torch.cumsum(count, 1, dtype=torch.int64) - count).contiguous()
    pre = torch.full((B, K), float("-inf"), dtype=part_pre.dtype, device=part_pre.device)
    idx = torch.zeros((B, K), dtype=torch.int32, device=part_pre.device)
    _compact_kernel[(B, S)](part_pre, part_idx, count, offsets, pre, idx, S, capacity, pre.stride(0),
                            BLOCK=min(1024, _pow2(max(capacity, 16))), num_warps=4, enable_fp_fusion=True)
    return pre, idx


def threshold_select(x: torch.Tensor, W_enc: torch.Tensor, c: torch.Tensor, cutoff: torch.Tensor, capacity: int = 64,
                     config: EncoderConfig | None = None, chunk: int | None = None):
    """Every entry with p > cutoff[latent]: (pre (B, K) in x's dtype, padded with -inf; idx (B, K) int32,
    padded with 0; per-split capacity needed). Entries are in ascending latent order per row. A first
    pass with ``capacity`` slots per (row, split) that overflows is rerun with the exact capacity."""
    part_pre, part_idx, count = threshold_partial(x, W_enc, c, cutoff, capacity, config, chunk)
    need = int(count.max())
    if need > capacity:  # the counts are exact, so one rerun always fits
        part_pre, part_idx, count = threshold_partial(x, W_enc, c, cutoff, need, config, chunk)
    K = max(int(count.sum(1).max()), 1)
    pre, idx = threshold_compact(part_pre, part_idx, count, K)
    return pre, idx, need
