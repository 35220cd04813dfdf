"""SAELens folders: ``cfg.json`` + ``sae_weights.safetensors`` with W_enc (d, n), b_enc, W_dec (n, d), b_dec
(+ ``threshold`` for jumprelu, ``topk_threshold`` for batchtopk and matryoshka_batchtopk training
checkpoints); cfg.json names the ``architecture``. A ``matryoshka_batchtopk`` training checkpoint loads as a
Matryoshka BatchTopK SAE (``matryoshka`` = its ``matryoshka_widths``, the same cumulative convention, d_sae
appended when missing, as SAELens does); its ``use_matryoshka_aux_loss`` is a training option with no
counterpart (sae-fast's BatchTopK trains without AuxK) and is not kept. Saved, a Matryoshka BatchTopK SAE
is SAELens' inference form, JumpReLU with the learned threshold, as SAELens saves it.

SAELens options with no counterpart in ``SparseAutoencoder`` are folded into the weights on load (in at
least float32, then cast; weights no fold touches are kept bit for bit): ``apply_b_dec_to_input=False``,
``rescale_acts_by_decoder_norm``, the activation scaler of a training checkpoint (``normalize_activations``
expected_average_only_in or covariance_whitening). So the loaded SAE maps raw activations to the same
codes and reconstructions as SAELens does."""
from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import torch

from ..folders import (
    FolderFormat,
    atomic_dir_write,
    config_and_weights,
    no_leftovers,
    parse_dtype,
    read_json,
    read_tensors,
    register_format,
    take,
    write_weights_and_config,
)
from ..sae import SAEConfig, SparseAutoencoder
from .fold import fold_activation_scale

SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_SCALER_FILE = "activation_scaler.json"
SAELENS_WHITENING_FILE = "activation_whitening.safetensors"
# cfg.json schema we write for SAELens: the 6.x layout (older files are converted on load, as SAELens does).
SAELENS_SCHEMA_VERSION = "6.0.0"

