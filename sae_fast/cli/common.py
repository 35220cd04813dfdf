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


def check_positive(args, *names) -> None:
    """Each ``--name`` in ``names`` is an integer >= 1 (ValueError naming the option)."""
    for name in names:
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {v}")


def check_finite(args, *names) -> None:
    import math

    for name in names:
        v = getattr(args, name)
        if v is not None and not math.isfinite(v):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number; got {v}")


def check_writable_file(option: str, path) -> None:
    """``path`` can be written as a file: not a folder, and its folder is one (or can be made) and writable."""
    import os
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a folder; pass a file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option} {str(path)!r}: {parent} is not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{option} {str(path)!r}: {parent} is not writable")
            return


def check_causal_lm(name) -> None:
    """Refuse a model whose saved architecture has no language-model head: loading it as a causal LM
    would give a randomly initialised head and garbage text (e.g. the default all-MiniLM-L6-v2 encoder)."""
    from sae_fast.activations import default_model_path

    try:
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(str(default_model_path() if name in (None, "minilm") else name),
                                                      local_files_only=True)
    except (OSError, ValueError, ImportError):
        return  # load_model gives the clear error for a model it cannot find
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES as ENCODER_FAMILIES

    archs = getattr(cfg, "architectures", None) or []
    generative = ("ForCausalLM", "LMHeadModel")
    # A base decoder (GPT2Model) still generates: its head is tied to the embeddings. An encoder family's
    # checkpoint without a causal-LM head (BertModel) would get a random one.
    encoder = cfg.model_type in ENCODER_FAMILIES and not any(a.endswith(generative) for a in archs)
    if getattr(cfg, "is_encoder_decoder", False) or encoder:
        raise ValueError(f"--model {name!r} is {', '.join(archs) or 'an encoder'}, not a causal language model "
                         "with a trained head: steer generates text, so it needs one (a ...ForCausalLM)")


def sae_origin(folder) -> tuple[str | None, str | None]:
    """(model, hook) that ``sae-fast train`` recorded in the SAE's cfg.json; None where not recorded."""
    try:
        cfg = json.loads((Path(folder) / "cfg.json").read_text())
    except (OSError, ValueError):
        return None, None
    model, hook = cfg.get("model"), cfg.get("hook")
    return (model if isinstance(model, str) else None), (hook if isinstance(hook, str) else None)


def load_sae_for_model(folder, model, layer, transcoders: bool = False):
    """(SAE, scale, layer, model) for ``--sae/--model/--layer``: the model and layer default to the ones
    recorded in the SAE's cfg.json; naming another model or layer than the recorded one is refused. A
    transcoder is refused unless ``transcoders`` (the command handles one)."""
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
    if sae.cfg.transcode and not transcoders:
        raise ValueError(f"{folder} holds a transcoder (it reads its module's input and predicts its output); "
                         "this command reads SAEs of a layer's output only (sae-fast eval takes transcoders)")
    return sae, scale, layer, model if model is not None else recorded_model
