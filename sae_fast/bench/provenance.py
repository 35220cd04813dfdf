"""Where a result came from: the device (its name, a file-name slug, its properties), package versions, the git
commit of the checkout, the load average."""
from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def device_slug(device: torch.device) -> str:
    """File-name stem for results: the CPU model (with its thread count) or the GPU name."""
    name = device_name(device)
    name = re.sub(r"\((R|TM|tm|r)\)|\bCPU\b|@.*$", " ", name)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if device.type == "cuda":
        return f"cuda-{slug}"
    return f"cpu-{slug}-{torch.get_num_threads()}t"


def _version(module: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    import sae_fast
    out = {"sae_fast": sae_fast.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for dist in ("triton", "eai-sparsify", "sae-lens", "numpy"):
        out[dist] = _version(dist)
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def git_commit() -> dict:
    """The commit of the checkout sae_fast was imported from (None when it is not a git checkout)."""
    root = Path(__file__).resolve().parents[2]  # sae_fast/bench/provenance.py -> the checkout
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "name": device_name(device), "threads": torch.get_num_threads()}
    if device.type == "cpu":
        try:
            lines = Path("/proc/cpuinfo").read_text().splitlines()
            flags = next(line for line in lines if line.startswith("flags")).split()
            info["isa"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
        except (OSError, StopIteration):
            pass
        info["logical_cpus"] = os.cpu_count()
    else:
        props = torch.cuda.get_device_properties(device)
        info.update(sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}")
    return info


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded to 0.01."""
    return [round(v, 2) for v in os.getloadavg()]
