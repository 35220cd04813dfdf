"""A roofline MODEL of one SAE training step on a named GPU (`sae-fast bench --model h100|h200`; printed and
saved by roofline_report.py).

Not a measurement. Each algorithm is a list of kernels; each kernel's flops and bytes moved follow from
the launch shapes (formulas beside each kernel below), and its predicted time is

    t = max(flops / peak_flops, bytes / hbm_bandwidth)

with the GPU's published peaks (GPUS). Phases add up their kernels: fwd, fwd+bwd, step (= fwd+bwd plus the
optimizer and decoder renormalisation). Ratios are to the encoder GEMM alone, ``xc @ W_enc.T`` with its
(B, n) output written: the same floor ``sae-fast bench`` measures.

What the model assumes (all of it optimistic, so every prediction is a lower bound):
- every kernel runs at the peak of its bottleneck; no launch overhead, no tail effects, no overlap losses;
- GEMM operands are read from HBM once (tiling and L2 reuse are perfect); split-n programs re-read their
  rows of x once per split; gathers (W[idx] rows) are counted in full, with no cache hits;
- atomics are counted as a read plus a write of their target; torch.topk as one read of its input
  (its radix select makes several passes);
- tensor-core flops (GEMMs, tl.dot) use the dense bf16 tensor-core peak (TF32 for fp32 GEMMs);
  everything else (gathers, reductions, optimizer) the fp32 CUDA-core peak;
- ReLU workloads: K = the target mean L0; padding of variable-length lists is ignored.
Peers are modelled as algorithms, with their (B, n) intermediates in the compute dtype; the libraries keep
some of them in fp32 (SAELens's hidden_pre after ``+ b_enc`` under autocast), which costs them more.

Notation: B rows, d width, n latents, k active per row (K for ReLU), e bytes of the compute dtype (2 for
bf16 autocast, 4 for fp32), m = 4 bytes of fp32 master weights, gradients and Adam moments, S n-splits.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .workloads import Workload

PHASE_ORDER = ("fwd", "bwd", "opt")
LABEL = "MODEL (roofline prediction, not a measurement)"


# ============================================================================ GPUs
@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    bf16_tflops: float   # dense (no 2:4 sparsity) bf16 tensor-core peak
    tf32_tflops: float   # dense tf32 tensor-core peak (fp32 GEMMs with TF32 allowed)
    fp32_tflops: float   # fp32 CUDA-core (non-tensor) peak
    hbm_tb_s: float      # HBM bandwidth, TB/s (10^12 bytes/s)
    sms: int
    source: str


# NVIDIA's datasheets quote tensor-core rates "with sparsity"; the dense rate is half of that figure.
GPUS = {
    "h100": GPU("h100", "NVIDIA H100 SXM5 80 GB (HBM3)", bf16_tflops=989.4, tf32_tflops=494.7, fp32_tflops=66.9,
                hbm_tb_s=3.35, sms=132,
                source="NVIDIA H100 Tensor Core GPU datasheet, SXM column: BF16 1,979 TFLOPS and TF32 989 TFLOPS with "
                       "sparsity (dense: 989.4 and 494.7), FP32 67 TFLOPS, GPU memory bandwidth 3.35 TB/s; 132 SMs "
                       "(NVIDIA H100 Tensor Core GPU Architecture whitepaper)"),
    "h200": GPU("h200", "NVIDIA H200 SXM 141 GB (HBM3e)", bf16_tflops=989.4, tf32_tflops=494.7, fp32_tflops=66.9,
                hbm_tb_s=4.8, sms=132,
                source="NVIDIA H200 Tensor Core GPU datasheet, SXM column: BF16 1,979 TFLOPS and TF32 989 TFLOPS with "
                       "sparsity (dense: 989.4 and 494.7), FP32 67 TFLOPS, GPU memory bandwidth 4.8 TB/s; same GH100 "
                       "die and 132 SMs as the H100 SXM"),
}


# ============================================================================ kernels
@dataclass
class Kernel:
    name: str
    phase: str                    # fwd | bwd | opt
    flops: float
    tensor_core: bool
    reads: dict = field(default_factory=dict)    # operand -> bytes read from HBM
    writes: dict = field(default_factory=dict)   # operand -> bytes written to HBM

    @property
    def bytes(self) -> float:
        return sum(self.reads.values()) + sum(self.writes.values())

    def seconds(self, gpu: GPU, e: int) -> float:
        peak = (gpu.bf16_tflops if e == 2 else gpu.tf32_tflops) if self.tensor_core else gpu.fp32_tflops
        return max(self.flops / (peak * 1e12), self.bytes / (gpu.hbm_tb_s * 1e12))

    def bound(self, gpu: GPU, e: int) -> str:
        peak = (gpu.bf16_tflops if e == 2 else gpu.tf32_tflops) if self.tensor_core else gpu.fp32_tflops
        return "compute" if self.flops / (peak * 1e12) >= self.bytes / (gpu.hbm_tb_s * 1e12) else "memory"


@dataclass(frozen=True)
class Shape:
    B: int
    d: int
    n: int
    k: int             # TopK k, or the ReLU workload's mean L0 K
    activation: str    # topk | relu
    e: int = 2         # compute dtype bytes (2: bf16 autocast; 4: fp32)
    m: int = 4         # master weights, gradients and optimizer state (fp32)
    splits: int = 1    # S: n-splits of the fused encoder

    @property
    def params(self) -> int:
        """P: parameters W_enc, W_dec, b_enc, b_dec."""
        return 2 * self.n * self.d + self.n + self.d


I32, I64 = 4, 8


def default_splits(B: int, gpu: GPU, block_m: int = 128) -> int:
    """S for the fused encoder: enough (row block, n split) programs to give every SM one:
    ceil(SMs / ceil(B/BLOCK_M))."""
    return max(1, math.ceil(gpu.sms / math.ceil(B / block_m)))


# ---------------------------------------------------------------------------- shared pieces
def encoder_gemm(s: Shape, phase="fwd", name="encoder GEMM xc @ W_enc.T (dense output)") -> Kernel:
    # flops 2·B·d·n; reads xc B·d·e and W_enc n·d·e once; writes the pre-activations B·n·e.
    return Kernel(name, phase, 2 * s.B * s.d * s.n, True,
                  {"xc": s.B * s.d * s.e, "W_enc": s.n * s.d * s.e}, {"pre": s.B * s.n * s.e})


def cast_in(s: Shape, params: tuple = ("W_enc", "W_dec", "b_enc", "b_dec")) -> list:
    """Autocast copies of the fp32 master weights (and x - b_dec) in the compute dtype: read m, write e per element."""
    if s.e == s.m:
        return []
    sizes = {"W_enc": s.n * s.d, "W_dec": s.n * s.d, "b_enc": s.n, "b_dec": s.d}
    reads = {p: sizes[p] * s.m for p in params}
    writes = {f"{p} ({s.e}-byte copy)": sizes[p] * s.e for p in params}
    return [Kernel("cast weights to compute dtype", "fwd", 0, False, reads, writes)]


def loss_kernels(s: Shape, xhat_bytes: int) -> list:
    # fwd: FVU/MSE reads x (fp32) twice (mean, error) and x_hat once; bwd: g = dL/dx_hat reads x, x_hat, writes g.
    BD = s.B * s.d
    return [Kernel("loss (MSE/FVU)", "fwd", 5 * BD, False, {"x": 2 * BD * s.m, "x_hat": BD * xhat_bytes}, {}),
            Kernel("loss backward g = dL/dx_hat", "bwd", 3 * BD, False, {"x": BD * s.m, "x_hat": BD * xhat_bytes},
                   {"g": BD * xhat_bytes})]


def grad_cast(s: Shape) -> list:
    """Gradients of the autocast copies, cast back to the fp32 masters: read e, write m per parameter."""
    if s.e == s.m:
        return []
    return [Kernel("cast gradients to fp32 masters", "bwd", 0, False, {"grads (e)": s.params * s.e},
                   {"grads (m)": s.params * s.m})]


def optimizer(s: Shape, project: bool = True) -> list:
    nd, P, m = s.n * s.d, s.params, s.m
    out = []
    if project:
        # remove the component of dW_dec parallel to each decoder row: reads dW_dec and W_dec, writes dW_dec.
        out.append(Kernel("project dW_dec off the decoder rows", "opt", 4 * nd, False,
                          {"dW_dec": nd * m, "W_dec": nd * m}, {"dW_dec": nd * m}))
    # Adam: reads param, grad, exp_avg, exp_avg_sq; writes param, exp_avg, exp_avg_sq (all fp32); ~12 flops each.
    out.append(Kernel("Adam", "opt", 12 * P, False,
                      {"params": P * m, "grads": P * m, "exp_avg": P * m, "exp_avg_sq": P * m},
                      {"params": P * m, "exp_avg": P * m, "exp_avg_sq": P * m}))
    # decoder renorm: one read for the row norms, one read and one write to scale.
    out.append(Kernel("renormalise decoder rows", "opt", 3 * nd, False, {"W_dec": 2 * nd * m}, {"W_dec": nd * m}))
    return out


# ---------------------------------------------------------------------------- sae-fast
def sae_fast_kernels(s: Shape, fused_optimizer: bool = False) -> list:
    """sae-fast's algorithm as ops.py runs it on a fused backend (SparseAutoencoder, TopK or ReLU+L1).
    Under autocast the ops read the fp32 master weights themselves (m bytes): only the encoder tiles get a
    compute-dtype copy of W_enc, made per call; weight gathers, the backward's fp32 intermediates and the
    gradients are m bytes (no gradient is cast back); rows of x - b_dec and g stay e bytes.
    ``fused_optimizer``: the whole step fused (FusedAdam, DESIGN.md item 6): the optimizer inside the latent pass."""
    B, d, n, k, e, m, S = s.B, s.d, s.n, s.k, s.e, s.m, s.splits
    Bk, Bkd, BD = B * k, B * k * d, B * d
    ks = list(cast_in(s, ("W_enc",)))
    if s.e != s.m:
        ks.append(Kernel("cast x to compute dtype", "fwd", 0, False, {"x": BD * m}, {"x (e)": BD * e}))
    # ops._gathered: the two gathers of W_dec rows (decode, gather-dot) read an e-byte copy of W_dec when that
    # moves fewer bytes than gathering the m-byte masters; wd = bytes per gathered W_dec element.
    wd = e if e != m and 2 * Bk * (m - e) > n * (m + e) else m
    if wd != m:
        ks.append(Kernel("copy W_dec for the gathers", "fwd", 0, False, {"W_dec": n * d * m}, {"W_dec (e)": n * d * e}))
    if s.activation == "topk":
        # Fused GEMM + running top-k, grid (row block, n split): flops 2·B·d·n; each split re-reads its rows of x;
        # W_enc and b_enc once; writes S partial top-k lists of fp32 scores and int32 indices: B·S·k·(4+4).
        ks.append(Kernel("fused encode GEMM + top-k, split-n partials", "fwd", 2 * B * d * n, True,
                         {"x": BD * e * S, "b_dec": d * m, "W_enc": n * d * e, "b_enc": n * m},
                         {"partial scores": B * S * k * 4, "partial idx": B * S * k * I32}))
        # Merge S·k candidates to k per row: reads the partials, writes pre (B·k·e) and idx (B·k·int32).
        ks.append(Kernel("merge split-n partials to top-k", "fwd", B * S * k, False,
                         {"partial scores": B * S * k * 4, "partial idx": B * S * k * I32},
                         {"pre": Bk * e, "idx": Bk * I32}))
    else:
        # Fused GEMM + threshold compaction: writes the K entries per row above the cutoff (fp32 score, int32 idx).
        ks.append(Kernel("fused encode GEMM + threshold compaction", "fwd", 2 * B * d * n, True,
                         {"x": BD * e * S, "b_dec": d * m, "W_enc": n * d * e, "b_enc": n * m, "cutoff": n * m},
                         {"pre": Bk * e, "idx": Bk * I32}))
    ks.append(Kernel("relu(pre) -> values", "fwd", Bk, False, {"pre": Bk * e}, {"values": Bk * e}))
    # Sparse decode: x_hat[b] = sum_j values[b,j] W_dec[idx[b,j]] + b_dec; gathers B·k rows of W_dec.
    ks.append(Kernel("sparse decode (gather k rows of W_dec)", "fwd", 2 * Bkd, False,
                     {"values": Bk * e, "idx": Bk * I32, "W_dec rows": Bkd * wd, "b_dec": d * m}, {"x_hat": BD * wd}))
    if e != wd:
        ks.append(Kernel("cast x_hat to compute dtype", "fwd", 0, False, {"x_hat": BD * wd}, {"x_hat (e)": BD * e}))
    if s.activation == "relu":
        # L1 = sum_i f_i ||W_dec_i||: row norms of W_dec (one pass), gathered per active entry.
        ks.append(Kernel("decoder row norms for L1", "fwd", 2 * n * d, False, {"W_dec": n * d * m}, {"norms": n * 4}))
        ks.append(Kernel("L1 = sum values * norms[idx]", "fwd", 2 * Bk, False,
                         {"values": Bk * e, "idx": Bk * I32, "norms[idx]": Bk * 4}, {}))
    ks += loss_kernels(s, e)
    # ---- backward
    # gather-dot: dv[b,j] = <g[b], W_dec[idx[b,j]]>: reads g once per row and B·k gathered rows; writes dv.
    ks.append(Kernel("gather-dot dv = <g, W_dec[idx]>", "bwd", 2 * Bkd, False,
                     {"g": BD * e, "idx": Bk * I32, "W_dec rows": Bkd * wd}, {"dv": Bk * wd}))
    ks.append(Kernel("dp = dv * (pre > 0)" + (" + L1 term" if s.activation == "relu" else ""), "bwd", 2 * Bk, False,
                     {"dv": Bk * wd, "pre": Bk * e}, {"dp": Bk * wd}))
    ks.append(Kernel("xc = x - b_dec (recomputed)", "bwd", BD, False, {"x": BD * e, "b_dec": d * m}, {"xc": BD * e}))
    # Counting sort of the B·k (row, slot) entries by latent: histogram + scan + stable scatter.
    ks.append(Kernel("counting sort of entries by latent", "bwd", 2 * Bk, False,
                     {"idx (histogram)": Bk * I32, "idx (scatter)": Bk * I32, "counts": n * I32},
                     {"counts": n * I32, "offsets": n * I32, "entries by latent": Bk * I32}))
    latent_reads = {"entries": Bk * I32, "offsets": n * I32, "dp": Bk * wd, "values": Bk * e,
                    "xc rows": Bkd * e, "g rows": Bkd * e}
    if not fused_optimizer:
        # One pass per latent block: dW_enc[i] = sum dp·xc[b], db_enc[i] = sum dp, dW_dec[i] = sum v·g[b];
        # gathers B·k rows of xc and of g; writes every gradient row once (zero rows included, no memset).
        ks.append(Kernel("latent-sorted backward dW_enc, db_enc, dW_dec", "bwd", 4 * Bkd, False, latent_reads,
                         {"dW_enc": n * d * m, "db_enc": n * m, "dW_dec": n * d * m}))
    else:
        # DESIGN.md item 6 as kernels/fused_step.py builds it (FusedAdam): pass 1 reads the entries' xc rows
        # (and, with the projection, their g rows), applies Adam to W_enc and reads W_dec for its norm; pass 2
        # reads the g rows again and W_dec, applies the L1 term, the projection and Adam to W_dec; a third pass
        # renormalises W_dec (read + write, counted in full though it is mostly in L2). Every row moves (Adam
        # moves zero-gradient rows too); no gradient tensor is written.
        P_rows = 2 * n * d + n
        g_passes = 2 if s.activation == "topk" else 1
        ks.append(Kernel("fused step pass: gradients + L1 + projection + Adam + renorm per latent row", "bwd",
                         (2 + 2 * g_passes) * Bkd + 16 * P_rows, False,
                         {**latent_reads, "g rows": g_passes * Bkd * e, "params": P_rows * m,
                          "W_dec (pass 2, renorm)": 2 * n * d * m, "exp_avg": P_rows * m, "exp_avg_sq": P_rows * m},
                         {"params": P_rows * m, "W_dec (renorm)": n * d * m, "exp_avg": P_rows * m,
                          "exp_avg_sq": P_rows * m}))
    if s.activation == "relu" and not fused_optimizer:
        # d/dW_dec of the L1 term: lambda * (sum_b f_i) W_dec_i / ||W_dec_i||, a pass over W_dec.
        ks.append(Kernel("L1 gradient into dW_dec", "bwd", 3 * n * d, False,
                         {"W_dec": n * d * m, "dW_dec": n * d * m}, {"dW_dec": n * d * m}))
    # db_dec = sum g - sum dp·W_enc[idx]: ops.py forms dx = sparse_decode(dp, idx, W_enc) (B·k gathered rows).
    ks.append(Kernel("dx = sparse decode of dp with W_enc (for db_dec)", "bwd", 2 * Bkd, False,
                     {"dp": Bk * wd, "idx": Bk * I32, "W_enc rows": Bkd * m}, {"dx": BD * m}))
    ks.append(Kernel("db_dec = sum g - sum dx", "bwd", 2 * BD, False, {"g": BD * e, "dx": BD * m}, {"db_dec": d * m}))
    if not fused_optimizer:
        ks += optimizer(s, project=True)
    else:  # b_dec alone goes through Adam: d parameters
        ks.append(Kernel("Adam on b_dec", "opt", 12 * d, False, {"b_dec state": 4 * d * m},
                         {"b_dec state": 3 * d * m}))
    return ks


# ---------------------------------------------------------------------------- dense peers (SAELens)
def dense_kernels(s: Shape, rescale: bool = False) -> list:
    """SAELens's algorithm: dense pre-activations, torch.topk (or ReLU), dense activations, dense decoder GEMM;
    autograd backward through four more GEMMs (six in all). TopKTrainingSAE (rescale_acts_by_decoder_norm as
    given) or StandardTrainingSAE (ReLU + decoder-norm-weighted L1)."""
    B, d, n, k, e, m = s.B, s.d, s.n, s.k, s.e, s.m
    Bn, BD, nd = B * n, B * d, n * d
    ks = list(cast_in(s))
    ks.append(Kernel("sae_in = x - b_dec", "fwd", BD, False, {"x": BD * m, "b_dec": d * m}, {"sae_in": BD * m}))
    if s.e != s.m:
        ks.append(Kernel("cast sae_in to compute dtype", "fwd", 0, False, {"sae_in": BD * m}, {"sae_in (e)": BD * e}))
    ks.append(encoder_gemm(s, name="encoder GEMM sae_in @ W_enc"))
    ks.append(Kernel("hidden_pre = pre + b_enc", "fwd", Bn, False, {"pre": Bn * e, "b_enc": n * e},
                     {"hidden_pre": Bn * e}))
    if rescale:
        ks.append(Kernel("decoder row norms", "fwd", 2 * nd, False, {"W_dec": nd * e}, {"norms": n * e}))
        ks.append(Kernel("hidden_pre * norms", "fwd", Bn, False, {"hidden_pre": Bn * e}, {"hidden_pre": Bn * e}))
    if s.activation == "topk":
        # torch.topk: one read of (B, n) modelled; writes values (e) and int64 indices.
        ks.append(Kernel("torch.topk over (B, n)", "fwd", Bn, False, {"hidden_pre": Bn * e},
                         {"values": B * k * e, "indices": B * k * I64}))
        ks.append(Kernel("dense activations: zeros (B, n) + scatter", "fwd", 0, False,
                         {"values": B * k * e, "indices": B * k * I64}, {"acts": Bn * e}))
    else:
        ks.append(Kernel("relu over (B, n)", "fwd", Bn, False, {"hidden_pre": Bn * e}, {"acts": Bn * e}))
    if rescale:
        ks.append(Kernel("acts / norms", "fwd", Bn, False, {"acts": Bn * e}, {"acts": Bn * e}))
    ks.append(Kernel("decoder GEMM acts @ W_dec", "fwd", 2 * Bn * d, True, {"acts": Bn * e, "W_dec": nd * e},
                     {"x_hat": BD * e}))
    ks.append(Kernel("x_hat + b_dec", "fwd", BD, False, {"x_hat": BD * e}, {"x_hat": BD * e}))
    if s.activation == "relu":
        ks.append(Kernel("decoder row norms for L1", "fwd", 2 * nd, False, {"W_dec": nd * e}, {"norms": n * e}))
        ks.append(Kernel("L1 = |acts * norms| summed over (B, n)", "fwd", 2 * Bn, False, {"acts": Bn * e},
                         {"weighted acts": Bn * e}))
    ks += loss_kernels(s, e)
    # ---- backward (autograd)
    ks.append(Kernel("decoder backward d_acts = g @ W_dec.T", "bwd", 2 * Bn * d, True,
                     {"g": BD * e, "W_dec": nd * e}, {"d_acts": Bn * e}))
    ks.append(Kernel("decoder backward dW_dec = acts.T @ g", "bwd", 2 * Bn * d, True,
                     {"acts": Bn * e, "g": BD * e}, {"dW_dec": nd * e}))
    if s.activation == "topk":
        ks.append(Kernel("top-k backward: zeros (B, n) + scatter of the k gradients", "bwd", 0, False,
                         {"d_acts (gather)": B * k * e, "indices": B * k * I64}, {"d_pre": Bn * e}))
    else:
        ks.append(Kernel("L1 backward over (B, n)", "bwd", 2 * Bn, False, {"acts": Bn * e, "d_acts": Bn * e},
                         {"d_acts": Bn * e}))
        ks.append(Kernel("relu backward over (B, n)", "bwd", Bn, False, {"d_acts": Bn * e, "hidden_pre": Bn * e},
                         {"d_pre": Bn * e}))
    if rescale:
        ks.append(Kernel("rescale backward over (B, n) (two products)", "bwd", 2 * Bn, False,
                         {"d_acts": Bn * e, "hidden_pre": Bn * e, "acts": Bn * e},
                         {"d_pre": Bn * e, "d_norm part": Bn * e}))
    ks.append(Kernel("db_enc = d_pre summed over rows", "bwd", Bn, False, {"d_pre": Bn * e}, {"db_enc": n * e}))
    ks.append(Kernel("encoder backward dW_enc = sae_in.T @ d_pre", "bwd", 2 * Bn * d, True,
                     {"sae_in": BD * e, "d_pre": Bn * e}, {"dW_enc": nd * e}))
    ks.append(Kernel("encoder backward d_sae_in = d_pre @ W_enc.T (for db_dec)", "bwd", 2 * Bn * d, True,
                     {"d_pre": Bn * e, "W_enc": nd * e}, {"d_sae_in": BD * e}))
    ks.append(Kernel("db_dec", "bwd", 2 * BD, False, {"g": BD * e, "d_sae_in": BD * e}, {"db_dec": d * m}))
    ks += grad_cast(s)
    ks += optimizer(s, project=False)
    return ks


# ---------------------------------------------------------------------------- sparsify
def sparsify_kernels(s: Shape) -> list:
    """EleutherAI sparsify's SparseCoder (TopK only): F.linear to dense pre-activations, ReLU, torch.topk; Triton
    embedding-bag decode from the fp32 W_dec; decoder backward latent-sorted with atomic counters; encoder backward
    materialises B·k·d contributions and index_add_s them (atomics) into a zeroed fp32 dW_enc."""
    B, d, n, k, e, m = s.B, s.d, s.n, s.k, s.e, s.m
    Bn, Bk, Bkd, BD, nd = B * n, B * k, B * k * d, B * d, n * d
    ks = list(cast_in(s, ("W_enc", "b_enc")))
    ks.append(Kernel("x - b_dec", "fwd", BD, False, {"x": BD * m, "b_dec": d * m}, {"xc": BD * m}))
    if s.e != s.m:
        ks.append(Kernel("cast xc to compute dtype", "fwd", 0, False, {"xc": BD * m}, {"xc (e)": BD * e}))
    ks.append(Kernel("encoder GEMM F.linear (bias in the epilogue)", "fwd", 2 * B * d * n, True,
                     {"xc": BD * e, "W_enc": nd * e, "b_enc": n * e}, {"pre": Bn * e}))
    ks.append(Kernel("relu over (B, n)", "fwd", Bn, False, {"pre": Bn * e}, {"pre_acts": Bn * e}))
    ks.append(Kernel("torch.topk over (B, n)", "fwd", Bn, False, {"pre_acts": Bn * e},
                     {"values": Bk * e, "indices": Bk * I64}))
    ks.append(Kernel("embedding-bag decode from fp32 W_dec", "fwd", 2 * Bkd, False,
                     {"values": Bk * e, "indices": Bk * I64, "W_dec rows": Bkd * m}, {"x_hat": BD * m}))
    ks.append(Kernel("x_hat + b_dec", "fwd", BD, False, {"x_hat": BD * m}, {"x_hat": BD * m}))
    ks += loss_kernels(s, m)
    # ---- backward
    ks.append(Kernel("decoder bwd: count entries per latent (atomics)", "bwd", Bk, False,
                     {"indices": Bk * I64, "counters (atomic)": Bk * I32}, {"counters (atomic)": Bk * I32}))
    ks.append(Kernel("decoder bwd: argsort counts, cumsum", "bwd", n, False, {"counts": 2 * n * I32},
                     {"order": n * I64, "offsets": n * I64}))
    ks.append(Kernel("decoder bwd: map entries to latents (atomics)", "bwd", Bk, False,
                     {"indices": Bk * I64, "write pos (atomic)": Bk * I64},
                     {"write pos (atomic)": Bk * I64, "reverse map": Bk * I32}))
    ks.append(Kernel("decoder bwd: per-latent dW_dec and d_values", "bwd", 4 * Bkd, False,
                     {"W_dec": nd * m, "g rows": Bkd * m, "values": Bk * m, "reverse map": Bk * I32},
                     {"dW_dec": nd * m, "d_values": Bk * m}))
    ks.append(Kernel("encoder bwd: d_xc = embedding_bag(indices, W_enc)", "bwd", 2 * Bkd, False,
                     {"d_values": Bk * m, "indices": Bk * I64, "W_enc rows": Bkd * m}, {"d_xc": BD * m}))
    ks.append(Kernel("encoder bwd: contributions d_values[:, :, None] * xc[:, None, :]", "bwd", Bkd, False,
                     {"d_values": Bk * m, "xc": BD * m}, {"contributions": Bkd * m}))
    ks.append(Kernel("encoder bwd: zero dW_enc, db_enc", "bwd", 0, False, {}, {"dW_enc": nd * m, "db_enc": n * m}))
    ks.append(Kernel("encoder bwd: index_add_ into dW_enc, db_enc (atomics)", "bwd", Bkd, False,
                     {"contributions": Bkd * m, "indices": Bk * I64, "dW_enc rows (atomic)": Bkd * m,
                      "d_values": Bk * m},
                     {"dW_enc rows (atomic)": Bkd * m, "db_enc (atomic)": Bk * m}))
    ks.append(Kernel("db_dec", "bwd", 2 * BD, False, {"g": BD * m, "d_xc": BD * m}, {"db_dec": d * m}))
    ks += optimizer(s, project=True)
    return ks


# ============================================================================ predictions
ALGORITHMS = {
    "sae-fast": ("sae-fast: fused encode (split-n top-k, merge), sparse decode, gather-dot, latent-sorted backward",
                 sae_fast_kernels),
    "sae-fast+fused-opt": ("sae-fast's fused training step, FusedAdam (DESIGN.md item 6; kernels/fused_step.py: "
                           "interpreter-tested, not yet timed on a GPU; fwd+bwd is not separable, the step counts)",
                           lambda s: sae_fast_kernels(s, fused_optimizer=True)),
    "saelens": ("SAELens TopKTrainingSAE (rescale_acts_by_decoder_norm=False) / StandardTrainingSAE for ReLU: "
                "dense pre-activations + torch.topk, dense decoder, 6 GEMMs", lambda s: dense_kernels(s, False)),
    "saelens-rescale": ("SAELens TopKTrainingSAE (rescale_acts_by_decoder_norm=True): as above plus (B, n) rescales",
                        lambda s: dense_kernels(s, True)),
    "sparsify": ("sparsify SparseCoder: dense pre-activations + ReLU + torch.topk, embedding-bag decode, "
                 "index_add_ (atomics) encoder backward", sparsify_kernels),
}


def applies(algorithm: str, activation: str) -> bool:
    return not (activation == "relu" and algorithm in ("sparsify", "saelens-rescale"))


def predict(kernels: list, gpu: GPU, e: int) -> dict:
    """Predicted seconds per phase: fwd, fwd_bwd, step."""
    t = {p: sum(k.seconds(gpu, e) for k in kernels if k.phase == p) for p in PHASE_ORDER}
    return {"fwd": t["fwd"], "fwd_bwd": t["fwd"] + t["bwd"], "step": t["fwd"] + t["bwd"] + t["opt"]}


def shape_for(workload: Workload, gpu: GPU, dtype: str = "bf16") -> Shape:
    e = 2 if dtype == "bf16" else 4
    return Shape(workload.batch, workload.d, workload.n, workload.k, workload.activation, e=e,
                 splits=default_splits(workload.batch, gpu))


def model_workload(workload: Workload, gpu: GPU, dtype: str = "bf16") -> dict:
    s = shape_for(workload, gpu, dtype)
    floor = encoder_gemm(s)
    floor_s = floor.seconds(gpu, s.e)
    algos = {}
    for key, (desc, build) in ALGORITHMS.items():
        if not applies(key, s.activation):
            continue
        ks = build(s)
        pred = predict(ks, gpu, s.e)
        algos[key] = {
            "description": desc,
            "seconds": pred,
            "ratio_to_encoder_gemm": {p: v / floor_s for p, v in pred.items()},
            "tokens_per_s_step": s.B / pred["step"],
            "kernels": [{"name": k.name, "phase": k.phase, "flops": k.flops, "bytes": k.bytes,
                         "tensor_core": k.tensor_core, "seconds": k.seconds(gpu, s.e), "bound": k.bound(gpu, s.e),
                         "reads": k.reads, "writes": k.writes} for k in ks],
        }
    return {"workload": asdict(workload), "shape": asdict(s), "encoder_gemm": {
        "flops": floor.flops, "bytes": floor.bytes, "seconds": floor_s, "bound": floor.bound(gpu, s.e)},
        "algorithms": algos}
