"""The backward primitives of the sparse backends, called directly: gather-dot and the latent-sorted
backward (dW_enc, db_enc, dW_dec in one pass). The reference backend has no primitives (autograd
differentiates the dense math); its cost is in test_bench_sae.py."""
import pytest
import torch
from conftest import DEVICE, backends, dtype, make_inputs, run, shape_id, shapes

import sae_fast


def _primitive_inputs(B, d, n, k):
    x, _, _, W_dec, b_dec = make_inputs(B, d, n, k)
    g = torch.Generator().manual_seed(2)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)]).to(torch.int32).to(DEVICE)
    dp, v = (torch.randn(B, k, generator=g).to(DEVICE, dtype()) for _ in range(2))
    grad = torch.randn(B, d, generator=g).to(DEVICE, dtype())
    return x - b_dec, W_dec, idx, dp, v, grad


def _backend(name):
    with sae_fast.use_backend(name):
        return sae_fast.get_backend(DEVICE)


@pytest.mark.parametrize("backend", backends(include_reference=False))
@pytest.mark.parametrize("shape", shapes(), ids=shape_id)
def test_gather_dot(benchmark, backend, shape):
    xc, W_dec, idx, dp, v, grad = _primitive_inputs(*shape)
    impl = _backend(backend)
    dv = run(benchmark, f"gather_dot {shape_id(shape)}", backend, lambda: impl.gather_dot(grad, idx, W_dec))
    assert dv.shape == idx.shape


@pytest.mark.parametrize("backend", backends(include_reference=False))
@pytest.mark.parametrize("shape", shapes(), ids=shape_id)
def test_latent_backward(benchmark, backend, shape):
    B, d, n, k = shape
    xc, W_dec, idx, dp, v, grad = _primitive_inputs(*shape)
    impl = _backend(backend)
    dW_enc, db_enc, dW_dec = run(benchmark, f"latent_backward {shape_id(shape)}", backend,
                                 lambda: impl.latent_backward(idx, n, dp=dp, xc=xc, v=v, g=grad))
    assert dW_enc.shape == dW_dec.shape == (n, d)
