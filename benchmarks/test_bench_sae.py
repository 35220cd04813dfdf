"""The whole TopK SAE op (encode + decode in one autograd node): forward + backward per backend, and a
SparseAutoencoder training step (Adam, decoder renorm) per backend. `sae-fast bench` measures the same
step side by side with the GEMM floor and the peer libraries."""
import pytest
import torch
from conftest import DEVICE, backends, dtype, make_inputs, run, shape_id, shapes

from sae_fast import SparseAutoencoder, ops


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("shape", shapes(), ids=shape_id)
def test_topk_sae_fwd_bwd(benchmark, backend, shape):
    B, d, n, k = shape
    x, W_enc, b_enc, W_dec, b_dec = make_inputs(*shape, requires_grad=True)
    params = (W_enc, b_enc, W_dec, b_dec)

    def fwd_bwd():
        for p in params:
            p.grad = None
        out = ops.topk_sae(x, W_enc, b_enc, W_dec, b_dec, k)
        (out.x_hat.float() - x.float()).square().sum().backward()

    run(benchmark, f"topk_sae fwd+bwd {shape_id(shape)}", backend, fwd_bwd)
    assert W_enc.grad.shape == (n, d)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("shape", shapes(), ids=shape_id)
def test_training_step(benchmark, backend, shape):
    B, d, n, k = shape
    x = make_inputs(*shape)[0].float()
    sae = SparseAutoencoder(d, n, "topk", k=k, k_aux=0, seed=0, device=DEVICE)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    autocast = torch.autocast(DEVICE.type, dtype=dtype(), enabled=dtype() != torch.float32)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = sae(x)
        out.loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()

    run(benchmark, f"SparseAutoencoder step {shape_id(shape)}", backend, step)
