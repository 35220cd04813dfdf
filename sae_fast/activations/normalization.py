"""normalization.json: the activation scale an SAE was trained with, written beside its folder.

Activations are multiplied by ``scale`` (so their mean squared norm is d) before the SAE reads them; divide
its reconstructions by ``scale`` to get back to the model's units. ``features``, ``steer`` and the CLI take
this scale; read it with ``read_normalization(folder)``.
"""
from __future__ import annotations

import json
from pathlib import Path


def save_normalization(folder, layer: str, scale: float, d: int, target_scale: float | None = None) -> None:
    meta = {"layer": layer, "scale": scale, "target_mean_squared_norm": d,
            "note": "the SAE reads model activations multiplied by scale; divide its reconstructions by scale "
                    "to get back to the model's units"}
    if target_scale is not None:  # a transcoder: its input and its target (the module's output) have their own
        meta.update(target_scale=target_scale, note="the transcoder reads the module's input multiplied by scale "
                    "and predicts its output multiplied by target_scale; divide its predictions by target_scale")
    (Path(folder) / "normalization.json").write_text(json.dumps(meta, indent=2) + "\n")


def read_normalization(folder) -> tuple[float, str | None]:
    """(scale, layer) from the normalization.json beside an SAE; (1.0, None) without one."""
    path = Path(folder) / "normalization.json"
    if not path.is_file():
        return 1.0, None
    meta = json.loads(path.read_text())
    return float(meta.get("scale", 1.0)), meta.get("layer")


def read_target_scale(folder) -> float | None:
    """A transcoder's target scale from the normalization.json beside it (None: none recorded)."""
    path = Path(folder) / "normalization.json"
    if not path.is_file():
        return None
    v = json.loads(path.read_text()).get("target_scale")
    return None if v is None else float(v)
