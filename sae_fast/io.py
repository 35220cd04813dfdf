"""Saving and loading SAEs: safetensors weights plus a ``cfg.json``; never pickle.

Three folder formats, told apart by their files (``detect_format``); ``load_sae`` reads any of them:

- sae-fast (own): ``sae.safetensors`` with W_enc (n, d), b_enc (n), W_dec (n, d), b_dec (d) and the
  activation's extra tensors; ``cfg.json`` holds ``SAEConfig`` plus ``"format": "sae-fast"``.
- SAELens: ``sae_weights.safetensors`` with W_enc (d, n), b_enc, W_dec (n, d), b_dec (+ ``threshold`` for
  jumprelu, ``topk_threshold`` for batchtopk training checkpoints); ``cfg.json`` with ``architecture``.
- sparsify (EleutherAI): ``sae.safetensors`` with encoder.weight (n, d), encoder.bias, W_dec (n, d), b_dec;
  ``cfg.json`` with k, num_latents / expansion_factor, d_in. A training run writes one such folder per
  hookpoint; loading the run folder gives ``{hookpoint: SAE}``.

Peer options with no counterpart in ``SparseAutoencoder`` are folded into the weights on load (in at least
float32, then cast; weights no fold touches are kept bit for bit): SAELens ``apply_b_dec_to_input=False``,
``rescale_acts_by_decoder_norm``, the activation scaler of a training checkpoint (``normalize_activations``
expected_average_only_in or covariance_whitening). So the loaded SAE maps raw activations to the same codes
and reconstructions as the peer does."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "sae-fast"
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_SCALER_FILE = "activation_scaler.json"
SAELENS_WHITENING_FILE = "activation_whitening.safetensors"
# cfg.json schema we write for SAELens: the 6.x layout (older files are converted on load, as SAELens does).
SAELENS_SCHEMA_VERSION = "6.0.0"

FORMATS = ("sae-fast", "saelens", "sparsify")


# ============================================================================ shared helpers
def _write_weights_and_config(folder: Path, tensors: dict, weights_file: str, cfg: dict, indent=2) -> None:
    """The two files of an SAE folder in every format: safetensors weights and a JSON config."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / weights_file))
    (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=indent) + "\n")


def _config_and_weights(path, weights_file: str, kind: str):
    """(folder, config path, weights path, parsed config) of a SAELens or sparsify folder; a clear error
    names the missing file."""
    path = _folder(path)
    cfg_path, weights_path = path / CONFIG_FILE, path / weights_file
    for f in (cfg_path, weights_path):
        if not f.is_file():
            raise FileNotFoundError(f"{path} is not {kind} SAE folder: missing {f.name}")
    return path, cfg_path, weights_path, _read_json(cfg_path)


def atomic_dir_write(path, write) -> Path:
    """Call ``write(tmp_dir)`` then move the finished folder into ``path``, so a crash never leaves a half
    written folder behind (an existing folder is replaced only after the new one is complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object; got {type(cfg).__name__}")
    return cfg


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on CPU (safetensors never runs code, unlike pickle)."""
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def _take(tensors: dict, name: str, shape: tuple, file: Path, alias: str | None = None) -> torch.Tensor:
    """Pop tensor ``name`` checking its shape; errors name the tensor, the file and the expected shape."""
    if name not in tensors:
        raise ValueError(f"{file} has no tensor {name!r} (has: {', '.join(sorted(tensors)) or 'none'})")
    t = tensors.pop(name)
    if not t.is_floating_point():
        raise ValueError(f"tensor {name!r} in {file} must be floating point; got dtype {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"tensor {name!r} in {file} has shape {tuple(t.shape)}; expected {tuple(shape)}"
                         + (f" ({alias})" if alias else ""))
    return t


def _no_leftovers(tensors: dict, file: Path, what: str) -> None:
    if tensors:
        raise ValueError(f"{file} has tensors this loader does not understand for {what}: "
                         f"{', '.join(sorted(tensors))}")


def _dtype(name, default: torch.dtype) -> torch.dtype:
    if name is None:
        return default
    if isinstance(name, torch.dtype):
        return name
    d = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype or its name; got {name!r}")
    return d