_SAELENS_ARCHS = ("standard", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk")
_BATCH_TOPK = ("batchtopk", "matryoshka_batchtopk")
# SAELens' transcoder classes (sae_lens.saes.transcoder): ReLU or JumpReLU, with or without W_skip.
_TRANSCODER_ARCHS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")


def _saelens_pre6(cfg: dict) -> dict:
    """SAELens < 6 configs (no metadata version): the renames and defaults SAELens itself applies."""
    cfg = dict(cfg)
    act = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    cfg.setdefault("apply_b_dec_to_input", True)
    if "architecture" not in cfg:
        cfg["architecture"] = "standard"
        k = (cfg.get("activation_fn_kwargs") or {}).get("k")
        if act == "topk" and k is not None:
            cfg["architecture"], cfg["k"] = "topk", k
        elif act != "relu":
            raise ValueError(f"unsupported SAELens activation_fn {act!r} (supported: relu, topk)")
    norm = cfg.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:
        cfg["normalize_activations"] = "expected_average_only_in" if norm else "none"
    return cfg


def _saelens_version(cfg: dict):
    v = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    if not v:
        return None
    m = re.match(r"(\d+)", str(v))
    return int(m.group(1)) if m else None


def _saelens_scaler(path: Path, norm: str, norm_scaling_factor, d: int):
    """(scaling factor or None, (mean, M, M^-1) or None) of the activation scaler the SAE was trained with."""
    scale = whitening = None
    scaler_path = path / SAELENS_SCALER_FILE
    scaler = read_json(scaler_path) if scaler_path.is_file() else {}
    if norm == "expected_average_only_in":
        scale = norm_scaling_factor if norm_scaling_factor is not None else scaler.get("scaling_factor")
        if scale is None:
            warnings.warn(f"{path}: normalize_activations='expected_average_only_in' but no scaling factor "
                          f"({SAELENS_SCALER_FILE} or norm_scaling_factor=); the SAE expects inputs already "
                          "multiplied by it, as in SAELens", stacklevel=3)
    elif norm == "covariance_whitening":
        wpath = path / SAELENS_WHITENING_FILE
        if wpath.is_file():
            t = read_tensors(wpath)
            whitening = tuple(take(t, k, s, wpath) for k, s in
                              (("mean", (d,)), ("matrix", (d, d)), ("inverse_matrix", (d, d))))
        else:
            warnings.warn(f"{path}: normalize_activations='covariance_whitening' but no {SAELENS_WHITENING_FILE}; "
                          "the SAE expects whitened inputs, as in SAELens", stacklevel=3)
        scale = scaler.get("scaling_factor")
    elif norm in ("constant_norm_rescale", "layer_norm"):
        raise ValueError(f"{path}: normalize_activations={norm!r} rescales every token by its own norm at run "
                         "time, which cannot be folded into fixed weights; sae-fast does not support it")
    elif norm != "none":
        raise ValueError(f"{path}: unknown normalize_activations {norm!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{path}: activation scaling factor must be a positive number; got {scale!r}")
    return scale, whitening


def load_saelens(path, device=None, dtype=None, norm_scaling_factor: float | None = None):
    """Load a SAELens SAE folder (``cfg.json`` + ``sae_weights.safetensors``): architectures standard (ReLU),
    topk, jumprelu, and batchtopk / matryoshka_batchtopk training checkpoints; inference saves and training
    checkpoints.

    SAELens options are folded into the weights so the result takes raw activations: apply_b_dec_to_input,
    rescale_acts_by_decoder_norm, and ``normalize_activations`` expected_average_only_in (factor from
    ``norm_scaling_factor=`` or the checkpoint's activation_scaler.json) / covariance_whitening (from
    activation_whitening.safetensors). ``reshape_activations='hook_z'`` SAEs take heads flattened to d_in."""
    path, cfg_path, weights_path, cfg = config_and_weights(path, SAELENS_WEIGHTS_FILE, "a SAELens")
    if (_saelens_version(cfg) or 0) < 6:
        cfg = _saelens_pre6(cfg)
    arch = cfg.get("architecture")
    if arch in _TRANSCODER_ARCHS:
        return _load_saelens_transcoder(cfg, cfg_path, weights_path, arch, device, dtype)
    if arch not in _SAELENS_ARCHS:
        raise ValueError(f"{cfg_path}: unsupported SAELens architecture {arch!r}; "
                         f"supported: {', '.join(_SAELENS_ARCHS + _TRANSCODER_ARCHS)}")
    try:
        d, n = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path} must give integer d_in and d_sae") from e
    norm = cfg.get("normalize_activations", "none")
    scale, whitening = _saelens_scaler(path, norm, norm_scaling_factor, d)

    t = read_tensors(weights_path)
    file_dtype = t["W_enc"].dtype if "W_enc" in t else torch.float32
    W_enc = take(t, "W_enc", (d, n), weights_path, "d_in, d_sae").T  # -> (n, d)
    b_enc = take(t, "b_enc", (n,), weights_path, "d_sae")
    W_dec = take(t, "W_dec", (n, d), weights_path, "d_sae, d_in")
    b_dec = take(t, "b_dec", (d,), weights_path, "d_in")
    # Folds run in fp32 (fp64 files: fp64), not fp64 throughout: 16 bytes per weight of a large SAE is too
    # much. bf16/fp16 -> fp32 -> back is lossless, so weights no fold touches come out bit for bit.
    work = torch.promote_types(file_dtype, torch.float32)
    W_enc, b_enc, W_dec, b_dec = (w.to(work) for w in (W_enc, b_enc, W_dec, b_dec))

    # Old SAELens: decode used (acts * finetuning_scaling_factor) @ W_dec; all-ones files carry no scaling.
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name in t:
            W_dec = W_dec * take(t, name, (n,), weights_path, "d_sae").to(work)[:, None]
    if arch in ("topk", *_BATCH_TOPK) and cfg.get("rescale_acts_by_decoder_norm", False):
        # Scores were multiplied by ||W_dec_i|| before the selection and codes divided by it before decoding.
        norms = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms.clamp_min(1e-8)[:, None]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + W_enc @ b_dec  # SAELens encodes x, sae-fast encodes x - b_dec
    if whitening is not None:  # the SAE saw z = (x - mean) @ M and emitted x_hat = z_hat @ M^-1 + mean
        mean, M, M_inv = (w.to(work) for w in whitening)
        W_enc, W_dec, b_dec = W_enc @ M.T, W_dec @ M_inv, b_dec @ M_inv + mean
    if scale is not None:  # the SAE saw x * scale and its output was divided by scale
        W_enc, W_dec, b_dec = W_enc * scale, W_dec / scale, b_dec / scale

    fields = {"d_in": d, "n_latents": n}
    extra = {}
    if arch == "standard":
        fields.update(activation="relu", l1_coeff=cfg.get("l1_coefficient", 5.0))
    elif arch in ("topk", *_BATCH_TOPK):
        k = cfg.get("k", 100)
        if not (isinstance(k, (int, float)) and float(k).is_integer()):
            raise ValueError(f"{cfg_path}: k must be a whole number for sae-fast; got {k!r}")
        fields.update(activation="topk" if arch == "topk" else "batchtopk", k=int(k))
        if arch == "matryoshka_batchtopk":
            widths = cfg.get("matryoshka_widths")
            if not isinstance(widths, list) or not widths:
                raise ValueError(f"{cfg_path}: a matryoshka_batchtopk SAE needs a non-empty list matryoshka_widths; "
                                 f"got {widths!r}")
            fields["matryoshka"] = widths if widths[-1] == n else [*widths, n]  # SAELens appends d_sae too
        if arch in _BATCH_TOPK:
            thr = t.pop("topk_threshold", None)
            extra["threshold"] = torch.tensor(0.0 if thr is None else float(thr), dtype=torch.float32)
    else:  # jumprelu: threshold (n,), or log_threshold in older checkpoints
        if "threshold" in t:
            theta = take(t, "threshold", (n,), weights_path, "d_sae").to(work)
        else:
            theta = take(t, "log_threshold", (n,), weights_path, "d_sae").to(work).exp()
        # SAELens: relu(p) * (p > threshold); a threshold <= 0 acts as 0, and log(0) = -inf keeps that exact.
        extra_weights = {"log_threshold": theta.clamp_min(0).log()}
        fields.update(activation="jumprelu")
        for ours, theirs in (("l0_coeff", "l0_coefficient"), ("jumprelu_bandwidth", "jumprelu_bandwidth")):
            if theirs in cfg:
                fields[ours] = cfg[theirs]
    no_leftovers(t, weights_path, f"a SAELens {arch} SAE")
    try:
        sae_cfg = SAEConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    weights = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if arch == "jumprelu":
        weights.update(extra_weights)
    dtype = parse_dtype(dtype if dtype is not None else cfg.get("dtype"), file_dtype)
    return SparseAutoencoder.from_weights(sae_cfg, weights, device, dtype, buffers=extra)


