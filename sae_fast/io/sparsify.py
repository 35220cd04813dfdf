"""sparsify (EleutherAI) folders: ``cfg.json`` + ``sae.safetensors`` with encoder.weight (n, d), encoder.bias,
W_dec (n, d), b_dec (+ W_skip (d, d) with skip_connection); cfg.json gives k, num_latents / expansion_factor,
d_in, transcode, skip_connection. A training run writes one such folder per hookpoint; loading the run folder
gives ``{hookpoint: SAE}``. Transcoders (transcode: true) and skip connections load and save exactly (sparsify's
transcoders predict an output as wide as their input)."""
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
    if cfg.get("signed"):
        raise ValueError(f"{cfg_path}: this sparse coder has signed activations, which sae-fast does not support")
    flags = {}
    for flag in ("transcode", "skip_connection"):
        v = cfg.get(flag, False)
        if not isinstance(v, bool):
            raise ValueError(f"{cfg_path}: {flag} must be true or false; got {v!r}")
        flags[flag] = v
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
    if flags["skip_connection"]:  # applied as x @ W_skip.mT: (d_out, d_in), ours too
        weights["W_skip"] = take(t, "W_skip", (d, d), weights_path, "d_in, d_in")
    no_leftovers(t, weights_path, "a sparsify top-k " + ("transcoder" if flags["transcode"] else "SAE"))
    try:
        sae_cfg = SAEConfig(d_in=d, n_latents=n, activation="topk", k=cfg.get("k", 32), **flags)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    return SparseAutoencoder.from_weights(sae_cfg, weights, device, parse_dtype(dtype, file_dtype))


def load_sparsify(path, device=None, dtype=None, hookpoint: str | None = None):
    """Load a sparsify SAE folder (``cfg.json`` + ``sae.safetensors``), or a run folder with one such folder
    per hookpoint (-> ``{hookpoint: SAE}``; ``hookpoint=`` picks one). sparsify encodes
    ``topk(relu(x - b_dec) @ W_enc.T + b_enc)``; that is sae-fast's topk (ReLU after the selection keeps
    the same active latents and values)."""
    return load_folder_or_run(path, _load_sparsify_one, hookpoint, device=device, dtype=dtype)


def save_sparsify(sae, path, act_scale=None, target_scale=None) -> Path:
    """Write a topk SAE as a sparsify folder; a dict ``{hookpoint: SAE}`` writes a run folder with one
    sub-folder per hookpoint (what sparsify's trainer writes). Atomic: all or nothing. ``act_scale`` (a
    number, or ``{hookpoint: number}`` for a dict): the activation scale each SAE was trained with, folded
    into the weights (``fold_activation_scale``); ``target_scale`` (the same forms): a transcoder's target
    scale, when it differs."""
    saes = sae if isinstance(sae, dict) else None
    if act_scale is not None:
        if saes is None:
            sae = fold_activation_scale(sae, act_scale, target_scale)
        else:
            def per(v):
                return v if isinstance(v, dict) else {name: v for name in saes}
            scales, targets = per(act_scale), per(target_scale)
            saes = {name: fold_activation_scale(s, scales[name], targets.get(name)) for name, s in saes.items()}
            sae = saes
    for name, s in (saes or {None: sae}).items():
        where = f" (hookpoint {name!r})" if name is not None else ""
        if s.cfg.activation != "topk":
            raise ValueError(f"sparsify stores top-k SAEs only; this SAE{where} has activation {s.cfg.activation!r}")
        if s.d_out != s.d_in:
            raise ValueError(f"sparsify's transcoders predict an output as wide as their input; this one{where} has "
                             f"d_in={s.d_in}, d_out={s.d_out}")

    def write_one(s, folder: Path):
        sd = {k: v.detach().contiguous().cpu() for k, v in s.state_dict().items()}
        n, d = s.cfg.n_latents, s.cfg.d_in
        tensors = {"encoder.weight": sd["W_enc"], "encoder.bias": sd["b_enc"], "W_dec": sd["W_dec"],
                   "b_dec": sd["b_dec"]}
        if s.cfg.skip_connection:
            tensors["W_skip"] = sd["W_skip"]
        cfg = {"activation": "topk", "expansion_factor": max(n // d, 1), "normalize_decoder": True,
               "num_latents": n, "k": s.cfg.k, "multi_topk": False, "skip_connection": s.cfg.skip_connection,
               "transcode": s.cfg.transcode, "d_in": d}
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
