"""The benchmark workloads: one table of shapes (imported by the bench, the roofline model and benchmarks/), the
settings every row shares, and the one factory of benchmark SAE tensors."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

L1_COEFF = 5.0   # ReLU+L1 rows (sae-fast and SAELens use the same decoder-norm-weighted L1)
ADAM_LR = 1e-4   # small, so the weights (and W4's L0) barely move during the timed steps


@dataclass(frozen=True)
class Workload:
    """One benchmark shape. For ``activation="relu"``, ``k`` is the target mean L0: b_enc is shifted
    so that on the benchmark batch about ``k`` pre-activations per row are positive. ``"matryoshka"``:
    Matryoshka TopK and BatchTopK SAEs (``matryoshka_widths``) beside the plain ones, and SAELens'
    Matryoshka BatchTopK (bench/matryoshka.py)."""

    name: str
    batch: int
    d: int
    n: int
    k: int
    activation: str = "topk"

    def describe(self) -> str:
        what = {"topk": f"k={self.k}", "relu": f"ReLU+L1, mean L0~{self.k}",
                "matryoshka": f"k={self.k}, Matryoshka widths {','.join(map(str, matryoshka_widths(self.n)))} "
                              f"against plain"}[self.activation]
        return f"B={self.batch} d={self.d} n={self.n} {what}"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, d, n, k), the tuple the micro-benchmarks and kernel checks are parametrised by."""
        return self.batch, self.d, self.n, self.k


def matryoshka_widths(n: int) -> list[int]:
    """The bench's Matryoshka prefix widths for n latents: n/64, n/16, n/4, n (four nested dictionaries)."""
    return sorted({max(1, n // 64), max(1, n // 16), max(1, n // 4), n})


WORKLOADS = {
    "cpu": Workload("cpu", 1024, 384, 16384, 32),
    "w1": Workload("w1", 4096, 768, 32768, 32),
    "w2": Workload("w2", 4096, 768, 131072, 32),
    "w3": Workload("w3", 4096, 4096, 65536, 64),
    "w4": Workload("w4", 4096, 768, 32768, 64, "relu"),
}
DEFAULT_WORKLOADS = {"cpu": ("cpu",), "cuda": ("w1", "w2", "w3", "w4")}


def quick(w: Workload) -> Workload:
    """A seconds-long version of a workload (same activation), for smoke runs and tests."""
    return replace(w, name=f"{w.name}-quick", batch=128, d=64, n=1024, k=min(w.k, 8))


def sae_tensors(batch: int, d: int, n: int, seed: int = 0, bias_std: float = 0.0) -> list[Tensor]:
    """[x, W_enc, b_enc, W_dec, b_dec], fp32 on CPU: x ~ N(0, 1) of shape (batch, d), an SAE initialised as
    SparseAutoencoder does (unit decoder rows, tied encoder W_enc = W_dec), zero biases, or with
    ``bias_std > 0`` biases ~ N(0, bias_std^2) drawn after the weights from the same generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d, generator=g)
    W_dec = torch.randn(n, d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    if bias_std:
        b_enc, b_dec = torch.randn(n, generator=g) * bias_std, torch.randn(d, generator=g) * bias_std
    else:
        b_enc, b_dec = torch.zeros(n), torch.zeros(d)
    return [x, W_dec.clone(), b_enc, W_dec, b_dec]


# ============================================================================ parsing the workload flags
def parse_list(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def resolve_workloads(args, defaults) -> list[Workload]:
    """The named workloads (or ``defaults``), shrunk by --quick, with any shape flags applied."""
    names = parse_list(args.workload) or list(defaults)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise ValueError(f"--workload: unknown {unknown}; choose from {', '.join(WORKLOADS)}")
    out = []
    for name in names:
        w = quick(WORKLOADS[name]) if args.quick else WORKLOADS[name]
        custom = {f: getattr(args, f) for f in ("batch", "d", "n", "k", "activation") if getattr(args, f) is not None}
        if custom:
            # The name says what changed (w2-n1048576), so result files of different shapes never collide.
            tag = "-".join(f"{'b' if f == 'batch' else f}{v}" for f, v in custom.items())
            w = replace(w, name=f"{w.name}-{tag}", **custom)
        if w.activation in ("topk", "matryoshka") and not 1 <= w.k <= w.n:
            raise ValueError(f"--k must be between 1 and n={w.n}; got {w.k}")
        for f in ("batch", "d", "n", "k"):
            if getattr(w, f) < 1:
                raise ValueError(f"--{f} must be >= 1; got {getattr(w, f)}")
        out.append(w)
    return out


# ============================================================================ one workload's shared inputs
@dataclass
class Setup:
    """The shared inputs of one workload: every row starts from copies of these."""

    workload: Workload
    device: torch.device
    dtype: str                      # fp32 | bf16 (autocast over fp32 master weights)
    x: Tensor
    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    x_hat_ref: Tensor
    notes: list = field(default_factory=list)

    def autocast(self):
        if self.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def make_setup(w: Workload, device: torch.device, dtype: str, seed: int = 0) -> Setup:
    """Random activations and an SAE initialised as SparseAutoencoder does (sae_tensors), and reference.py's
    x_hat of them. ReLU workloads: b_enc shifted so that about k pre-activations per row are positive."""
    from .. import reference
    x, W_enc, b_enc, W_dec, b_dec = (t.to(device) for t in sae_tensors(w.batch, w.d, w.n, seed))
    notes = []
    pre = reference.pre_activations(x, W_enc, b_enc, b_dec)
    if w.activation == "relu":
        # Shift every bias by the same amount so that about k entries per row are positive on this batch.
        flat = pre.flatten()
        cut = torch.topk(flat, min(w.batch * w.k + 1, flat.numel())).values[-1]
        b_enc -= cut
        pre -= cut
        notes.append(f"b_enc shifted by {-float(cut):.4f}: mean L0 {float((pre > 0).sum(1).float().mean()):.1f}")
        values, idx = reference.relu(pre)
    else:
        values, idx = reference.topk(pre, w.k)
    x_hat_ref = reference.sparse_decode(values, idx, W_dec, b_dec)
    del pre
    return Setup(w, device, dtype, x, W_enc, b_enc, W_dec, b_dec, x_hat_ref, notes)
