"""Helpers shared by the subcommands."""
from __future__ import annotations

import json
from pathlib import Path


def load_sae_with_scale(folder, layer):
    """(SAE, activation scale, layer) from an SAE folder and the normalization.json beside it, if any."""
    from sae_fast.activations import DEFAULT_LAYER, read_normalization
    from sae_fast.io import load_sae

    scale, trained_layer = read_normalization(folder)
    return load_sae(folder).eval(), scale, layer or trained_layer or DEFAULT_LAYER


def sae_origin(folder) -> tuple[str | None, str | None]:
    """(model, hook) that ``sae-fast train`` recorded in the SAE's cfg.json; None where not recorded."""
    try:
        cfg = json.loads((Path(folder) / "cfg.json").read_text())
    except (OSError, ValueError):
        return None, None
    model, hook = cfg.get("model"), cfg.get("hook")
    return (model if isinstance(model, str) else None), (hook if isinstance(hook, str) else None)


def load_sae_for_model(folder, model, layer):
    """(SAE, scale, layer, model) for ``--sae/--model/--layer``: the model and layer default to the ones
    recorded in the SAE's cfg.json; naming another model or layer than the recorded one is refused."""
    from sae_fast.activations.model import model_id
    from sae_fast.activations.store import _layers_fitting

    recorded_model, recorded_hook = sae_origin(folder)
    if model is not None and recorded_model is not None and model_id(model) != recorded_model:
        raise ValueError(f"--model {model!r}: the SAE in {folder} was trained on {recorded_model!r} (its cfg.json); "
                         "leave --model out to use that one, or pass an SAE trained on this model")
    if layer and recorded_hook and not _layers_fitting(layer, [recorded_hook]):
        raise ValueError(f"--layer {layer!r}: the SAE in {folder} was trained on layer {recorded_hook!r} (its "
                         "cfg.json); leave --layer out to use that one")
    sae, scale, layer = load_sae_with_scale(folder, layer or recorded_hook)
    return sae, scale, layer, model if model is not None else recorded_model
