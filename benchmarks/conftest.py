"""Shared pieces of the micro-benchmarks: device, shapes, backends, and a synchronised call.

Run:   python -m pytest benchmarks --benchmark-only            (compare backends per group)
Smoke: SAE_FAST_BENCH_SHAPES=tiny python -m pytest benchmarks --benchmark-disable
Env:   SAE_FAST_BENCH_DEVICE=cpu|cuda (default: cuda when available), SAE_FAST_BENCH_SHAPES=tiny|default.
"""
from __future__ import annotations

import os

import pytest
import torch

import sae_fast
from sae_fast.bench import fused_backends

DEVICE = torch.device(os.environ.get("SAE_FAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))

# (B, d, n, k). A few shapes per device: small, and the DESIGN.md workload for the device.
SHAPES = {
    "tiny": [(33, 16, 96, 4)],
    "cpu": [(256, 128, 4096, 16), (1024, 384, 16384, 32)],
    "cuda": [(1024, 768, 32768, 32), (4096, 768, 32768, 32), (4096, 768, 131072, 32)],
}


def shapes() -> list:
    if os.environ.get("SAE_FAST_BENCH_SHAPES", "default") == "tiny":
        return SHAPES["tiny"]
    return SHAPES[DEVICE.type if DEVICE.type in SHAPES else "cpu"]


def backends(include_reference: bool = True) -> list:
    """Every backend that runs on DEVICE, as `sae-fast bench` picks them (Triton on CPU, its interpreter, is
    not a speed path)."""
    names = fused_backends(DEVICE, None)
    return names if include_reference else [n for n in names if n != "reference"]


def shape_id(shape) -> str:
    return "B{}-d{}-n{}-k{}".format(*shape)


def dtype() -> torch.dtype:
    return torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def make_inputs(B, d, n, k, requires_grad=False, seed=0):
    """x, W_enc, b_enc, W_dec, b_dec on DEVICE in the benchmark dtype (unit decoder rows, tied encoder)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g)
    W_dec = torch.randn(n, d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    out = [t.to(DEVICE, dtype()) for t in (x, W_dec.clone(), torch.zeros(n), W_dec, torch.zeros(d))]
    if requires_grad:
        for t in out[1:]:
            t.requires_grad_(True)
    return out


def run(benchmark, group: str, backend: str, fn):
    """Benchmark ``fn`` under ``use_backend(backend)``, synchronised on CUDA; one group per (op, shape)."""
    benchmark.group = group
    benchmark.extra_info.update(backend=backend, device=str(DEVICE), dtype=str(dtype()))

    def call():
        with sae_fast.use_backend(backend):
            out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    return benchmark(call)


@pytest.fixture(autouse=True)
def _no_grad_leaks():
    yield
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
