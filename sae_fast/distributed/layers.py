"""Layer-distributed training: rank r trains the SAEs of layers r, r + w, r + 2w, ... (round robin over
the hooked layers in their model order), all from the same activations (one model forward per batch
when the run collects into --cache-dir; without a cache every rank collects its own copy)."""
from __future__ import annotations


def assign_layers(layers: list[str], rank: int, world: int) -> list[str]:
    """This rank's layers, round robin; a clear error when there are fewer layers than ranks."""
    if len(layers) < world:
        raise ValueError(f"--distributed layers needs at least as many hooked layers as ranks: {len(layers)} "
                         f"layer(s) ({', '.join(layers)}) on {world} ranks; hook more layers (--layer 'h.*') "
                         "or start fewer ranks")
    return list(layers[rank::world])
