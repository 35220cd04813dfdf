"""Helpers shared by the subcommands."""
from __future__ import annotations


def load_sae_with_scale(folder, layer):
    """(SAE, activation scale, layer) from an SAE folder and the normalization.json beside it, if any."""
    from sae_fast.activations import DEFAULT_LAYER, read_normalization
    from sae_fast.io import load_sae

    scale, trained_layer = read_normalization(folder)
    return load_sae(folder).eval(), scale, layer or trained_layer or DEFAULT_LAYER