def _build(cfg, weights: dict, device, dtype: torch.dtype, extra_state: dict | None = None):
    """A SparseAutoencoder holding ``weights`` (cast to ``dtype``), built without a throwaway random init."""
    from .sae import SparseAutoencoder

    with torch.device("meta"):
        sae = SparseAutoencoder(cfg=cfg, dtype=dtype)
    state = {k: v.to(dtype) for k, v in weights.items()}
    for name, buf in sae.named_buffers():  # training state not in the file: the module's defaults
        if name not in state:
            fresh = torch.full((), -1.0) if name == "threshold" else torch.zeros(buf.shape, dtype=buf.dtype)
            state[name] = fresh
    state.update(extra_state or {})
    state = {k: v.to(device if device is not None else "cpu").contiguous() for k, v in state.items()}
    sae.load_state_dict(state, assign=True)
    return sae


def _folder(path) -> Path:
    """Accept the folder itself or a file inside it (cfg.json, the weights)."""
    path = Path(path)
    if path.is_file():
        return path.parent
    return path


def _natural_key(name: str):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


# ============================================================================ detection and the single entry
def detect_format(path) -> str:
    """'sae-fast', 'saelens' or 'sparsify' for an SAE folder (raises FileNotFoundError otherwise)."""
    path = _folder(path)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path} is not an SAE folder: expected {CONFIG_FILE} and {WEIGHTS_FILE} "
                                f"(sae-fast, sparsify) or {CONFIG_FILE} and {SAELENS_WEIGHTS_FILE} (SAELens) in it")
    if (path / SAELENS_WEIGHTS_FILE).is_file():
        return "saelens"
    if (path / WEIGHTS_FILE).is_file():
        return "sae-fast" if _read_json(cfg_path).get("format") == FORMAT else "sparsify"
    raise FileNotFoundError(f"{path} has {CONFIG_FILE} but no weights: expected {WEIGHTS_FILE} (sae-fast, "
                            f"sparsify) or {SAELENS_WEIGHTS_FILE} (SAELens)")


def _sae_subfolders(path: Path) -> list[Path]:
    if not path.is_dir():
        return []
    subs = [p for p in path.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file()
            and ((p / WEIGHTS_FILE).is_file() or (p / SAELENS_WEIGHTS_FILE).is_file())]
    return sorted(subs, key=lambda p: _natural_key(p.name))


def _load_folder_or_run(path, loader, hookpoint, **kwargs):
    """One SAE folder -> the SAE; a folder of SAE folders (a run, one per hookpoint) -> {name: SAE},
    or the one named by ``hookpoint``."""
    path = _folder(path)
    if hookpoint is not None:
        sub = path / hookpoint
        if not (sub / CONFIG_FILE).is_file():
            names = [p.name for p in _sae_subfolders(path)]
            raise FileNotFoundError(f"no SAE for hookpoint {hookpoint!r} in {path}; found: {', '.join(names) or 'none'}")
        return loader(sub, **kwargs)
    if (path / CONFIG_FILE).is_file() or not path.is_dir():
        return loader(path, **kwargs)
    subs = _sae_subfolders(path)
    if not subs:
        detect_format(path)  # raises the standard "not an SAE folder" error
    return {p.name: loader(p, **kwargs) for p in subs}


def load_sae(path, device=None, dtype=None, hookpoint: str | None = None):
    """Load an SAE folder in any supported format (sae-fast, SAELens, sparsify; detected from its files).

    A folder holding several SAE folders (a sparsify run: one per hookpoint) gives ``{name: SAE}``;
    ``hookpoint=`` picks one. ``dtype`` defaults to the stored one (SAELens: its cfg ``dtype``)."""
    def one(p, **kw):
        fmt = detect_format(p)
        if fmt == "saelens":
            return load_saelens(p, **kw)
        if fmt == "sparsify":
            return load_sparsify(p, **kw)
        return _load_own(p, **kw)

    return _load_folder_or_run(path, one, hookpoint, device=device, dtype=dtype)