def _load_saelens_transcoder(cfg: dict, cfg_path: Path, weights_path: Path, arch: str, device, dtype):
    """SAELens' Transcoder / SkipTranscoder / JumpReLU(Skip)Transcoder: ``relu(x @ W_enc + b_enc)`` (JumpReLU:
    times ``p > threshold``) decoded into d_out, ``+ x @ W_skip.T``; the encoder never subtracts b_dec
    (SAELens refuses apply_b_dec_to_input for transcoders), as sae-fast's transcoders do."""
    try:
        d, n, d_out = int(cfg["d_in"]), int(cfg["d_sae"]), int(cfg["d_out"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path} must give integer d_in, d_sae and d_out for a SAELens {arch}") from e
    if cfg.get("apply_b_dec_to_input", False):
        raise ValueError(f"{cfg_path}: apply_b_dec_to_input is true, which SAELens refuses for transcoders")
    if cfg.get("normalize_activations", "none") != "none":
        raise ValueError(f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r} on a transcoder: "
                         "sae-fast loads SAELens transcoders trained on raw activations only")
    t = read_tensors(weights_path)
    file_dtype = t["W_enc"].dtype if "W_enc" in t else torch.float32
    weights = {"W_enc": take(t, "W_enc", (d, n), weights_path, "d_in, d_sae").T.contiguous(),
               "b_enc": take(t, "b_enc", (n,), weights_path, "d_sae"),
               "W_dec": take(t, "W_dec", (n, d_out), weights_path, "d_sae, d_out"),
               "b_dec": take(t, "b_dec", (d_out,), weights_path, "d_out")}
    skip = "skip" in arch
    if skip:
        weights["W_skip"] = take(t, "W_skip", (d_out, d), weights_path, "d_out, d_in")
    fields = {"d_in": d, "n_latents": n, "d_out": d_out, "transcode": True, "skip_connection": skip,
              "activation": "relu"}
    if arch.startswith("jumprelu"):
        theta = take(t, "threshold", (n,), weights_path, "d_sae")
        # relu(p) * (p > threshold): a threshold <= 0 acts as 0, and log(0) = -inf keeps that exact.
        weights["log_threshold"] = theta.to(torch.promote_types(theta.dtype, torch.float32)).clamp_min(0).log()
        fields["activation"] = "jumprelu"
    no_leftovers(t, weights_path, f"a SAELens {arch}")
    try:
        sae_cfg = SAEConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    dtype = parse_dtype(dtype if dtype is not None else cfg.get("dtype"), file_dtype)
    return SparseAutoencoder.from_weights(sae_cfg, weights, device, dtype)


