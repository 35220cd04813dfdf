"""Public ops trace under torch.compile: the kernels are torch.library custom ops with fake implementations."""
import pytest
import torch
from helpers import CPU_BACKENDS, make_sae_tensors

import sae_fast
from sae_fast import SparseAutoencoder, custom_ops, ops


def _loss(x, W_enc, b_enc, W_dec, b_dec):
    r = ops.topk_sae(x, W_enc, b_enc, W_dec, b_dec, 4)
    v, i = ops.relu_encode(x, W_enc, b_enc, b_dec)  # data-dependent list length: a dynamic size in the graph
    return r.x_hat.pow(2).sum() + ops.sparse_decode(v, i, W_dec, b_dec).sum()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ops_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    tensors = make_sae_tensors(16, 8, 64)
    params = [tensors[1], tensors[3]]
    with sae_fast.use_backend(backend):
        compiled = torch.compile(_loss, backend="aot_eager", fullgraph=True)
        out = compiled(*tensors)
        grads = torch.autograd.grad(out, params)
        ref = _loss(*tensors)
        ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_master_weights_compile_fullgraph(backend):
    """bf16 x beside fp32 weights (SparseAutoencoder under autocast) traces too: the per-call weight copies
    (ops._gathered) and the gradient dtypes are inside the autograd Functions."""
    torch._dynamo.reset()
    x, *weights = make_sae_tensors(16, 8, 12)  # n = 12: B*k > 3n, so the decode reads a bf16 copy of W_dec
    x = x.bfloat16()
    params = [weights[0], weights[2]]
    with sae_fast.use_backend(backend):
        compiled = torch.compile(_loss, backend="aot_eager", fullgraph=True)
        out = compiled(x, *weights)
        grads = torch.autograd.grad(out, params)
        ref = _loss(x, *weights)
        ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):  # a threshold code's width is symbolic when compiled: eager's
        assert a.dtype == torch.float32  # decode may read the bf16 copy where the compiled one reads fp32
        torch.testing.assert_close(a, b, atol=2e-2 * b.abs().max().item(), rtol=2e-2)


def test_module_compiles_and_trains():
    torch._dynamo.reset()
    sae = SparseAutoencoder(8, 64, k=4, seed=0)
    x = make_sae_tensors(32, 8, 64, requires_grad=False)[0]
    out = torch.compile(sae, backend="aot_eager")(x)
    out.loss.backward()
    eager = SparseAutoencoder(8, 64, k=4, seed=0)(x)
    torch.testing.assert_close(out.loss, eager.loss)
    assert sae.W_enc.grad is not None


def test_compiled_decode_still_checks_index_range():
    torch._dynamo.reset()
    W_dec, b_dec = torch.randn(10, 6), torch.randn(6)
    v, bad = torch.rand(4, 3), torch.full((4, 3), 10, dtype=torch.int32)
    with pytest.raises(Exception, match=r"indices must lie in \[0, n_latents=10\)"):
        torch.compile(ops.sparse_decode, backend="aot_eager")(v, bad, W_dec, b_dec)


def _custom_op_cases(backend):
    """Each sae_fast:: custom op on small inputs, every optional half present and absent."""
    x, W_enc, b_enc, W_dec, b_dec = make_sae_tensors(6, 8, 20, requires_grad=False)
    dead = torch.arange(20) % 3 == 0
    idx = torch.randint(0, 20, (6, 3), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    v, g = torch.rand(6, 3), torch.randn(6, 8)
    enc = (backend, x, W_enc, b_enc, b_dec)
    return [
        (custom_ops.topk_select, (*enc, 3)),
        (custom_ops.topk_select, (*enc, 3, dead, 2)),
        (custom_ops.threshold_select, (*enc, torch.zeros(20))),
        (custom_ops.batch_topk_select, (*enc, 3)),
        (custom_ops.sparse_decode, (backend, v, idx, W_dec, b_dec)),
        (custom_ops.sparse_decode, (backend, v, idx, W_dec, None)),
        (custom_ops.gather_dot, (backend, g, idx, W_dec)),
        (custom_ops.latent_backward, (backend, idx, 20, v, g, None, None, None)),
        (custom_ops.latent_backward, (backend, idx, 20, None, None, v, g, None)),
        # master weights: fp32 gradients from bf16 rows; the absent half must match its fake's dtype too
        (custom_ops.latent_backward, (backend, idx, 20, v, g.bfloat16(), v, g.bfloat16(), torch.float32)),
        (custom_ops.latent_backward, (backend, idx, 20, None, None, v, g.bfloat16(), torch.float32)),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_custom_op_fakes_match_the_kernels(backend):
    """torch.library.opcheck: every op's fake (what torch.compile traces) gives the shapes and dtypes the
    real op returns, and the schema and autograd registration are sound."""
    for op, args in _custom_op_cases(backend):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matryoshka_ops_compile_fullgraph(backend):
    """The Matryoshka decode and its one-pass backward are custom ops too (widths are a constant list)."""
    from sae_fast.matryoshka import matryoshka_decode
    torch._dynamo.reset()
    tensors = make_sae_tensors(16, 8, 64)
    params = [tensors[1], tensors[3]]
    widths = [5, 20, 64]

    def loss(x, W_enc, b_enc, W_dec, b_dec):
        r = ops.topk_sae(x, W_enc, b_enc, W_dec, b_dec, 4, matryoshka=widths)
        v, i = ops.batch_topk_encode(x, W_enc, b_enc, b_dec, 4)
        return (r.prefixes - x).pow(2).sum() + matryoshka_decode(v, i, W_dec, b_dec, widths).pow(2).sum()

    with sae_fast.use_backend(backend):
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
        out = compiled(*tensors)
        grads = torch.autograd.grad(out, params)
        ref = loss(*tensors)
        ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
