"""Fold the activation scale an SAE was trained with into its weights, for formats that read raw activations."""
from __future__ import annotations

import copy
import math

import torch

from ..sae import SparseAutoencoder


def fold_activation_scale(sae: SparseAutoencoder, scale: float) -> SparseAutoencoder:
    """A copy of ``sae`` that reads the model's raw activations, for an SAE trained on activations
    multiplied by ``scale`` (``sae-fast train`` saves it in normalization.json): ``W_enc * scale``,
    ``W_dec / scale``, ``b_dec / scale``. Pre-activations, and so the selected latents and thresholds, are
    unchanged; reconstructions come out in the model's units. Decoder rows are then no longer unit norm."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number; got {scale!r}")
    out = copy.deepcopy(sae)
    with torch.no_grad():
        out.W_enc.mul_(scale)
        out.W_dec.div_(scale)
        out.b_dec.div_(scale)
    return out
