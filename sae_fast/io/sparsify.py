"""sparsify (EleutherAI) folders: ``cfg.json`` + ``sae.safetensors`` with encoder.weight (n, d), encoder.bias,
W_dec (n, d), b_dec; cfg.json gives k, num_latents / expansion_factor, d_in. A training run writes one such
folder per hookpoint; loading the run folder gives ``{hookpoint: SAE}``."""
from __future__ import annotations

from pathlib import Path

from ..folders import (
    FolderFormat,
    atomic_dir_write,
    config_and_weights,
    load_folder_or_run,
    no_leftovers,
    parse_dtype,
    read_tensors,
    register_format,
    take,
    write_weights_and_config,
)
from ..sae import FORMAT, WEIGHTS_FILE, SAEConfig, SparseAutoencoder
from .fold import fold_activation_scale


def _load_sparsify_one(path, device=None, dtype=None):
    path, cfg_path, weights_path, cfg = config_and_weights(path, WEIGHTS_FILE, "a sparsify")
    if cfg.get("format") == FORMAT:
        raise ValueError(f"{path} is a sae-fast folder, not a sparsify one; use load_sae")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise ValueError(f"{cfg_path}: unsupported sparsify activation {activation!r} (supported: topk)")
    for flag, why in (("transcode", "a transcoder"), ("skip_connection", "a skip connection (W_skip)"),
                      ("signed", "signed activations")):
        if cfg.get(flag):
            raise ValueError(f"{cfg_path}: this sparse coder has {why}, which sae-fast does not support")
    t = read_tensors(weights_path)
    if "encoder.weight" not in t and "W_enc" in t and "format" not in cfg:
        raise ValueError(f"{cfg_path} has no \"format\" entry, and {weights_path.name} holds sae-fast tensors "
                         "(W_enc): a sae-fast config that lost its \"format\": \"sae-fast\" line; add it back")
    if "encoder.weight" not in t:
        raise ValueError(f"{weights_path} has no tensor 'encoder.weight' (has: {', '.join(sorted(t)) or 'none'})")
    n_file, d_file = t["encoder.weight"].shape if t["encoder.weight"].dim() == 2 else (None, None)
    for key in ("d_in", "num_latents", "expansion_factor", "k"):  # ints in the file, not 2.5 or true or "4"
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{cfg_path}: {key} must be an integer; got {v!r}")
    d = cfg.get("d_in", d_file or 0)
    n = cfg.get("num_latents") or d * cfg.get("expansion_factor", 32)
    file_dtype = t["encoder.weight"].dtype
    weights = {
        "W_enc": take(t, "encoder.weight", (n, d), weights_path, "num_latents, d_in"),
        "b_enc": take(t, "encoder.bias", (n,), weights_path, "num_latents"),
        # sparsify stores W_dec latent-major (num_latents, d_in), as sae-fast does: no transpose.
        "W_dec": take(t, "W_dec", (n, d), weights_path, "num_latents, d_in"),
        "b_dec": take(t, "b_dec", (d,), weights_path, "d_in"),
    }
    no_leftovers(t, weights_path, "a sparsify top-k SAE")
    try:
        sae_cfg = SAEConfig(d_in=d, n_latents=n, activation="topk", k=cfg.get("k", 32))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    return SparseAutoencoder.from_weights(sae_cfg, weights, device, parse_dtype(dtype, file_dtype))


def load_sparsify(path, device=None, dtype=None, hookpoint: str | None = None):
    """Load a sparsify SAE folder (``cfg.json`` + ``sae.safetensors``), or a run folder with one such folder
    per hookpoint (-> ``{hookpoint: SAE}``; ``hookpoint=`` picks one). sparsify encodes
    ``topk(relu(x - b_dec) @ W_enc.T + b_enc)``; that is sae-fast's topk (ReLU after the selection keeps
    the same active latents and values)."""
    return load_folder_or_run(path, _load_sparsify_one, hookpoint, device=device, dtype=dtype)


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
        tensors = {"encoder.weight": sd["W_enc"], "encoder.bias": sd["b_enc"], "W_dec": sd["W_dec"],
                   "b_dec": sd["b_dec"]}
        cfg = {"activation": "topk", "expansion_factor": max(n // d, 1), "normalize_decoder": True,
               "num_latents": n, "k": s.cfg.k, "multi_topk": False, "skip_connection": False,
               "transcode": False, "d_in": d}
        write_weights_and_config(folder, tensors, WEIGHTS_FILE, cfg, indent=None)

    def write(tmp: Path):
        if saes is None:
            write_one(sae, tmp)
        else:
            for name, s in saes.items():
                write_one(s, tmp / name)

    return atomic_dir_write(path, write)


# After sae-fast's own format, which shares the weights file: a sae.safetensors folder not marked sae-fast.
register_format(FolderFormat("sparsify", "sparsify", WEIGHTS_FILE, claims=None, load=_load_sparsify_one))
