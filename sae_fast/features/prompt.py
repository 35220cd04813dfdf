"""The features that fire on each token of one prompt."""
from __future__ import annotations

import torch

from ..activations.corpus import encode_prompt
from .scan import encode_inputs
from .text import token_pieces


def on_prompt(model, tokenizer, layer: str, sae, prompt: str, scale: float = 1.0, top: int = 5,
              ctx_len: int = 512, exclude_special: bool = True) -> list[tuple[str, list[tuple[int, float]]]]:
    """For each token of ``prompt``: (its text as it reads in the prompt, its ``top`` strongest (latent,
    activation) pairs)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string; got {prompt!r}")
    if tokenizer.pad_token is None:  # GPT-2 style tokenizers have none; one prompt needs no padding anyway
        tokenizer.pad_token = tokenizer.eos_token
    # Wrapped as in training (a BOS where the tokenizer adds none: a causal LM's first token is otherwise its
    # attention sink); only ids and mask, as GPT-2 would add token_type_ids through its embedding.
    enc = {k: v[:, :ctx_len] for k, v in encode_prompt(tokenizer, prompt).items()}
    input_ids, keep = enc["input_ids"], enc["attention_mask"].bool()
    values, indices = encode_inputs(model, layer, sae, enc, scale)
    if torch.isnan(values).any():
        raise ValueError(f"the SAE gave NaN activations on layer {layer!r} for this prompt")
    if exclude_special and getattr(tokenizer, "all_special_ids", None):
        keep &= ~torch.isin(input_ids, torch.tensor(sorted(set(tokenizer.all_special_ids))))
    kept = keep[0].nonzero().squeeze(1).tolist()
    pieces = token_pieces(tokenizer, input_ids[0, kept].tolist())
    out = []
    for t, piece in zip(kept, pieces):
        v, i = values[t], indices[t]
        order = torch.argsort(v, descending=True, stable=True)[:top]
        out.append((piece, [(int(i[j]), float(v[j])) for j in order if v[j] > 0]))
    return out
