"""Training checkpoints: everything needed to continue a run on exactly the same trajectory.

A checkpoint is a folder ``checkpoints/step_00000200/`` holding
    state.json             step, data position (rows consumed), tokens, layers, activation scales, config,
                           and the sha256 of every other file in the folder (the manifest)
    trainer.safetensors    Adam state of every layer's optimizer, torch's RNG state
    <layer>/               the SAE (sae.safetensors + cfg.json, loadable with SparseAutoencoder.load)
                           and normalization.json (the activation scale it was trained with)
It is written to a temporary folder, fsynced and renamed into place, so a killed run (or a power loss)
leaves either a whole checkpoint or none. Before a resume uses one, ``read_checkpoint`` checks it: every
checksum, and that the values make sense (finite weights and Adam moments, every Adam entry there, step
and data position consistent). ``newest_intact`` falls back to older checkpoints past a damaged one.
Nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from ..activations.hooks import TARGET_SUFFIX
from ..activations.normalization import save_normalization
from ..folders import atomic_dir_write, load_sae, read_tensors
from ..sae import save_sae

FORMAT = "sae-fast-train-checkpoint"
MANIFEST = "state.json"
TRAINER_FILE = "trainer.safetensors"
ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that is damaged or inconsistent; the message says what is wrong with it."""


