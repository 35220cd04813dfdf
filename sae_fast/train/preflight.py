"""Checks of a training run that need the machine but not the model: run before anything expensive.

``TrainConfig`` checks each value on its own; here: the device exists, the backend runs on it, the
output and cache folders can be folders, an activation cache there belongs to this configuration.
Errors are ValueErrors naming the option, one line each.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import dispatch

_DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(name: str | None) -> torch.device:
    """The torch device for ``--device`` (default cuda when available, else cpu)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device; use cpu or cuda[:i]") from None
    if device.type not in _DEVICE_TYPES:
        raise ValueError(f"--device {name!r} is not supported for training; use cpu or cuda[:i]")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name!r}: no CUDA GPU is available here (torch {torch.__version__}); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_backend(name: str | None, device: torch.device) -> None:
    if name is None:
        return
    try:
        backend = dispatch.lookup_backend(name)
    except ValueError as e:
        raise ValueError(f"--backend {name!r}: {e}") from None
    if not backend.supports(device):
        raise ValueError(f"--backend {name!r} cannot run on device {device.type!r} ({backend.runs_on()}); "
                         f"pick another --backend or --device")


def check_folder(option: str, path) -> None:
    """``path`` is a folder or can become one (nothing in the way that is a file)."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"is below {p}, which is not a folder"
                raise ValueError(f"{option} {str(path)!r} {what}; pass a folder")
            return


def fingerprint_changes(stored: dict, wanted: dict) -> list[str]:
    return [f"{k}: {stored.get(k)!r} (cache) vs {wanted[k]!r} (this run)" for k in sorted(wanted)
            if stored.get(k) != wanted[k]]
