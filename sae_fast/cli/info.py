"""`sae-fast info`: versions, devices and what each kernel backend runs on here."""
from __future__ import annotations

import platform


def _info(args) -> int:
    import torch

    import sae_fast
    from sae_fast import dispatch

    info = {
        "sae_fast": sae_fast.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "backends": dispatch.describe_backends(),  # name -> what it runs on here
        "default backend (cpu tensors)": dispatch.get_backend("cpu").name,
    }
    if torch.cuda.is_available():
        info["default backend (cuda tensors)"] = dispatch.get_backend("cuda").name
    for key, value in info.items():
        if isinstance(value, dict):  # one line per entry, under the key
            for i, (name, text) in enumerate(value.items()):
                print(f"{key if i == 0 else '':>30}{':' if i == 0 else ' '} {name}: {text}")
        else:
            print(f"{key:>30}: {value}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="show versions, devices and the available kernel backends")
    p.set_defaults(func=_info)