def save_saelens(sae, path, metadata: dict | None = None, act_scale: float | None = None,
                 target_scale: float | None = None) -> Path:
    """Write ``sae`` as a SAELens inference SAE (``cfg.json`` + ``sae_weights.safetensors``), atomically.

    topk -> topk, relu -> standard, jumprelu -> jumprelu, batchtopk -> jumprelu with its learned global
    threshold (what SAELens itself saves for BatchTopK and Matryoshka BatchTopK; a Matryoshka SAE's prefix
    widths are a training setting and are not written). ``metadata`` (model_name, hook_name, ...) goes into
    the cfg's metadata. ``act_scale``: the activation scale the SAE was trained with, folded into the weights
    (``fold_activation_scale``) so the file reads raw model activations (a transcoder's target may have its own
    ``target_scale``). Transcoders: relu -> transcoder, jumprelu/batchtopk -> jumprelu_transcoder (``skip_``
    with W_skip); SAELens has no top-k transcoder."""
    act = sae.cfg.activation
    tc = sae.cfg.transcode
    if tc and act == "topk":
        raise ValueError("SAELens has no top-k transcoder class (only ReLU and JumpReLU transcoders); save this "
                         "transcoder as sparsify (save_sparsify), or train it with activation relu, jumprelu or batchtopk")
    if sae.cfg.skip_connection and not tc:
        raise ValueError("SAELens has skip connections on transcoders only; this SAE (transcode=False) has W_skip")
    if act_scale is not None:
        sae = fold_activation_scale(sae, act_scale, target_scale)
    sd = {k: v.detach() for k, v in sae.state_dict().items()}
    tensors = {"W_enc": sd["W_enc"].T, "b_enc": sd["b_enc"], "W_dec": sd["W_dec"], "b_dec": sd["b_dec"]}
    cfg = {"architecture": {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}[act]}
    if tc:  # relu -> transcoder, jumprelu and batchtopk (its learned threshold) -> jumprelu_transcoder
        cfg["architecture"] = ("jumprelu_" if act != "relu" else "") + ("skip_" if sae.cfg.skip_connection else "") \
            + "transcoder"
        cfg["d_out"] = sae.cfg.d_out
        if sae.cfg.skip_connection:
            tensors["W_skip"] = sd["W_skip"]
    if act == "topk":
        cfg.update(k=sae.cfg.k, rescale_acts_by_decoder_norm=False)
    elif act == "jumprelu":
        tensors["threshold"] = sd["log_threshold"].exp()
    elif act == "batchtopk":
        thr = float(sd["threshold"])
        if thr < 0:
            raise ValueError("this batchtopk SAE has no learned threshold yet (train it first): SAELens stores "
                             "BatchTopK SAEs as JumpReLU with that threshold")
        tensors["threshold"] = torch.full_like(sd["b_enc"], thr)
    dtype = sd["W_enc"].dtype
    cfg.update(d_in=sae.cfg.d_in, d_sae=sae.cfg.n_latents, dtype=str(dtype).removeprefix("torch."), device="cpu",
               apply_b_dec_to_input=not tc, normalize_activations="none", reshape_activations="none",
               metadata={"sae_lens_version": SAELENS_SCHEMA_VERSION, "sae_lens_training_version": None,
                         **(metadata or {})})
    tensors = {k: v.to(dtype).contiguous().cpu() for k, v in tensors.items()}

    return atomic_dir_write(path, lambda tmp: write_weights_and_config(tmp, tensors, SAELENS_WEIGHTS_FILE, cfg))


register_format(FolderFormat("saelens", "SAELens", SAELENS_WEIGHTS_FILE, claims=None, load=load_saelens))
