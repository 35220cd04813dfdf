"""normalization.json: the activation scale an SAE was trained with, written beside its folder.

Activations are multiplied by ``scale`` (so their mean squared norm is d) before the SAE reads them; divide
its reconstructions by ``scale`` to get back to the model's units. ``features``, ``steer`` and the CLI take
this scale; read it with ``read_normalization(folder)``.
"""
from __future__ import annotations

import json
from pathlib import Path


def save_normalization(folder, layer: str, scale: float, d: int) -> None:
    (Path(folder) / "normalization.json").write_text(json.dumps({
        "layer": layer, "scale": scale, "target_mean_squared_norm": d,
        "note": "the SAE reads model activations multiplied by scale; divide its reconstructions by scale "
                "to get back to the model's units"}, indent=2) + "\n")


def read_normalization(folder) -> tuple[float, str | None]:
    """(scale, layer) from the normalization.json beside an SAE; (1.0, None) without one."""
    path = Path(folder) / "normalization.json"
    if not path.is_file():
        return 1.0, None
    meta = json.loads(path.read_text())
    return float(meta.get("scale", 1.0)), meta.get("layer")
