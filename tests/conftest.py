import os

import pytest
import torch

# Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter, which has to be
# chosen before triton is first imported (it never becomes the default backend for CPU tensors).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sae_fast  # noqa: E402
from sae_fast import ops  # noqa: E402

# The sparse backends that run CPU tensors here (triton only under TRITON_INTERPRET=1; its own tests cover it).
CPU_BACKENDS = [b for b in ("torch", "cpu") if b in ops.available_backends()]

# (dtype, atol, rtol) for comparing a backend with reference.py computed in float64. bf16 inputs are
# rounded once on the way in; kernels accumulate in fp32, so the bound is a few bf16 ulps of the result.
DTYPES = [(torch.float32, 1e-4, 1e-4), (torch.bfloat16, 3e-2, 3e-2)]


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


def pytest_report_header(config):
    return f"sae_fast backends: {', '.join(sae_fast.available_backends())}; torch {torch.__version__}"
