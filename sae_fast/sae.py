"""SparseAutoencoder: an nn.Module over the fused ops.

    p      = (x - b_dec) @ W_enc.T + b_enc            (B, n), never formed on fused backends
    f      = activation(p) as (values, indices)         topk | batchtopk | relu | jumprelu
    x_hat  = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec

Losses (all reported; ``loss`` is what to backpropagate):
    topk, batchtopk   loss = fvu + aux_coeff * aux_loss      (AuxK on dead latents, Gao et al. 2024)
    relu              loss = mse + l1_coeff * l1              (l1 = sum_i f_i ||W_dec_i||, Anthropic 2024)
    jumprelu          loss = mse + l0_coeff * l0              (L0 through a straight-through estimator)
``mse`` is the squared error summed over d and averaged over tokens; ``fvu`` normalises it by the
variance of x, so it is comparable across layers and models.

The sae-fast folder format is defined here too (``save_sae``; ``SparseAutoencoder.load`` reads it and,
through ``sae_fast.folders``, every format registered there: SAELens and sparsify from ``sae_fast.io``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from . import folders, ops, reference
from .checks import dead_bound
from .folders import (
    CONFIG_FILE,
    FolderFormat,
    atomic_dir_write,
    no_leftovers,
    parse_dtype,
    read_json,
    read_tensors,
    register_format,
    take,
    write_weights_and_config,
)
from .matryoshka import matryoshka_decode, prefix_fvus
from .sae_config import ACTIVATIONS, Activation, ConfigShape, SAEConfig  # noqa: F401 (SAEConfig and the names live here too)

FORMAT = "sae-fast"
WEIGHTS_FILE = "sae.safetensors"

class SAEOutput(NamedTuple):
    x_hat: Tensor      # (..., d_in) reconstruction
    values: Tensor     # (..., K) activations of the selected latents (0 = inactive)
    indices: Tensor    # (..., K) int32 latent ids
    loss: Tensor       # scalar to backpropagate
    mse: Tensor        # squared error per token
    fvu: Tensor        # fraction of variance unexplained
    aux_loss: Tensor   # AuxK loss (0 when unused)
    l1: Tensor         # decoder-norm-weighted L1 per token
    l0: Tensor         # mean active latents per token
    prefix_fvu: Optional[Tensor] = None  # (G,) FVU of each Matryoshka prefix (None for a plain SAE)


class SparseAutoencoder(ConfigShape, nn.Module):
    """A sparse autoencoder whose encode/decode run on sae_fast's fused kernels.

    >>> sae = SparseAutoencoder(d_in=768, n_latents=32768, activation="topk", k=32)
    >>> out = sae(x); out.loss.backward()
    """

    def __init__(self, d_in: int | None = None, n_latents: int | None = None, activation: Activation = "topk",
                 *, cfg: SAEConfig | None = None, device=None, dtype=None, seed: int | None = None, **kwargs):
        super().__init__()
        if cfg is None:
            cfg = SAEConfig(d_in=d_in, n_latents=n_latents, activation=activation, **kwargs)
        self.cfg = cfg
        n, d, d_out = self.cfg.n_latents, self.cfg.d_in, self.cfg.d_out
        factory = {"device": device, "dtype": dtype or torch.float32}
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        W = torch.randn(n, d, generator=gen, dtype=torch.float32)
        W /= W.norm(dim=1, keepdim=True).clamp_min(1e-12)
        # An SAE's decoder starts tied to the encoder; a transcoder's at zero, as sparsify's does.
        W_dec = torch.zeros(n, d_out) if self.cfg.transcode else W.clone()
        self.W_dec = nn.Parameter(W_dec.to(**factory))
        self.W_enc = nn.Parameter(W.to(**factory))
        self.b_enc = nn.Parameter(torch.zeros(n, **factory))
        self.b_dec = nn.Parameter(torch.zeros(d_out, **factory))
        if self.cfg.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d, **factory))
        if self.cfg.activation == "jumprelu":
            init = math.log(self.cfg.jumprelu_init_threshold)
            self.log_threshold = nn.Parameter(torch.full((n,), init, **factory))
        # Training state: tokens since each latent last fired (AuxK's dead set); BatchTopK's global threshold.
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.int64, device=device))
        self.register_buffer("threshold", torch.tensor(-1.0, device=device))
        self._dead_budget = -1  # dead_bound() reads the counters again once this many tokens are used up

    # ------------------------------------------------------------------ properties
    # d_in, n_latents, d_out, unit_norm_decoder: from cfg (ConfigShape)

    @property
    def dead_mask(self) -> Tensor:
        """(n,) bool: latents that have not fired for ``cfg.dead_tokens`` training tokens."""
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def _load_from_state_dict(self, *args, **kwargs):
        self._dead_budget = -1  # new counters: dead_bound() reads them again
        return super()._load_from_state_dict(*args, **kwargs)

    def dead_bound(self) -> int:
        """At most this many latents are dead until training has advanced a quarter of ``cfg.dead_tokens``
        more tokens: the counters grow by at most the tokens seen, so a latent dead by then counts at least
        dead_tokens * 3/4 now. One host read per such horizon (the triton backend sizes AuxK's dead rows with
        it, and checks it on the device)."""
        if getattr(self, "_dead_budget", -1) < 0:  # (a module pickled before this attribute: none)
            horizon = max(1, self.cfg.dead_tokens // 4)
            self._dead_bound = int((self.tokens_since_fired >= self.cfg.dead_tokens - horizon).sum())
            self._dead_budget = horizon
        return self._dead_bound

    # ------------------------------------------------------------------ encode / decode
    def _weights(self, x: Tensor):
        """(compute dtype, [W_enc, b_enc, W_dec, b_dec]). The compute dtype is autocast's when it is on,
        else the parameters' own. fp32 parameters under 16-bit autocast go to the ops as they are (master
        weights): no 16-bit copies of the weights, and their gradients come back in fp32 directly."""
        dtype = self.W_enc.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        return dtype, [self._as(getattr(self, n), dtype) for n in ("W_enc", "b_enc", "W_dec", "b_dec")]

    @staticmethod
    def _as(param: Tensor, dtype: torch.dtype) -> Tensor:
        return param if ops.is_master(param.dtype, dtype) else param.to(dtype)

    def _flatten(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.d_in:
            raise ValueError(f"x must have shape (..., d_in={self.d_in}); got shape {tuple(x.shape)}")
        return x.reshape(-1, self.d_in)

    def _encode2d(self, x: Tensor, W_enc, b_enc, b_dec, return_l0: bool = False):
        """(values, indices), plus JumpReLU's differentiable L0 when ``return_l0`` (None otherwise)."""
        cfg = self.cfg
        if cfg.activation == "jumprelu":
            theta = self._as(self.log_threshold.exp(), x.dtype)
            out = ops.jumprelu_encode(x, W_enc, b_enc, b_dec, theta, cfg.jumprelu_bandwidth, return_l0=True)
            return out if return_l0 else out[:2]
        return self._encode_other(x, W_enc, b_enc, b_dec) + ((None,) if return_l0 else ())

    def _encode_other(self, x: Tensor, W_enc, b_enc, b_dec):
        cfg = self.cfg
        if cfg.activation == "topk":
            return ops.topk_encode(x, W_enc, b_enc, b_dec, cfg.k)
        if cfg.activation == "batchtopk":
            if self.training or self.threshold < 0:
                return ops.batch_topk_encode(x, W_enc, b_enc, b_dec, cfg.k)
            return ops.threshold_encode(x, W_enc, b_enc, b_dec, float(self.threshold))
        return ops.relu_encode(x, W_enc, b_enc, b_dec)

    def _encoder_bias(self, b_dec: Tensor) -> Tensor:
        """What the encoder subtracts from x: b_dec for an SAE, nothing (zeros) for a transcoder."""
        return b_dec.new_zeros(self.d_in) if self.cfg.transcode else b_dec

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values, indices) of the active latents for x (..., d_in); see reference.py for the layout."""
        lead = x.shape[:-1] if isinstance(x, Tensor) else ()
        x2 = self._flatten(x)
        dtype, (W_enc, b_enc, _, b_dec) = self._weights(x2)
        values, indices = self._encode2d(x2.to(dtype), W_enc, b_enc, self._encoder_bias(b_dec))
        return values.reshape(*lead, -1), indices.reshape(*lead, -1)

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """x_hat (..., d_out) from a sparse code (..., K): the dictionary part and b_dec (a skip connection's
        ``x @ W_skip.T`` needs x: ``forward`` and ``predict`` add it)."""
        lead = values.shape[:-1]
        dtype, (_, _, W_dec, b_dec) = self._weights(values)
        v2 = values.reshape(-1, values.shape[-1]).to(dtype)
        x_hat = ops.sparse_decode(v2, indices.reshape(v2.shape), W_dec, b_dec)
        return x_hat.reshape(*lead, self.d_out)

    def predict(self, x: Tensor) -> Tensor:
        """The output for x (..., d_in), no target needed: an SAE's reconstruction, a transcoder's prediction
        of its module's output (..., d_out), the skip term included."""
        values, indices = self.encode(x)
        y_hat = self.decode(values, indices)
        if self.cfg.skip_connection:
            dtype = self._weights(y_hat)[0]
            y_hat = y_hat + (x.to(dtype) @ self._as(self.W_skip, dtype).T).to(y_hat.dtype)
        return y_hat

    def pre_activations(self, x: Tensor) -> Tensor:
        """Dense (..., n) pre-activations: for inspection only (memory grows with n)."""
        x2 = self._flatten(x)
        p = reference.pre_activations(x2.to(self.W_enc.dtype), self.W_enc, self.b_enc, self._encoder_bias(self.b_dec))
        return p.reshape(*x.shape[:-1], self.n_latents)

    def _target(self, x2: Tensor, target) -> Tensor:
        """The (B, d_out) tensor the output is scored against: ``target`` for a transcoder, x for an SAE."""
        if not self.cfg.transcode:
            if target is not None:
                raise ValueError("target= is for transcoders (SAEConfig(transcode=True)); an SAE reconstructs x")
            return x2
        if not isinstance(target, Tensor):
            raise TypeError(f"a transcoder needs target= (the module's output, (..., d_out={self.d_out})); "
                            f"got {type(target).__name__}")
        if target.shape[-1:] != (self.d_out,) or target.numel() // self.d_out != x2.shape[0]:
            raise ValueError(f"target must have shape (..., d_out={self.d_out}) with x's leading shape; got "
                             f"{tuple(target.shape)} for x of {x2.shape[0]} rows")
        return target.reshape(-1, self.d_out)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, target: Tensor | None = None) -> SAEOutput:
        """Encode x, decode, and score the output against x (an SAE) or ``target`` (a transcoder: the
        hooked module's output, (..., d_out))."""
        cfg = self.cfg
        lead = x.shape[:-1] if isinstance(x, Tensor) else ()
        x2 = self._flatten(x)
        y2 = self._target(x2, target)
        dtype, (W_enc, b_enc, W_dec, b_dec) = self._weights(x2)
        b_in = self._encoder_bias(b_dec)
        xc = x2.to(dtype)
        zero = x2.new_zeros((), dtype=torch.float32)
        aux_loss = zero
        if cfg.activation == "topk":
            use_aux = self.training and cfg.k_aux > 0 and torch.is_grad_enabled()
            dead = self.dead_mask if use_aux else None
            k_aux = cfg.k_aux if use_aux else 0
            prefixes = None
            # A fixed AuxK width (no host read of the dead count); no dead latent at all zeroes the loss.
            with dead_bound(self.dead_bound if use_aux else None):
                if cfg.d_out == cfg.d_in:
                    # A transcoder's encoder bias is zero there; its b_dec is added after the decode.
                    res = ops.topk_sae(xc, W_enc, b_enc, W_dec, b_in, cfg.k, dead, k_aux, pad_aux=True,
                                       matryoshka=cfg.matryoshka)
                    values, indices, x_hat = res.values, res.indices, res.x_hat
                    prefixes = None if cfg.matryoshka is None else res.prefixes
                    aux_values, aux_indices = res.aux_values, res.aux_indices
                    if cfg.transcode:
                        x_hat = x_hat + b_dec.to(x_hat.dtype)
                elif k_aux:  # widths differ: encoder and decoder as separate ops (each with its latent-sorted backward)
                    values, indices, aux_values, aux_indices = ops.topk_encode_with_aux(
                        xc, W_enc, b_enc, b_in, cfg.k, dead, k_aux)
                else:
                    values, indices = ops.topk_encode(xc, W_enc, b_enc, b_in, cfg.k)
                    aux_values, aux_indices = values[:, :0], indices[:, :0]
            if cfg.d_out != cfg.d_in:
                x_hat = ops.sparse_decode(values, indices, W_dec, b_dec)
        else:
            values, indices, l0_soft = self._encode2d(xc, W_enc, b_enc, b_in, return_l0=True)
            if cfg.matryoshka is None:
                prefixes, x_hat = None, ops.sparse_decode(values, indices, W_dec, b_dec)
            else:  # every prefix from one decode pass; the last is the full reconstruction
                prefixes = matryoshka_decode(values, indices, W_dec, b_dec, cfg.matryoshka)
                x_hat = prefixes[-1]
        if cfg.skip_connection:
            x_hat = x_hat + xc @ self._as(self.W_skip, dtype).T
        if cfg.activation == "topk" and aux_values.shape[1]:
            residual = (y2 - x_hat).detach().float()
            e_hat = ops.sparse_decode(aux_values, aux_indices, W_dec, None).float()
            aux_loss = reference.fvu(e_hat, residual) * dead.any()

        xf, x_hat_f = y2.float(), x_hat.float()
        mse = reference.mse(x_hat_f, xf)
        l1 = ops.decoder_norm_l1(values, indices, W_dec)
        l0 = (values > 0).sum(-1).float().mean()
        prefix_fvu = None if prefixes is None else prefix_fvus(prefixes, xf)  # all prefixes in one reduction
        fvu = reference.fvu(x_hat_f, xf) if prefix_fvu is None else prefix_fvu[-1]
        if prefix_fvu is not None:
            loss = prefix_fvu.sum() + cfg.aux_coeff * aux_loss
        elif cfg.activation in ("topk", "batchtopk"):
            loss = fvu + cfg.aux_coeff * aux_loss
        elif cfg.activation == "relu":
            loss = mse + cfg.l1_coeff * l1
        else:
            loss = mse + cfg.l0_coeff * l0_soft.float()

        if self.training:
            self._update_training_state(values, indices)
        return SAEOutput(x_hat.reshape(*lead, self.d_out), values.reshape(*lead, -1), indices.reshape(*lead, -1),
                         loss, mse, fvu, aux_loss, l1, l0, prefix_fvu)

    @torch.no_grad()
    def _update_training_state(self, values: Tensor, indices: Tensor) -> None:
        """Dead-latent counters and BatchTopK's threshold, with scatters and selects: no host sync."""
        active = values > 0
        hits = torch.zeros_like(self.tokens_since_fired).scatter_add_(
            0, indices.reshape(-1).long(), active.reshape(-1).to(self.tokens_since_fired.dtype))
        self.tokens_since_fired.copy_(torch.where(hits > 0, 0, self.tokens_since_fired + values.shape[0]))
        self._dead_budget = getattr(self, "_dead_budget", -1) - values.shape[0]
        if self.cfg.activation == "batchtopk":
            # EMA of the smallest kept activation: the inference threshold (unchanged by a batch with none)
            m = torch.where(active, values, float("inf")).amin().float()
            ema = torch.where(self.threshold < 0, m, 0.99 * self.threshold + 0.01 * m)
            self.threshold.copy_(torch.where(torch.isfinite(m), ema, self.threshold))

    # ------------------------------------------------------------------ decoder constraints
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Scale every decoder row to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Remove the component of W_dec's gradient parallel to each decoder row (keeps unit norm to first
        order, so Adam's step is not spent on growing rows that are renormalised anyway)."""
        g = self.W_dec.grad
        if g is None:
            return
        W = self.W_dec
        coef = (g * W).sum(1, keepdim=True) / W.pow(2).sum(1, keepdim=True).clamp_min(1e-12)
        g -= coef * W

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_weights(cls, cfg: SAEConfig, weights: dict, device=None, dtype: torch.dtype = torch.float32,
                     buffers: dict | None = None) -> SparseAutoencoder:
        """An SAE holding ``weights`` (parameter name -> tensor, cast to ``dtype``), built without a
        throwaway random init. Buffers not in ``buffers`` (training state) get the module's defaults."""
        with torch.device("meta"):
            sae = cls(cfg=cfg, dtype=dtype)
        state = {k: v.to(dtype) for k, v in weights.items()}
        for name, buf in sae.named_buffers():
            if name not in state:
                fresh = torch.full((), -1.0) if name == "threshold" else torch.zeros(buf.shape, dtype=buf.dtype)
                state[name] = fresh
        state.update(buffers or {})
        state = {k: v.to(device if device is not None else "cpu").contiguous() for k, v in state.items()}
        sae.load_state_dict(state, assign=True)
        return sae

    def save(self, path) -> None:
        """Write ``sae.safetensors`` and ``cfg.json`` into the folder ``path`` (atomically)."""
        save_sae(self, path)

    @classmethod
    def load(cls, path, device=None, dtype=None, hookpoint: str | None = None) -> SparseAutoencoder:
        """Load a folder written by ``save``, or a SAELens or sparsify SAE folder (format detected from its
        files; see sae_fast.io). For a run folder with several hookpoints, name one with ``hookpoint=``."""
        sae = folders.load_sae(path, device=device, dtype=dtype, hookpoint=hookpoint)
        if isinstance(sae, dict):
            if len(sae) != 1:
                raise ValueError(f"{path} holds SAEs for several hookpoints ({', '.join(sae)}); pass hookpoint=, "
                                 "or use sae_fast.io.load_sae to get them all as a dict")
            (sae,) = sae.values()
        return sae


