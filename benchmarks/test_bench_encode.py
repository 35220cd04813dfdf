"""Encoders (forward, no autograd): TopK and ReLU selection from x, per backend. The reference backend forms
the dense (B, n) pre-activations; fused backends must not."""
import pytest
import torch
from conftest import backends, make_inputs, run, shape_id, shapes

from sae_fast import ops


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("shape", shapes(), ids=shape_id)
def test_topk_encode(benchmark, backend, shape):
    x, W_enc, b_enc, _, b_dec = make_inputs(*shape)
    with torch.no_grad():
        values, idx = run(benchmark, f"topk_encode {shape_id(shape)}", backend,
                          lambda: ops.topk_encode(x, W_enc, b_enc, b_dec, shape[3]))
    assert values.shape == (shape[0], shape[3])


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("shape", shapes(), ids=shape_id)
def test_relu_encode(benchmark, backend, shape):
    B, d, n, k = shape
    x, W_enc, b_enc, _, b_dec = make_inputs(*shape)
    b_enc -= 2.33  # p ~ N(0, 1) (unit rows, unit-variance x): about 1% of latents active
    with torch.no_grad():
        values, idx = run(benchmark, f"relu_encode {shape_id(shape)}", backend,
                          lambda: ops.relu_encode(x, W_enc, b_enc, b_dec))
    assert values.shape[0] == B