# ============================================================================ own format
def save_sae(sae, path) -> Path:
    """Write ``sae.safetensors`` + ``cfg.json`` (sae-fast format) into the folder ``path``, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
    cfg = {"format": FORMAT, **sae.cfg.to_dict()}

    return atomic_dir_write(path, lambda tmp: _write_weights_and_config(tmp, tensors, WEIGHTS_FILE, cfg))


def _load_own(path, device=None, dtype=None):
    from .sae import SAEConfig

    path = Path(path)
    cfg_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{path} is not an SAE folder: expected {CONFIG_FILE} and {WEIGHTS_FILE} in it")
    cfg = _read_json(cfg_path)
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a sae-fast config (format={cfg.get('format')!r})")
    try:
        sae_cfg = SAEConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    state = _read_tensors(weights_path)
    n, d = sae_cfg.n_latents, sae_cfg.d_in
    expected = {"W_enc": (n, d), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}
    if sae_cfg.activation == "jumprelu":
        expected["log_threshold"] = (n,)
    weights = {k: _take(state, k, shape, weights_path) for k, shape in expected.items()}
    buffers = {k: state.pop(k) for k in ("tokens_since_fired", "threshold") if k in state}
    _no_leftovers(state, weights_path, f"a sae-fast {sae_cfg.activation} SAE")
    dtype = _dtype(dtype, weights["W_enc"].dtype)
    return _build(sae_cfg, weights, device, dtype, extra_state=buffers)


# ============================================================================ SAELens
_SAELENS_ARCHS = ("standard", "topk", "jumprelu", "batchtopk")


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
    scaler = _read_json(scaler_path) if scaler_path.is_file() else {}
    if norm == "expected_average_only_in":
        scale = norm_scaling_factor if norm_scaling_factor is not None else scaler.get("scaling_factor")
        if scale is None:
            warnings.warn(f"{path}: normalize_activations='expected_average_only_in' but no scaling factor "
                          f"({SAELENS_SCALER_FILE} or norm_scaling_factor=); the SAE expects inputs already "
                          "multiplied by it, as in SAELens", stacklevel=3)
    elif norm == "covariance_whitening":
        wpath = path / SAELENS_WHITENING_FILE
        if wpath.is_file():
            t = _read_tensors(wpath)
            whitening = tuple(_take(t, k, s, wpath) for k, s in
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
    topk, jumprelu, and batchtopk training checkpoints; inference saves and training checkpoints.

    SAELens options are folded into the weights so the result takes raw activations: apply_b_dec_to_input,
    rescale_acts_by_decoder_norm, and ``normalize_activations`` expected_average_only_in (factor from
    ``norm_scaling_factor=`` or the checkpoint's activation_scaler.json) / covariance_whitening (from
    activation_whitening.safetensors). ``reshape_activations='hook_z'`` SAEs take heads flattened to d_in."""
    from .sae import SAEConfig

    path, cfg_path, weights_path, cfg = _config_and_weights(path, SAELENS_WEIGHTS_FILE, "a SAELens")
    if (_saelens_version(cfg) or 0) < 6:
        cfg = _saelens_pre6(cfg)
    arch = cfg.get("architecture")
    if arch not in _SAELENS_ARCHS:
        raise ValueError(f"{cfg_path}: unsupported SAELens architecture {arch!r}; supported: {', '.join(_SAELENS_ARCHS)}")
    try:
        d, n = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path} must give integer d_in and d_sae") from e
    norm = cfg.get("normalize_activations", "none")
    scale, whitening = _saelens_scaler(path, norm, norm_scaling_factor, d)

    t = _read_tensors(weights_path)
    file_dtype = t["W_enc"].dtype if "W_enc" in t else torch.float32
    W_enc = _take(t, "W_enc", (d, n), weights_path, "d_in, d_sae").T  # -> (n, d)
    b_enc = _take(t, "b_enc", (n,), weights_path, "d_sae")
    W_dec = _take(t, "W_dec", (n, d), weights_path, "d_sae, d_in")
    b_dec = _take(t, "b_dec", (d,), weights_path, "d_in")
    # Folds run in fp32 (fp64 files: fp64), not fp64 throughout: 16 bytes per weight of a large SAE is too
    # much. bf16/fp16 -> fp32 -> back is lossless, so weights no fold touches come out bit for bit.
    work = torch.promote_types(file_dtype, torch.float32)
    W_enc, b_enc, W_dec, b_dec = (w.to(work) for w in (W_enc, b_enc, W_dec, b_dec))

    # Old SAELens: decode used (acts * finetuning_scaling_factor) @ W_dec; all-ones files carry no scaling.
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name in t:
            W_dec = W_dec * _take(t, name, (n,), weights_path, "d_sae").to(work)[:, None]
    if arch in ("topk", "batchtopk") and cfg.get("rescale_acts_by_decoder_norm", False):
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
    elif arch in ("topk", "batchtopk"):
        k = cfg.get("k", 100)
        if not (isinstance(k, (int, float)) and float(k).is_integer()):
            raise ValueError(f"{cfg_path}: k must be a whole number for sae-fast; got {k!r}")
        fields.update(activation=arch, k=int(k))
        if arch == "batchtopk":
            thr = t.pop("topk_threshold", None)
            extra["threshold"] = torch.tensor(0.0 if thr is None else float(thr), dtype=torch.float32)
    else:  # jumprelu: threshold (n,), or log_threshold in older checkpoints
        if "threshold" in t:
            theta = _take(t, "threshold", (n,), weights_path, "d_sae").to(work)
        else:
            theta = _take(t, "log_threshold", (n,), weights_path, "d_sae").to(work).exp()
        # SAELens: relu(p) * (p > threshold); a threshold <= 0 acts as 0, and log(0) = -inf keeps that exact.
        extra_weights = {"log_threshold": theta.clamp_min(0).log()}
        fields.update(activation="jumprelu")
        for ours, theirs in (("l0_coeff", "l0_coefficient"), ("jumprelu_bandwidth", "jumprelu_bandwidth")):
            if theirs in cfg:
                fields[ours] = cfg[theirs]
    _no_leftovers(t, weights_path, f"a SAELens {arch} SAE")
    try:
        sae_cfg = SAEConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    weights = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if arch == "jumprelu":
        weights.update(extra_weights)
    dtype = _dtype(dtype if dtype is not None else cfg.get("dtype"), file_dtype)
    return _build(sae_cfg, weights, device, dtype, extra_state=extra)


