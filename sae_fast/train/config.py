"""Training configuration: one dataclass whose field docstrings are the ``sae-fast train --help`` text."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import textwrap
import typing
from dataclasses import dataclass, fields
from typing import Literal, Optional

ACTIVATIONS = ("topk", "batchtopk", "relu", "jumprelu")


@dataclass
class TrainConfig:
    # ---------------------------------------------------------------- model and data
    model: Optional[str] = None
    """Local folder (save_pretrained layout), cached Hugging Face id, or smollm2 (the embedded SmolLM2-135M-Instruct
    causal LM); default: the embedded all-MiniLM-L6-v2."""
    layer: Optional[str] = None
    """Module(s) to hook, comma-separated, glob patterns allowed (e.g. 'h.*'); one SAE per module. Default: the middle block."""
    corpus: Optional[str] = None
    """Text file, .jsonl file (a 'text' field per line) or folder of them; default: Python's docs and stdlib sources."""
    ctx_len: int = 128
    """Tokens per model input window."""
    max_tokens: Optional[int] = None
    """Training tokens of activations to collect (fewer if the corpus runs out); default 300,000, and 100,000
    for --model smollm2 (a few minutes on 2 cores)."""
    eval_tokens: int = 8192
    """Held-out tokens for the final FVU and L0 (collected before the training tokens)."""
    model_batch: int = 32
    """Windows per model forward pass while collecting activations."""
    exclude_special_tokens: bool = True
    """Leave out the activations at special tokens ([CLS], [SEP], <s>, a prepended BOS); padding is always left out."""
    sink_factor: float = 4.0
    """Leave out attention sinks: tokens whose activation norm exceeds this multiple of the batch's median
    norm (training, the scale and the metrics); 0 keeps them. The run reports how many were left out."""
    normalize: bool = True
    """Scale activations so their mean squared norm is d; the scale is saved with the SAE."""
    cache_dir: Optional[str] = None
    """Write activations here as sharded safetensors and stream them from disk; reused when it matches this run."""
    cache_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Storage dtype of the collected activations."""
    shard_tokens: int = 32768
    """Rows (tokens) per activation shard."""
    group_shards: int = 4
    """Shards shuffled together (and held in memory) at a time while streaming."""
    device: Optional[str] = None
    """Device for the model and the SAE; default: cuda when available, else cpu."""

    # ---------------------------------------------------------------- the SAE
    activation: Literal["topk", "batchtopk", "relu", "jumprelu"] = "topk"
    """Sparsity mechanism of the SAE."""
    n_latents: Optional[int] = None
    """Dictionary size; default: expansion * d."""
    expansion: int = 8
    """Dictionary size as a multiple of the activation width (when --n-latents is not given)."""
    k: int = 32
    """Active latents per token (topk; batchtopk: on average)."""
    l1_coeff: float = 5.0
    """relu: weight of the decoder-norm-weighted L1 penalty."""
    l0_coeff: float = 1.0
    """jumprelu: weight of the L0 penalty."""
    sparsity_warmup: float = 0.05
    """relu, jumprelu: fraction of the steps over which the sparsity coefficient ramps up linearly from 0."""
    k_aux: Optional[int] = None
    """AuxK: dead latents used per token to model the residual (default d // 2; 0 turns AuxK off)."""
    aux_coeff: float = 1 / 32
    """AuxK: weight of the auxiliary loss."""
    dead_tokens: int = 100_000
    """A latent that has not fired for this many training tokens counts as dead (the dead fraction and AuxK)."""
    matryoshka: Optional[str] = None
    """topk, batchtopk: train a Matryoshka SAE with these cumulative prefix widths, comma-separated, the last =
    the number of latents (e.g. 128,512,3072; SAELens' matryoshka_widths). The loss sums every prefix's FVU; the
    final metrics give each prefix's held-out FVU. All prefixes come from one decode; the step is fused."""
    transcode: bool = False
    """Train a transcoder: read each --layer module's input and predict its output (sparsify's convention: the
    hookpoint names the module; e.g. --layer model.layers.15.mlp). Both ends come from one model forward and are
    cached together; each gets its own activation scale. The encoder reads x itself (no b_dec), W_dec starts at
    0 and keeps no unit norm, as in sparsify; the loss is the target's FVU plus AuxK on its residual."""
    skip_connection: bool = False
    """With --transcode: add a learned linear skip term W_skip x (W_skip (d_out, d_in), zero at init)."""

    # ---------------------------------------------------------------- optimisation
    lr: float = 1e-3
    """Adam learning rate (fused Adam where torch has it)."""
    warmup_steps: int = 50
    """Steps of linear learning-rate warmup from 0."""
    lr_decay: Literal["linear", "cosine", "none"] = "linear"
    """Shape of the learning-rate decay to 0 at the end."""
    decay_frac: float = 0.2
    """Fraction of the steps, at the end, over which the learning rate decays to 0."""
    batch_tokens: int = 1024
    """Tokens per optimizer step."""
    grad_accum: int = 1
    """Micro-batches per step (each batch_tokens / grad_accum tokens); same step, less memory."""
    epochs: float = 4.0
    """Passes over the collected activations (ignored when --steps is given)."""
    steps: Optional[int] = None
    """Optimizer steps; default: epochs * collected tokens / batch_tokens."""
    seed: int = 0
    """Seed of the SAE initialisation and the data order."""
    backend: Optional[str] = None
    """Kernel backend (reference, torch, cpu, triton); default: the fastest for the device."""
    fused_step: bool = True
    """Run each step as one fused pass (sae_fast.optim.FusedAdam: encoder, latent-sorted backward, Adam and the
    decoder constraints, no (n, d) gradients) where a kernel applies: grad_accum 1 on the cpu backend in fp32 or
    the triton backend (CUDA, bf16 autocast too). Elsewhere, or with --no-fused-step: backward, torch's Adam,
    then the decoder constraints. Same Adam state, so a run resumes across the two."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """SAE compute dtype: bf16 autocast over fp32 master weights (weights, gradients and Adam stay fp32), or
    fp32; auto: bf16 on CUDA, fp32 elsewhere. The held-out evaluation runs in fp32."""

    # ---------------------------------------------------------------- past one device (under torchrun)
    distributed: Literal["none", "data", "latent", "layers"] = "none"
    """Under torchrun: data (every rank encodes its part of each batch; the same steps as one process), latent
    (every rank owns n / world latents; the top-k merged across ranks), layers (every rank trains its own
    hooked layers' SAEs); none: one process."""
    dist_timeout: int = 1800
    """Seconds a rank waits for the others at a collective before failing (a dead rank ends the run with an error)."""

    # ---------------------------------------------------------------- output
    out: str = "sae-fast-out"
    """Run folder: checkpoints/, sae/<layer>/, metrics.jsonl, curves.png, summary.json; one run at a time
    (a second run in it fails at once)."""
    export: str = "none"
    """Also write the final SAEs as saelens or sparsify (topk only) folders, export/<format>/<layer>/, with
    the activation scale folded into the weights so they read raw model activations; none: skip."""
    checkpoint_every: int = 200
    """Steps between checkpoints (one is always written at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept in the run folder (older ones are deleted)."""
    log_every: int = 10
    """Steps between metrics.jsonl rows."""
    resume: bool = False
    """Continue from the run folder's newest intact checkpoint (checksums and values checked; a damaged one
    is skipped, saying why) on the same trajectory as an uninterrupted run; a finished run says so."""
    plot: bool = True
    """Write curves.png (needs matplotlib)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self):
        """Each value on its own (an error names the --option); the machine's side is train/preflight.py."""
        positive = ("ctx_len", "model_batch", "shard_tokens", "group_shards", "expansion", "k",
                    "dead_tokens", "batch_tokens", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every",
                    "dist_timeout")
        for name in positive + ("n_latents", "steps", "max_tokens"):
            v = getattr(self, name)
            if name in positive or v is not None:
                _check_int(name, v, 1)
        _check_int("eval_tokens", self.eval_tokens, 0)
        _check_int("warmup_steps", self.warmup_steps, 0)
        if self.k_aux is not None:
            _check_int("k_aux", self.k_aux, 0, " (0 turns AuxK off)")
        _check_number("sink_factor", self.sink_factor)  # 0 keeps attention sinks
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"--activation must be one of {ACTIVATIONS}; got {self.activation!r}")
        if self.batch_tokens % self.grad_accum:
            raise ValueError(f"--batch-tokens {self.batch_tokens} must be divisible by --grad-accum {self.grad_accum}")
        for name in ("lr", "epochs"):  # finite: --lr inf diverges at once, --epochs inf never ends
            _check_number(name, getattr(self, name), positive=True)
        for name in ("l1_coeff", "l0_coeff", "aux_coeff"):
            _check_number(name, getattr(self, name))
        if self.n_latents is not None and self.activation in ("topk", "batchtopk") and self.k > self.n_latents:
            raise ValueError(f"--k {self.k} is more than --n-latents {self.n_latents}")
        for name in ("decay_frac", "sparsity_warmup"):
            _check_number(name, getattr(self, name))
            if getattr(self, name) > 1:
                raise ValueError(f"{_flag(name)} must be in [0, 1]; got {getattr(self, name)}")
        if self.lr_decay not in ("linear", "cosine", "none"):
            raise ValueError(f"--lr-decay must be linear, cosine or none; got {self.lr_decay!r}")
        if self.export not in ("none", "saelens", "sparsify"):
            raise ValueError(f"--export must be none, saelens or sparsify; got {self.export!r}")
        if self.export == "sparsify" and self.activation != "topk":
            raise ValueError(f"--export sparsify needs --activation topk (sparsify stores top-k SAEs only); "
                             f"got {self.activation!r}")
        if self.distributed not in ("none", "data", "latent", "layers"):
            raise ValueError(f"--distributed must be none, data, latent or layers; got {self.distributed!r}")
        if self.matryoshka is not None:
            _ = self.matryoshka_widths  # parses and checks it
        for name in ("transcode", "skip_connection"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{_flag(name)} must be true or false; got {getattr(self, name)!r}")
        if self.skip_connection and not self.transcode:
            raise ValueError("--skip-connection needs --transcode (a skip connection maps a module's input to its output)")
        if self.transcode and self.matryoshka is not None:
            raise ValueError("--transcode with --matryoshka is not supported; drop one of them")
        if self.transcode and self.export == "saelens" and self.activation == "topk":
            raise ValueError("--export saelens with --transcode needs --activation relu, jumprelu or batchtopk: "
                             "SAELens has no top-k transcoder (--export sparsify takes top-k ones)")
        if self.transcode and self.distributed in ("data", "latent"):
            raise ValueError(f"--transcode does not run under --distributed {self.distributed} yet")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"--dtype must be auto, fp32 or bf16; got {self.dtype!r}")
        if self.cache_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--cache-dtype must be float32, bfloat16 or float16; got {self.cache_dtype!r}")
        for name in ("out", "model", "layer", "corpus", "cache_dir", "device", "backend"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ValueError(f"{_flag(name)} must be a non-empty string; got {v!r}")

    @property
    def matryoshka_widths(self) -> Optional[list[int]]:
        """--matryoshka as a list of ints (checked here except against the layer's number of latents), or None."""
        if self.matryoshka is None:
            return None
        if self.activation not in ("topk", "batchtopk"):
            raise ValueError(f"--matryoshka needs --activation topk or batchtopk; got {self.activation!r}")
        if self.distributed == "latent":
            raise ValueError("--matryoshka does not run under --distributed latent yet")
        try:
            m = self.matryoshka
            widths = [int(w) for w in (m.split(",") if isinstance(m, str) else m)]  # a list from Python too
        except (TypeError, ValueError):
            raise ValueError(f"--matryoshka must be comma-separated integers such as 128,512,3072; "
                             f"got {self.matryoshka!r}") from None
        if widths[0] < 1 or any(b <= a for a, b in zip(widths, widths[1:])):
            raise ValueError(f"--matryoshka widths must be positive and strictly increasing; got {self.matryoshka!r}")
        if self.n_latents is not None and widths[-1] != self.n_latents:
            raise ValueError(f"--matryoshka's last width must be --n-latents {self.n_latents}; got {self.matryoshka!r}")
        return widths

    @property
    def token_budget(self) -> int:
        """max_tokens, or its default for the model (a 135M causal LM is ~10x slower per token than MiniLM)."""
        return self.max_tokens or (100_000 if self.model == "smollm2" else 300_000)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_int(name: str, v, lo: int, note: str = "") -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        what = "a positive integer" if lo == 1 else f"an integer >= {lo}"
        raise ValueError(f"{_flag(name)} must be {what}{note}; got {v!r}")


def _check_number(name: str, v, positive: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{_flag(name)} must be a finite number {'> 0' if positive else '>= 0'}; got {v!r}")


# ---------------------------------------------------------------------------- dataclass -> argparse
def field_docs(cls) -> dict[str, str]:
    """Each field's docstring (the string literal right below it in the class body)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) \
                and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _arg_type(tp):
    """(type callable, choices) for an annotation: int, float, str, Optional[...] and Literal[...]."""
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        return type(choices[0]), choices
    return tp, None


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--flag-name`` per field; bools get ``--flag/--no-flag``; help = the field's docstring."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        doc = docs.get(f.name, "")
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f"{doc} (default: {'on' if f.default else 'off'})")
            continue
        tp, choices = _arg_type(hints[f.name])
        shown = "" if f.default is None else f" (default: {f.default})"  # None: the docstring says what happens
        parser.add_argument(flag, dest=f.name, type=tp, choices=choices, default=f.default,
                            metavar=None if choices else f.name.upper(), help=doc + shown)


def config_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
