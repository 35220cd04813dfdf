"""Saving and loading SAEs: safetensors weights plus a ``cfg.json``; never pickle.

Own format (a folder): ``sae.safetensors`` with W_enc (n, d), b_enc (n), W_dec (n, d), b_dec (d) and the
activation's extra tensors, and ``cfg.json`` holding ``SAEConfig`` plus ``"format": "sae-fast"``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = "sae-fast"
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"


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


def save_sae(sae, path) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
    cfg = {"format": FORMAT, **sae.cfg.to_dict()}

    def write(tmp: Path):
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")

    return atomic_dir_write(path, write)


def load_sae(path, device=None):
    from .sae import SAEConfig, SparseAutoencoder

    path = Path(path)
    cfg_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{path} is not an SAE folder: expected {CONFIG_FILE} and {WEIGHTS_FILE} in it")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a sae-fast config (format={cfg.get('format')!r})")
    state = load_file(str(weights_path), device=str(device) if device is not None else "cpu")
    sae = SparseAutoencoder(cfg=SAEConfig.from_dict(cfg), device=device, dtype=state["W_enc"].dtype)
    sae.load_state_dict(state)
    return sae