def fold_activation_scale(sae, scale: float):
    """A copy of ``sae`` that reads the model's raw activations, for an SAE trained on activations
    multiplied by ``scale`` (``sae-fast train`` saves it in normalization.json): ``W_enc * scale``,
    ``W_dec / scale``, ``b_dec / scale``. Pre-activations, and so the selected latents and thresholds, are
    unchanged; reconstructions come out in the model's units. Decoder rows are then no longer unit norm."""
    import copy

    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number; got {scale!r}")
    out = copy.deepcopy(sae)
    with torch.no_grad():
        out.W_enc.mul_(scale)
        out.W_dec.div_(scale)
        out.b_dec.div_(scale)
    return out


def save_saelens(sae, path, metadata: dict | None = None, act_scale: float | None = None) -> Path:
    """Write ``sae`` as a SAELens inference SAE (``cfg.json`` + ``sae_weights.safetensors``), atomically.

    topk -> topk, relu -> standard, jumprelu -> jumprelu, batchtopk -> jumprelu with its learned global
    threshold (what SAELens itself saves for BatchTopK). ``metadata`` (model_name, hook_name, ...) goes into
    the cfg's metadata. ``act_scale``: the activation scale the SAE was trained with, folded into the weights
    (``fold_activation_scale``) so the file reads raw model activations."""
    if act_scale is not None:
        sae = fold_activation_scale(sae, act_scale)
    act = sae.cfg.activation
    sd = {k: v.detach() for k, v in sae.state_dict().items()}
    tensors = {"W_enc": sd["W_enc"].T, "b_enc": sd["b_enc"], "W_dec": sd["W_dec"], "b_dec": sd["b_dec"]}
    cfg = {"architecture": {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}[act]}
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
               apply_b_dec_to_input=True, normalize_activations="none", reshape_activations="none",
               metadata={"sae_lens_version": SAELENS_SCHEMA_VERSION, "sae_lens_training_version": None,
                         **(metadata or {})})
    tensors = {k: v.to(dtype).contiguous().cpu() for k, v in tensors.items()}

    return atomic_dir_write(path, lambda tmp: _write_weights_and_config(tmp, tensors, SAELENS_WEIGHTS_FILE, cfg))


