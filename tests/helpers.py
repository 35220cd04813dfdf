"""What several test modules share: SAE test tensors, the backends under test, comparisons with reference.py.

Imported by the test modules (``from helpers import ...``) after conftest.py has chosen Triton's mode.
"""
import importlib.util
import os
import sys
from pathlib import Path

import torch

import sae_fast
from sae_fast import ops
from sae_fast import reference as R

# The sparse backends that run CPU tensors here (triton only under TRITON_INTERPRET=1: see INTERPRETED_TRITON).
CPU_BACKENDS = [b for b in ("torch", "cpu") if b in ops.available_backends()]
# The triton backend's kernels on CPU tensors, run by Triton's interpreter (numpy: small sizes only).
INTERPRETED_TRITON = ["triton"] if ("triton" in ops.available_backends()
                                    and os.environ.get("TRITON_INTERPRET") == "1") else []

# (dtype, atol, rtol) for comparing a backend with reference.py computed in float64. bf16 inputs are
# rounded once on the way in; kernels accumulate in fp32, so the bound is a few bf16 ulps of the result.
DTYPES = [(torch.float32, 1e-4, 1e-4), (torch.bfloat16, 3e-2, 3e-2)]

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def make_sae_tensors(B, d, n, dtype=torch.float32, seed=0, requires_grad=True, device="cpu"):
    """Random x and weights; values chosen so top-k selections are well separated in any dtype."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g)
    W_enc = torch.randn(n, d, generator=g) / d ** 0.5
    b_enc = torch.randn(n, generator=g) * 0.1
    W_dec = torch.randn(n, d, generator=g) / d ** 0.5
    b_dec = torch.randn(d, generator=g) * 0.1
    out = [t.to(dtype=dtype, device=device) for t in (x, W_enc, b_enc, W_dec, b_dec)]
    if requires_grad:
        for t in out[1:]:
            t.requires_grad_(True)
    return out


def encode_decode(act, k, x, W_enc, b_enc, W_dec, b_dec, theta):
    """Encode with activation ``act`` (topk, batchtopk, relu, threshold at 0.1, jumprelu) and decode:
    (values, indices, x_hat, l0), l0 being JumpReLU's differentiable count (zero for the others)."""
    l0 = x.new_zeros(())
    if act == "topk":
        v, i = ops.topk_encode(x, W_enc, b_enc, b_dec, k)
    elif act == "batchtopk":
        v, i = ops.batch_topk_encode(x, W_enc, b_enc, b_dec, k)
    elif act == "relu":
        v, i = ops.relu_encode(x, W_enc, b_enc, b_dec)
    elif act == "threshold":
        v, i = ops.threshold_encode(x, W_enc, b_enc, b_dec, 0.1)
    else:
        v, i, l0 = ops.jumprelu_encode(x, W_enc, b_enc, b_dec, theta, 0.05, return_l0=True)
    return v, i, ops.sparse_decode(v, i, W_dec, b_dec), l0


def ref_grads(fn, tensors):
    """Run ``fn`` with the reference backend in float64 on the same (rounded) inputs: (its output, the
    float64 inputs, for gradients)."""
    t64 = [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    with sae_fast.use_backend("reference"):
        out = fn(*t64)
    return out, t64


def close(a, b, atol, rtol, what):
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def grads_match(loss_fn, out, ref_out, tensors, ref_tensors, atol, rtol):
    """The gradients of ``loss_fn(*out)`` and ``loss_fn(*ref_out)`` with respect to the inputs that require
    them agree, each within ``atol`` times its reference's largest magnitude (plus one)."""
    params = [t for t in tensors if t.requires_grad]
    ref_params = [t for t in ref_tensors if t.requires_grad]
    g = torch.autograd.grad(loss_fn(*out), params, allow_unused=True)
    g_ref = torch.autograd.grad(loss_fn(*ref_out), ref_params, allow_unused=True)
    names = ["x", "W_enc", "b_enc", "W_dec", "b_dec", "theta"]
    for name, a, b in zip(names[1:] if len(params) < len(names) else names, g, g_ref):
        assert (a is None) == (b is None), f"grad {name}: one side has none"
        if a is None:
            continue
        scale = b.abs().max().item() + 1.0
        close(a, b, atol * scale, rtol, f"grad {name}")


def ref_topk(pre, k):
    """reference.py's top-k of (B, n) pre-activations: (scores, indices int32), best first, lower latent on ties."""
    idx = R.topk_indices(pre, k)
    return pre.gather(1, idx), idx.to(torch.int32)


def load_script(name: str):
    """A script of benchmarks/ (not a package) imported as a module, by path (and registered under ``name``,
    as dataclasses need)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
