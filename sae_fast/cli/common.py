"""Helpers shared by the subcommands."""
from __future__ import annotations


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

        cfg = transformers.AutoConfig.from_pretrained(str(default_model_path() if name is None else name),
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
