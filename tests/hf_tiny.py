"""Tiny randomly initialised Hugging Face models saved to a temp folder (made once per test process), loaded
back through ``from_pretrained``: the real loading path, nothing downloaded. They reuse the embedded
all-MiniLM-L6-v2 tokenizer, so the vocabulary is real."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

_ROOT: Path | None = None
_MADE: dict[str, Path] = {}


def _root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="sae-fast-tiny-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def tokenizer():
    from sae_fast.activations import default_model_path
    return transformers.AutoTokenizer.from_pretrained(str(default_model_path()))


def tiny_model_dir(kind: str = "gpt2", layers: int = 3, width: int = 32) -> Path:
    """Folder with config.json, model.safetensors and the tokenizer of a tiny ``gpt2`` or ``llama`` (base
    models), or ``llama-lm`` (a LlamaForCausalLM, with its LM head)."""
    key = f"{kind}-{layers}-{width}"
    if key in _MADE:
        return _MADE[key]
    import torch

    tok = tokenizer()
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_embd=width, n_layer=layers, n_head=2,
                                      n_positions=256, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
        model = transformers.GPT2Model(cfg)
    elif kind in ("llama", "llama-lm"):
        cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=width, intermediate_size=2 * width,
                                       num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                       max_position_embeddings=256, bos_token_id=tok.cls_token_id,
                                       eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
        model = transformers.LlamaModel(cfg) if kind == "llama" else transformers.LlamaForCausalLM(cfg)
    else:
        raise ValueError(kind)
    path = _root() / key
    model.save_pretrained(path)
    tok.save_pretrained(path)
    _MADE[key] = path
    return path


def write_corpus(folder: Path, n_docs: int = 12) -> Path:
    """A small text corpus of real prose (Python's docs) as .txt files."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True)
    for i, key in enumerate(sorted(topics)[:n_docs]):
        (folder / f"doc{i:02d}.txt").write_text(topics[key])
    return folder