class Checkpoint(NamedTuple):
    """A checked checkpoint, read into memory (CPU): what ``restore`` puts into the run's SAEs and optimizers."""
    path: Path
    meta: dict
    saes: dict            # layer -> the SparseAutoencoder stored in it
    adam: dict            # layer -> {param index: {exp_avg, exp_avg_sq, step}}
    rng: torch.Tensor


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def save_checkpoint(root, step: int, state: dict, saes: dict, optimizers: dict, scales: dict, keep: int = 2) -> Path:
    """Write ``root/step_<step>`` atomically, then delete all but the newest ``keep`` checkpoints."""
    root = Path(root)
    tensors = {"torch_rng_state": torch.get_rng_state()}
    for layer, opt in optimizers.items():
        for i, st in opt.state_dict()["state"].items():
            for key, value in st.items():
                t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                tensors[f"{layer}/{i}/{key}"] = t.detach().contiguous().cpu()
    # A transcoder's target has its own scale, under the store's key for it (<layer>:out).
    targets = {n + TARGET_SUFFIX: scales[n + TARGET_SUFFIX] for n, sae in saes.items() if sae.cfg.transcode}
    meta = {"format": FORMAT, "step": step, **state, "layers": list(saes), "scales": {n: scales[n] for n in saes},
            **({"target_scales": targets} if targets else {})}

    def write(tmp: Path):
        for layer, sae in saes.items():
            save_sae(sae, tmp / layer)
            save_normalization(tmp / layer, layer, scales[layer], sae.d_in, target_scale=targets.get(layer + TARGET_SUFFIX))
        save_file(tensors, str(tmp / TRAINER_FILE))
        meta["files"] = {name: _sha256(tmp / name) for name in _files(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=2) + "\n")  # last: it vouches for the others

    path = atomic_dir_write(root / f"step_{step:08d}", write)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(root) -> list[Path]:
    """Checkpoint folders under ``root``, oldest first (unfinished temporary folders start with '.').
    Whether each is intact is ``read_checkpoint``'s business."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def read_manifest(path) -> dict:
    """The parsed state.json of a checkpoint (CheckpointError when it is missing or not one)."""
    path = Path(path)
    try:
        meta = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{MANIFEST} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{MANIFEST} is unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{MANIFEST} is not a sae-fast training checkpoint manifest")
    return meta


def _int(meta: dict, key: str, lo: int, hi: float = math.inf) -> int:
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CheckpointError(f"{key}={v!r} is out of range (expected an integer in [{lo}, {hi}])")
    return v


def _finite(t: torch.Tensor, what: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{what} has {bad} non-finite values")


def read_checkpoint(path, batch_tokens: int | None = None) -> Checkpoint:
    """Read and check one checkpoint folder: checksums, then the values. CheckpointError says what is wrong."""
    path = Path(path)
    meta = read_manifest(path)
    files = meta.get("files")
    if not isinstance(files, dict) or TRAINER_FILE not in files:
        raise CheckpointError(f"{MANIFEST} lists no checksums (written by an older sae-fast?)")
    for name in _files(path):
        if name not in files:
            raise CheckpointError(f"{name} is not in the manifest")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{name} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"{name} does not match its checksum (the file was changed or damaged)")
    step = _int(meta, "step", 1)
    if batch_tokens is not None:
        _int(meta, "data_position", step * batch_tokens, step * batch_tokens)
        _int(meta, "tokens", step * batch_tokens, step * batch_tokens)
    else:
        _int(meta, "data_position", 0)
    _int(meta, "log_since", 0, step)
    if "total_steps" in meta:
        _int(meta, "total_steps", step)
    layers, scales = meta.get("layers"), meta.get("scales")
    if not isinstance(layers, list) or not layers or not isinstance(scales, dict) or set(scales) != set(layers):
        raise CheckpointError("the manifest's layers and scales do not match")
    sums = meta.get("log_sums")
    if not isinstance(sums, dict) or set(sums) != set(layers):
        raise CheckpointError("the manifest's log_sums do not match its layers")
    for layer in layers:
        s = scales[layer]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (math.isfinite(s) and s > 0):
            raise CheckpointError(f"the activation scale of {layer!r} is {s!r}")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in sums[layer].values()):
            raise CheckpointError(f"the metrics summed for {layer!r} are not finite: {sums[layer]}")

    tensors = read_tensors(path / TRAINER_FILE)
    rng = tensors.pop("torch_rng_state", None)
    if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        raise CheckpointError("torch's RNG state is missing or malformed")
    saes, adam = {}, {}
    for layer in layers:
        try:
            sae = load_sae(path / layer)
        except (ValueError, FileNotFoundError, TypeError) as e:
            raise CheckpointError(f"the SAE of {layer!r} does not load: {e}") from None
        for name, t in sae.state_dict().items():
            _finite(t, f"{layer}/{name}")
        if int(sae.tokens_since_fired.min()) < 0:
            raise CheckpointError(f"{layer}/tokens_since_fired has negative counts")
        state: dict[int, dict] = {}
        for i, p in enumerate(sae.parameters()):
            entry = {}
            for key in ADAM_KEYS:
                name = f"{layer}/{i}/{key}"
                t = tensors.pop(name, None)
                if t is None:
                    raise CheckpointError(f"the Adam state {name} is missing")
                if key != "step" and t.shape != p.shape:
                    raise CheckpointError(f"the Adam state {name} has shape {tuple(t.shape)}, its weight {tuple(p.shape)}")
                _finite(t, f"the Adam state {name}")
                entry[key] = t
            if bool((entry["exp_avg_sq"] < 0).any()):
                raise CheckpointError(f"the Adam state {layer}/{i}/exp_avg_sq has negative values")
            if entry["step"].numel() != 1 or float(entry["step"]) != step:
                raise CheckpointError(f"the Adam step of {layer}/{i} is {entry['step'].tolist()}, the checkpoint's {step}")
            state[i] = entry
        saes[layer], adam[layer] = sae, state
    if tensors:
        raise CheckpointError(f"{TRAINER_FILE} has unexpected tensors: {', '.join(sorted(tensors)[:5])}")
    return Checkpoint(path, meta, saes, adam, rng)


def newest_intact(root, batch_tokens: int | None = None, log=print) -> Checkpoint | None:
    """The newest checkpoint under ``root`` that passes ``read_checkpoint``, saying which ones were skipped
    and why; None when there are none; CheckpointError when there are some but none is intact."""
    found = list_checkpoints(root)
    damaged = []
    for path in reversed(found):
        try:
            ckpt = read_checkpoint(path, batch_tokens)
        except CheckpointError as e:
            damaged.append(f"{path.name}: {e}")
            log(f"checkpoint {path} is damaged ({e}); trying an older one")
            continue
        if damaged:
            log(f"falling back to {path.name}, the newest intact checkpoint")
        return ckpt
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {root} ({'; '.join(damaged)}); "
                              "start the run afresh without --resume, or in a new --out folder")
    return None


def restore(ckpt: Checkpoint, saes: dict, optimizers: dict) -> dict:
    """Put a checked checkpoint's SAE weights and buffers, optimizer states and RNG into the run; its meta."""
    if sorted(ckpt.saes) != sorted(saes):
        raise CheckpointError(f"checkpoint {ckpt.path} has layers {sorted(ckpt.saes)}, this run hooks {sorted(saes)}")
    for layer, sae in saes.items():
        saved = ckpt.saes[layer]
        if saved.cfg != sae.cfg:
            raise CheckpointError(f"checkpoint {ckpt.path} holds a different SAE for {layer!r}: {saved.cfg} vs {sae.cfg}")
        sae.load_state_dict(saved.state_dict())
        sd = optimizers[layer].state_dict()
        sd["state"] = ckpt.adam[layer]  # load_state_dict moves each tensor to its parameter's device and dtype
        optimizers[layer].load_state_dict(sd)
    torch.set_rng_state(ckpt.rng)
    return ckpt.meta


def load_checkpoint(path, saes: dict, optimizers: dict, batch_tokens: int | None = None) -> dict:
    """Check ``path`` and restore it into ``saes`` and ``optimizers``; return its state.json."""
    return restore(read_checkpoint(path, batch_tokens), saes, optimizers)
