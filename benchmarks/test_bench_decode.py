"""Sparse decode x_hat = sum_j values[:, j] W_dec[idx[:, j]] + b_dec: forward, and forward + backward
(gather-dot for d values, latent-sorted dW_dec), per backend."""
import pytest
import torch
from conftest import DEVICE, backends, dtype, make_inputs, run, shape_id, shapes

from sae_fast import ops


def _code(B, n, k, requires_grad=False):
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)]).to(torch.int32).to(DEVICE)
    values = torch.rand(B, k, generator=g).to(DEVICE, dtype()).requires_grad_(requires_grad)
    return values, idx


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("shape", shapes(), ids=shape_id)
def test_sparse_decode(benchmark, backend, shape):
    B, d, n, k = shape
    *_, W_dec, b_dec = make_inputs(*shape)
    values, idx = _code(B, n, k)
    with torch.no_grad():
        x_hat = run(benchmark, f"sparse_decode {shape_id(shape)}", backend,
                    lambda: ops.sparse_decode(values, idx, W_dec, b_dec))
    assert x_hat.shape == (B, d)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("shape", shapes(), ids=shape_id)
def test_sparse_decode_fwd_bwd(benchmark, backend, shape):
    B, d, n, k = shape
    *_, W_dec, b_dec = make_inputs(*shape, requires_grad=True)
    values, idx = _code(B, n, k, requires_grad=True)

    def fwd_bwd():
        W_dec.grad = values.grad = None
        ops.sparse_decode(values, idx, W_dec, b_dec).float().square().sum().backward()

    run(benchmark, f"sparse_decode fwd+bwd {shape_id(shape)}", backend, fwd_bwd)
    assert W_dec.grad.shape == (n, d)
