"""Attention sinks: the few tokens whose residual stream has a huge norm (massive activations).

In a causal LM the first position (BOS) and sometimes another early token carry norms 10-150x the
others' (SmolLM2-135M at layer 15: about 25,000 at BOS and up to about 1,900 at position 1 against a
median of about 170). Left in, one such row sets the activation scale and dominates the FVU, and the SAE
spends latents on it. They are found per model batch by norm: a kept token whose norm (at any hooked
layer) exceeds ``factor`` times the median norm of the batch's kept tokens is a sink. Ordinary tokens
stay below about 1.4x the median there, so the default 4x leaves them all in.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

DEFAULT_SINK_FACTOR = 4.0


def sink_mask(acts: Tensor | Mapping[str, Tensor], keep: Tensor, factor: float = DEFAULT_SINK_FACTOR) -> Tensor:
    """(B, T) bool: the kept positions whose activation norm exceeds ``factor`` x the median kept norm,
    at any of the layers in ``acts`` ((B, T, d) each). ``factor <= 0`` finds none."""
    out = torch.zeros_like(keep, dtype=torch.bool)
    if factor <= 0 or not bool(keep.any()):
        return out
    for x in (acts.values() if isinstance(acts, Mapping) else [acts]):
        if x.shape[:-1] != keep.shape:  # not one vector per token: the caller's shape check explains it
            continue
        norms = x.float().norm(dim=-1)
        k = keep.to(norms.device)
        median = norms[k].median()
        out |= (k & (norms > factor * median)).to(out.device)
    return out