# ============================================================================ the sae-fast folder format
# sae.safetensors: W_enc (n, d), b_enc (n), W_dec (n, d), b_dec (d), the activation's extra tensors and
# the training buffers; cfg.json: SAEConfig plus "format": "sae-fast".
def save_sae(sae: SparseAutoencoder, path, metadata: dict | None = None) -> Path:
    """Write ``sae.safetensors`` + ``cfg.json`` (sae-fast format) into the folder ``path``, atomically.
    ``metadata`` (such as ``{"model": ..., "hook": ...}``, what ``sae-fast train`` records) goes into cfg.json."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
    cfg = {"format": FORMAT, **sae.cfg.to_dict(), **(metadata or {})}

    return atomic_dir_write(path, lambda tmp: write_weights_and_config(tmp, tensors, WEIGHTS_FILE, cfg))


def _load_sae_fast(path, device=None, dtype=None) -> SparseAutoencoder:
    path = Path(path)
    cfg_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{path} is not an SAE folder: expected {CONFIG_FILE} and {WEIGHTS_FILE} in it")
    cfg = read_json(cfg_path)
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a sae-fast config (format={cfg.get('format')!r})")
    try:
        sae_cfg = SAEConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    state = read_tensors(weights_path)
    n, d, d_out = sae_cfg.n_latents, sae_cfg.d_in, sae_cfg.d_out
    expected = {"W_enc": (n, d), "b_enc": (n,), "W_dec": (n, d_out), "b_dec": (d_out,)}
    if sae_cfg.activation == "jumprelu":
        expected["log_threshold"] = (n,)
    if sae_cfg.skip_connection:
        expected["W_skip"] = (d_out, d)
    weights = {k: take(state, k, shape, weights_path) for k, shape in expected.items()}
    buffers = {k: state.pop(k) for k in ("tokens_since_fired", "threshold") if k in state}
    for k, (shape, kind) in {"tokens_since_fired": ((n,), "int64"), "threshold": ((), "float")}.items():
        t = buffers.get(k)
        if t is not None and (tuple(t.shape) != shape or (t.dtype != torch.int64 if kind == "int64"
                                                          else not t.is_floating_point())):
            raise ValueError(f"tensor {k!r} in {weights_path} must be {kind} of shape {shape}; got {t.dtype} "
                             f"{tuple(t.shape)}")
    no_leftovers(state, weights_path, f"a sae-fast {sae_cfg.activation} SAE")
    dtype = parse_dtype(dtype, weights["W_enc"].dtype)
    return SparseAutoencoder.from_weights(sae_cfg, weights, device, dtype, buffers=buffers)


register_format(FolderFormat(FORMAT, FORMAT, WEIGHTS_FILE, claims=lambda cfg: cfg.get("format") == FORMAT,
                             load=_load_sae_fast))
