"""Training checkpoints: everything needed to continue a run on exactly the same trajectory.

A checkpoint is a folder ``checkpoints/step_00000200/`` holding
    state.json             step, data position (rows consumed), tokens, layers, activation scales, config
    trainer.safetensors    Adam state of every layer's optimizer, torch's RNG state
    <layer>/               the SAE (sae.safetensors + cfg.json, loadable with SparseAutoencoder.load)
                           and normalization.json (the activation scale it was trained with)
It is written to a temporary folder and renamed into place, so a killed run leaves either a whole
checkpoint or none; the latest whole one is what ``--resume`` continues from. Nothing is unpickled.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..activations.normalization import save_normalization
from ..folders import atomic_dir_write, load_sae
from ..sae import save_sae

FORMAT = "sae-fast-train-checkpoint"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def save_checkpoint(root, step: int, state: dict, saes: dict, optimizers: dict, scales: dict, keep: int = 2) -> Path:
    """Write ``root/step_<step>`` atomically, then delete all but the newest ``keep`` checkpoints."""
    root = Path(root)
    tensors = {"torch_rng_state": torch.get_rng_state()}
    for layer, opt in optimizers.items():
        for i, st in opt.state_dict()["state"].items():
            for key, value in st.items():
                t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                tensors[f"{layer}/{i}/{key}"] = t.detach().contiguous().cpu()
    meta = {"format": FORMAT, "step": step, **state, "layers": list(saes), "scales": scales}

    def write(tmp: Path):
        for layer, sae in saes.items():
            save_sae(sae, tmp / layer)
            save_normalization(tmp / layer, layer, scales[layer], sae.d_in)
        save_file(tensors, str(tmp / "trainer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")

    path = atomic_dir_write(root / f"step_{step:08d}", write)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(root) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (unfinished temporary folders start with '.')."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
             and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path, saes: dict, optimizers: dict) -> dict:
    """Restore SAE weights and buffers, optimizer states and torch's RNG from ``path``; return state.json."""
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a sae-fast training checkpoint")
    if sorted(meta["layers"]) != sorted(saes):
        raise ValueError(f"checkpoint {path} has layers {meta['layers']}, this run hooks {list(saes)}")
    tensors = load_file(str(path / "trainer.safetensors"))
    for layer, sae in saes.items():
        saved = load_sae(path / layer, device=sae.W_enc.device)
        if saved.cfg != sae.cfg:
            raise ValueError(f"checkpoint {path} holds a different SAE for {layer!r}: {saved.cfg} vs {sae.cfg}")
        sae.load_state_dict(saved.state_dict())
        opt = optimizers[layer]
        sd = opt.state_dict()
        state: dict[int, dict] = {}
        for key, t in tensors.items():
            owner, _, rest = key.partition("/")
            if owner == layer:
                i, name = rest.split("/")
                state.setdefault(int(i), {})[name] = t
        sd["state"] = state  # load_state_dict moves each tensor to its parameter's device and dtype
        opt.load_state_dict(sd)
    torch.set_rng_state(tensors["torch_rng_state"])
    return meta
