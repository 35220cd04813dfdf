"""SAEConfig: an SAE's shape, activation, losses' weights and architecture (Matryoshka prefixes,
transcoders), each field checked at construction so a bad argument or cfg.json fails naming the field;
and ConfigShape, the properties that every module holding one derives from it."""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Literal, Optional

from .checks import check_widths

Activation = Literal["topk", "batchtopk", "relu", "jumprelu"]
ACTIVATIONS = ("topk", "batchtopk", "relu", "jumprelu")


@dataclass
class SAEConfig:
    d_in: int
    """Width of the activations the SAE reads."""
    n_latents: int
    """Number of dictionary features."""
    activation: Activation = "topk"
    """Sparsity mechanism: topk | batchtopk | relu (with decoder-norm-weighted L1) | jumprelu."""
    k: int = 32
    """Active latents per token for topk; average per token for batchtopk."""
    l1_coeff: float = 5.0
    """relu: weight of the L1 penalty sum_i f_i ||W_dec_i||."""
    l0_coeff: float = 1.0
    """jumprelu: weight of the L0 penalty."""
    jumprelu_bandwidth: float = 1e-3
    """jumprelu: width of the straight-through estimator's rectangle kernel."""
    jumprelu_init_threshold: float = 1e-3
    """jumprelu: initial per-latent threshold."""
    k_aux: Optional[int] = None
    """AuxK: dead latents used to model the residual per token (default d_in // 2; 0 turns AuxK off)."""
    aux_coeff: float = 1 / 32
    """AuxK: weight of the auxiliary loss."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many training tokens counts as dead."""
    matryoshka: Optional[list[int]] = None
    """topk/batchtopk: cumulative prefix widths [m_1, ..., n] (SAELens' matryoshka_widths); the loss sums
    every prefix's FVU (see reference.py). None: a plain SAE."""
    transcode: bool = False
    """A transcoder: reads a module's input x (d_in) and predicts its output y (d_out), ``sae(x, target=y)``.
    Its encoder reads x itself, with no b_dec subtracted (b_dec is in the output space), and W_dec starts at
    zero with no unit-norm constraint: sparsify's convention (SparseCoder, transcode=True). Math in reference.py."""
    d_out: Optional[int] = None
    """Transcoders: width of the predicted output (default d_in; an SAE's output is its input)."""
    skip_connection: bool = False
    """Add a learned linear skip term ``x @ W_skip.T``, W_skip (d_out, d_in) zero at init (sparsify's
    skip_connection, SAELens' SkipTranscoder)."""

    def __post_init__(self):
        # Every field checked here, so a bad cfg.json or argument fails at construction naming the field;
        # numpy integers are integers (stored as int), 2.5 and True are not.
        self.d_out = self.d_in if self.d_out is None else self.d_out
        for name in ("d_in", "n_latents", "k", "dead_tokens", "d_out") + (("k_aux",) if self.k_aux is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must be an int; got {type(v).__name__} {v!r}")
            setattr(self, name, int(v))
        for name in ("d_in", "n_latents", "dead_tokens", "d_out"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int; got {getattr(self, name)!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}; got {self.activation!r}")
        if self.activation in ("topk", "batchtopk") and not 1 <= self.k <= self.n_latents:
            raise ValueError(f"k must be between 1 and n_latents={self.n_latents}; got {self.k}")
        if self.k_aux is None:
            self.k_aux = self.d_in // 2
        if self.k_aux < 0:
            raise ValueError(f"k_aux must be >= 0; got {self.k_aux}")
        for name in ("l1_coeff", "l0_coeff", "aux_coeff", "jumprelu_bandwidth", "jumprelu_init_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise TypeError(f"{name} must be a finite number; got {type(v).__name__} {v!r}")
            setattr(self, name, float(v))
        for name in ("l1_coeff", "l0_coeff", "aux_coeff"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.jumprelu_bandwidth <= 0 or self.jumprelu_init_threshold <= 0:
            raise ValueError("jumprelu_bandwidth and jumprelu_init_threshold must be > 0")
        if self.matryoshka is not None:
            self.matryoshka = check_widths(self.matryoshka, self.n_latents, self.activation)
        for name in ("transcode", "skip_connection"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool; got {getattr(self, name)!r}")
        if self.d_out != self.d_in and not self.transcode:
            raise ValueError(f"d_out={self.d_out} differs from d_in={self.d_in}, which only a transcoder "
                             "(transcode=True) can do")
        if self.transcode and self.matryoshka is not None:
            raise ValueError("matryoshka transcoders are not supported; use matryoshka=None with transcode=True")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SAEConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class ConfigShape:
    """The shape and decoder constraint of a module that holds its SAEConfig as ``self.cfg``: the
    SparseAutoencoder, and the distributed wrappers (which report the whole SAE's)."""

    cfg: SAEConfig

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    @property
    def d_out(self) -> int:
        return self.cfg.d_out

    @property
    def unit_norm_decoder(self) -> bool:
        """TopK/BatchTopK SAEs keep unit-norm decoder rows; transcoders do not (their W_dec carries the
        output's scale, as in sparsify)."""
        return self.cfg.activation in ("topk", "batchtopk") and not self.cfg.transcode