# ============================================================================ sparsify
def _load_sparsify_one(path, device=None, dtype=None):
    from .sae import SAEConfig

    path, cfg_path, weights_path, cfg = _config_and_weights(path, WEIGHTS_FILE, "a sparsify")
    if cfg.get("format") == FORMAT:
        raise ValueError(f"{path} is a sae-fast folder, not a sparsify one; use load_sae")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise ValueError(f"{cfg_path}: unsupported sparsify activation {activation!r} (supported: topk)")
    for flag, why in (("transcode", "a transcoder"), ("skip_connection", "a skip connection (W_skip)"),
                      ("signed", "signed activations")):
        if cfg.get(flag):
            raise ValueError(f"{cfg_path}: this sparse coder has {why}, which sae-fast does not support")
    t = _read_tensors(weights_path)
    if "encoder.weight" not in t:
        raise ValueError(f"{weights_path} has no tensor 'encoder.weight' (has: {', '.join(sorted(t)) or 'none'})")
    n_file, d_file = t["encoder.weight"].shape if t["encoder.weight"].dim() == 2 else (None, None)
    d = int(cfg.get("d_in", d_file or 0))
    n = int(cfg.get("num_latents") or 0) or d * int(cfg.get("expansion_factor", 32))
    file_dtype = t["encoder.weight"].dtype
    weights = {
        "W_enc": _take(t, "encoder.weight", (n, d), weights_path, "num_latents, d_in"),
        "b_enc": _take(t, "encoder.bias", (n,), weights_path, "num_latents"),
        # sparsify stores W_dec latent-major (num_latents, d_in), as sae-fast does: no transpose.
        "W_dec": _take(t, "W_dec", (n, d), weights_path, "num_latents, d_in"),
        "b_dec": _take(t, "b_dec", (d,), weights_path, "d_in"),
    }
    _no_leftovers(t, weights_path, "a sparsify top-k SAE")
    try:
        sae_cfg = SAEConfig(d_in=d, n_latents=n, activation="topk", k=int(cfg.get("k", 32)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    return _build(sae_cfg, weights, device, _dtype(dtype, file_dtype))


def load_sparsify(path, device=None, dtype=None, hookpoint: str | None = None):
    """Load a sparsify SAE folder (``cfg.json`` + ``sae.safetensors``), or a run folder with one such folder
    per hookpoint (-> ``{hookpoint: SAE}``; ``hookpoint=`` picks one). sparsify encodes
    ``topk(relu(x - b_dec) @ W_enc.T + b_enc)``; that is sae-fast's topk (ReLU after the selection keeps
    the same active latents and values)."""
    return _load_folder_or_run(path, _load_sparsify_one, hookpoint, device=device, dtype=dtype)


def save_sparsify(sae, path, act_scale=None) -> Path:
    """Write a topk SAE as a sparsify folder; a dict ``{hookpoint: SAE}`` writes a run folder with one
    sub-folder per hookpoint (what sparsify's trainer writes). Atomic: all or nothing. ``act_scale`` (a
    number, or ``{hookpoint: number}`` for a dict): the activation scale each SAE was trained with, folded
    into the weights (``fold_activation_scale``)."""
    saes = sae if isinstance(sae, dict) else None
    if act_scale is not None:
        if saes is None:
            sae = fold_activation_scale(sae, act_scale)
        else:
            scales = act_scale if isinstance(act_scale, dict) else {name: act_scale for name in saes}
            saes = {name: fold_activation_scale(s, scales[name]) for name, s in saes.items()}
            sae = saes
    for name, s in (saes or {None: sae}).items():
        if s.cfg.activation != "topk":
            where = f" (hookpoint {name!r})" if name is not None else ""
            raise ValueError(f"sparsify stores top-k SAEs only; this SAE{where} has activation {s.cfg.activation!r}")

    def write_one(s, folder: Path):
        sd = {k: v.detach().contiguous().cpu() for k, v in s.state_dict().items()}
        n, d = s.cfg.n_latents, s.cfg.d_in
        tensors = {"encoder.weight": sd["W_enc"], "encoder.bias": sd["b_enc"], "W_dec": sd["W_dec"], "b_dec": sd["b_dec"]}
        cfg = {"activation": "topk", "expansion_factor": max(n // d, 1), "normalize_decoder": True,
               "num_latents": n, "k": s.cfg.k, "multi_topk": False, "skip_connection": False,
               "transcode": False, "d_in": d}
        _write_weights_and_config(folder, tensors, WEIGHTS_FILE, cfg, indent=None)

    def write(tmp: Path):
        if saes is None:
            write_one(sae, tmp)
        else:
            for name, s in saes.items():
                write_one(s, tmp / name)

    return atomic_dir_write(path, write)
