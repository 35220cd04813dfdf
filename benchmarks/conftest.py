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
from sae_fast.bench import WORKLOADS, fused_backends, sae_tensors

DEVICE = torch.device(os.environ.get("SAE_FAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))

# (B, d, n, k). A few shapes per device: small, and the benchmark workloads for the device (sae_fast.bench.WORKLOADS).
SHAPES = {
    "tiny": [(33, 16, 96, 4)],
    "cpu": [(256, 128, 4096, 16), WORKLOADS["cpu"].shape],
    "cuda": [(1024, 768, 32768, 32), WORKLOADS["w1"].shape, WORKLOADS["w2"].shape],
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
    """x, W_enc, b_enc, W_dec, b_dec on DEVICE in the benchmark dtype: `sae-fast bench`'s tensors (sae_tensors:
    unit decoder rows, tied encoder, zero biases)."""
    out = [t.to(DEVICE, dtype()) for t in sae_tensors(B, d, n, seed=seed)]
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
