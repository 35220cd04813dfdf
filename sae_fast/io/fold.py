"""Fold the activation scale an SAE was trained with into its weights, for formats that read raw activations."""
from __future__ import annotations

import copy
import math

import torch

from ..sae import SparseAutoencoder


def fold_activation_scale(sae: SparseAutoencoder, scale: float, target_scale: float | None = None) -> SparseAutoencoder:
    """A copy of ``sae`` that reads the model's raw activations, for an SAE trained on activations
    multiplied by ``scale`` (``sae-fast train`` saves it in normalization.json): ``W_enc * scale``,
    ``W_dec / scale``, ``b_dec / scale``. Pre-activations, and so the selected latents and thresholds, are
    unchanged; reconstructions come out in the model's units. Decoder rows are then no longer unit norm.

    A transcoder trained to predict targets multiplied by ``target_scale`` (default ``scale``) from inputs
    multiplied by ``scale``: ``W_enc * scale``, ``W_dec / target_scale``, ``b_dec / target_scale`` and a skip
    connection's ``W_skip * scale / target_scale``."""
    target_scale = scale if target_scale is None else target_scale
    for name, v in (("scale", scale), ("target_scale", target_scale)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive number; got {v!r}")
    if target_scale != scale and not sae.cfg.transcode:
        raise ValueError(f"target_scale={target_scale!r} differs from scale={scale!r}, which only a transcoder "
                         "can have (an SAE's target is its input)")
    out = copy.deepcopy(sae)
    with torch.no_grad():
        out.W_enc.mul_(scale)
        out.W_dec.div_(target_scale)
        out.b_dec.div_(target_scale)
        if sae.cfg.skip_connection:
            out.W_skip.mul_(scale / target_scale)
    return out
