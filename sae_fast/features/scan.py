"""One streaming pass of a corpus through a model and an SAE: per batch, the kept tokens and their sparse
codes (the fused encoder's (values, indices), never dense pre-activations), within a token budget."""
from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..activations.corpus import window_batches
from ..activations.hooks import LayerCapture

DEFAULT_TOKENS = 100_000  # a scan without a budget on a big corpus runs for hours with nothing to show


def encode_inputs(model, layer: str, sae, enc: dict, scale: float) -> tuple[Tensor, Tensor]:
    """The SAE code of every position of a tokenized batch: (values (B*T, K), indices (B*T, K)) on CPU."""
    device = next(model.parameters()).device
    with LayerCapture(model, layer) as cap:
        if len(cap.names) != 1:
            raise ValueError(f"name one layer; {layer!r} matches {cap.names}")
        acts = cap.run(**{k: v.to(device) for k, v in enc.items()})[cap.names[0]]
    if acts.shape[-1] != sae.d_in:
        raise ValueError(f"layer {layer!r} outputs width {acts.shape[-1]}, the SAE reads {sae.d_in}")
    with torch.no_grad():
        values, indices = sae.encode(acts.reshape(-1, acts.shape[-1]).to(sae.W_dec) * scale)
    return values.float().cpu(), indices.long().cpu()


@dataclass
class Batch:
    """The kept tokens of one batch (padding and special tokens left out), in scan order."""
    token_ids: Tensor   # (m,) vocabulary ids
    window: Tensor      # (m,) global window number (a text longer than ctx_len spans several windows)
    position: Tensor    # (m,) position in its window
    values: Tensor      # (m, K) activations of the active latents
    indices: Tensor     # (m, K) their latent ids
    first: int          # global number of this batch's first kept token


def scan(model, tokenizer, layer: str, sae, texts: Iterable[str], scale: float = 1.0, ctx_len: int = 64,
         batch_size: int = 16, max_texts: int | None = None, max_tokens: int | None = DEFAULT_TOKENS,
         exclude_special: bool = True, progress: bool = True) -> Iterator[Batch]:
    """Batches of kept tokens with their codes until ``max_texts`` texts or ``max_tokens`` kept tokens
    (None: no limit). A progress bar on stderr counts the tokens when ``progress``."""
    for name, v in (("max_tokens", max_tokens), ("max_texts", max_texts)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer or None; got {v!r}")
    if not isinstance(ctx_len, int) or ctx_len < 2:
        raise ValueError(f"ctx_len must be an integer >= 2; got {ctx_len!r}")
    texts = iter(texts) if max_texts is None else itertools.islice(texts, max_texts)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=max_tokens, unit="tok", desc="features", file=sys.stderr, leave=False, mininterval=1.0)
    seen_windows = seen_tokens = 0
    try:
        for enc, keep in window_batches(tokenizer, texts, ctx_len, batch_size, exclude_special=exclude_special):
            B, T = enc["input_ids"].shape
            rows = keep.reshape(-1).nonzero().squeeze(1)
            if max_tokens is not None:
                rows = rows[: max_tokens - seen_tokens]
            if rows.numel():
                values, indices = encode_inputs(model, layer, sae, enc, scale)
                yield Batch(enc["input_ids"].reshape(-1)[rows], (rows // T) + seen_windows, rows % T,
                            values[rows], indices[rows], seen_tokens)
            seen_windows += B
            seen_tokens += rows.numel()
            if bar is not None:
                bar.update(rows.numel())
            if max_tokens is not None and seen_tokens >= max_tokens:
                break
    finally:
        if bar is not None:
            bar.close()
    if seen_tokens == 0:
        raise ValueError("no tokens to scan: the texts are empty (or hold only special tokens)")
