"""Every sparse backend against reference.py: values, indices, every gradient, odd shapes, both dtypes.

The triton backend joins where Triton's interpreter runs its kernels on CPU tensors (TRITON_INTERPRET=1,
see conftest.py), at smaller sizes: the interpreter runs every program in numpy. Its kernels' own paths
(configs, splits, GEMM + scan) are tested in test_triton_kernels.py.
"""
import pytest
import torch
from helpers import (
    CPU_BACKENDS,
    DTYPES,
    INTERPRETED_TRITON,
    close,
    encode_decode,
    grads_match,
    make_sae_tensors,
    ref_grads,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import sae_fast
from sae_fast import dispatch, ops
from sae_fast import reference as R

BACKENDS = CPU_BACKENDS + INTERPRETED_TRITON
SHAPES = [(1, 1, 1, 1), (7, 5, 33, 1), (33, 17, 7, 7), (16, 8, 64, 4), (9, 33, 1000, 32)]
TRITON_SHAPES = [(1, 1, 1, 1), (7, 5, 33, 1), (33, 17, 70, 7), (9, 33, 300, 32), (5, 3, 6, 6)]


def backend_cases(shapes, triton_shapes):
    """(backend, *shape) for each CPU backend at ``shapes`` and the interpreted triton at ``triton_shapes``."""
    return ([(b, *s) for b in CPU_BACKENDS for s in shapes] +
            [(b, *s) for b in INTERPRETED_TRITON for s in triton_shapes])


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("backend,B,d,n,k", backend_cases(SHAPES, TRITON_SHAPES))
def test_topk_sae_matches_reference(backend, dtype, atol, rtol, B, d, n, k):
    """Encode (with AuxK), decode, and every gradient of the one-node TopK SAE."""
    tensors = make_sae_tensors(B, d, n, dtype)
    dead = torch.arange(n) % 3 == 0
    k_aux = min(3, n)

    def fn(x, W_enc, b_enc, W_dec, b_dec):
        return ops.topk_sae(x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux)

    with sae_fast.use_backend(backend):
        out = fn(*tensors)
    ref, t64 = ref_grads(fn, tensors)
    if dtype == torch.float32:
        assert torch.equal(out.indices, ref.indices)
        assert torch.equal(out.aux_indices, ref.aux_indices)
    close(R.sparse_to_dense(out.values, out.indices, n), R.sparse_to_dense(ref.values, ref.indices, n), atol, rtol,
          "values")
    close(R.sparse_to_dense(out.aux_values, out.aux_indices, n),
          R.sparse_to_dense(ref.aux_values, ref.aux_indices, n), atol, rtol, "aux values")
    close(out.x_hat, ref.x_hat, atol * 10, rtol, "x_hat")
    assert out.indices.dtype == torch.int32 and out.values.dtype == dtype and out.x_hat.dtype == dtype

    loss = lambda v, i, xh, av, ai: (xh.float() ** 2).sum() + (v.float() ** 2).sum() + av.float().sum()
    grads_match(loss, out, ref, tensors, t64, atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("backend,B,d,n,k", backend_cases(SHAPES, [(13, 9, 70, 3)]))
@pytest.mark.parametrize("act", ["topk", "batchtopk", "relu", "threshold", "jumprelu"])
def test_encode_decode_matches_reference(backend, dtype, atol, rtol, B, d, n, k, act):
    """encode_decode with ``backend`` against reference.py in float64: values, x_hat, every gradient."""
    tensors = make_sae_tensors(B, d, n, dtype, seed=1)
    theta = (torch.rand(n, generator=torch.Generator().manual_seed(2)) * 0.3 + 0.05).to(dtype).requires_grad_()

    def fn(*t):
        return encode_decode(act, k, *t)

    with sae_fast.use_backend(backend):
        out = fn(*tensors, theta)
    ref, t64 = ref_grads(fn, tensors + [theta])
    dense, dense_ref = R.sparse_to_dense(out[0], out[1], n), R.sparse_to_dense(ref[0], ref[1], n)
    if act == "jumprelu" and dtype == torch.bfloat16:
        # A pre-activation within bf16 rounding of its threshold may land on either side.
        pre = R.pre_activations(*[t.detach().double() for t in (tensors[0], tensors[1], tensors[2], tensors[4])])
        far = (pre - theta.detach().double()).abs() > 2e-2 * theta.detach().double()
        dense, dense_ref = dense * far, dense_ref * far
    else:
        close(out[2], ref[2], atol * 10, rtol, "x_hat")
    close(dense, dense_ref, atol, rtol, "values")
    if act == "topk" and dtype == torch.float32:
        assert torch.equal(out[1], ref[1])
    loss = lambda v, i, xh, l0: (xh.float() ** 2).sum() + (v.float() ** 2).sum() + l0.float()
    if act == "jumprelu" and dtype == torch.bfloat16:
        return  # entries within bf16 rounding of theta flip sides; the fp32 case checks theta's gradient
    grads_match(loss, out, ref, tensors + [theta], t64, atol, rtol)


MASTER_ACTS = ["topk_sae", "topk", "batchtopk", "relu", "threshold", "jumprelu"]


def _selection_boundary(act, pre, k, theta):
    """Where ``act`` decides in or out, per entry of the (B, n) pre-activations."""
    if act in ("topk", "topk_sae"):
        return pre.topk(k, dim=1).values[:, -1:].expand_as(pre)
    if act == "batchtopk":
        return pre.reshape(-1).topk(k * pre.shape[0]).values[-1].expand_as(pre)
    if act == "jumprelu":
        return theta.expand_as(pre)
    return torch.full_like(pre, 0.1 if act == "threshold" else 0.0)


def check_master_weights(backend, act, B=13, d=9, n=70, k=3):
    """bf16 activations beside fp32 master weights: outputs in bf16, every weight gradient in fp32 (x's in
    bf16), all matching reference.py in float64 on the same numbers to bf16 accuracy. An entry may change
    sides only within bf16 rounding of its selection boundary (a kernel may round W_enc to bf16 for the
    GEMM, as autocast does); gradients are compared when no entry did."""
    x, *weights = make_sae_tensors(B, d, n, torch.float32, seed=3)
    x = x.to(torch.bfloat16).requires_grad_()
    theta = (torch.rand(n, generator=torch.Generator().manual_seed(4)) * 0.3 + 0.05).requires_grad_()
    dead = torch.arange(n) % 3 == 0

    def fn(x, W_enc, b_enc, W_dec, b_dec, theta):
        if act == "topk_sae":
            out = ops.topk_sae(x, W_enc, b_enc, W_dec, b_dec, k, dead, 3)
            return out.values, out.indices, out.x_hat, out.aux_values.float().sum()
        return encode_decode(act, k, x, W_enc, b_enc, W_dec, b_dec, theta)

    tensors = [x, *weights, theta]
    with sae_fast.use_backend(backend):
        out = fn(*tensors)
    assert out[0].dtype == out[2].dtype == torch.bfloat16, "values and x_hat come back in the activations' dtype"
    ref, t64 = ref_grads(fn, tensors)
    dense, dense_ref = R.sparse_to_dense(out[0], out[1], n), R.sparse_to_dense(ref[0], ref[1], n)
    pre = R.pre_activations(*[t.detach().double() for t in (x, weights[0], weights[1], weights[3])])
    bound = _selection_boundary(act, pre, k, theta.detach().double())
    near = (pre - bound).abs() <= 2e-2 * bound.abs() + 1e-2
    flipped = (dense != 0) != (dense_ref != 0)
    assert not (flipped & ~near).any(), "an entry far from its selection boundary changed sides"
    close(dense * ~flipped, dense_ref * ~flipped, 3e-2, 3e-2, "values")
    loss = lambda v, i, xh, extra: (xh.float() ** 2).sum() + (v.float() ** 2).sum() + extra.float()
    used = len(tensors) if act == "jumprelu" else len(tensors) - 1  # theta only matters to JumpReLU
    grads = torch.autograd.grad(loss(*out), tensors[:used], retain_graph=True)
    assert [g.dtype for g in grads] == [t.dtype for t in tensors[:used]], "each gradient in its input's dtype"
    if not flipped.any():
        close(out[2], ref[2], 3e-1, 3e-2, "x_hat")
        grads_match(loss, out, ref, tensors[:used], t64[:used], 3e-2, 3e-2)
    return bool(flipped.any())


def _spy_triton_encoder_weights(monkeypatch, master_in_kernel):
    """Set the triton backend's ``master_in_kernel`` option; the list it returns collects the dtype of each
    W_enc handed to the fused encoders."""
    from sae_fast.backends.triton import EncoderOptions
    from sae_fast.kernels import threshold_encoder, topk_encoder

    monkeypatch.setattr(dispatch.lookup_backend("triton"), "options", EncoderOptions(master_in_kernel=master_in_kernel))
    seen = []
    for module, name in ((topk_encoder, "topk_select"), (threshold_encoder, "threshold_select")):
        original = getattr(module, name)
        spy = (lambda f: lambda x, W, *a, **kw: seen.append(W.dtype) or f(x, W, *a, **kw))(original)
        monkeypatch.setattr(module, name, spy)
    return seen


# triton twice: its encoder tiles get a per-call bf16 copy of W_enc, or the fp32 weights (master_in_kernel).
MASTER_CASES = [(b, None) for b in CPU_BACKENDS] + [(b, m) for b in INTERPRETED_TRITON for m in (False, True)]


@pytest.mark.parametrize("backend,master_in_kernel", MASTER_CASES)
@pytest.mark.parametrize("act", MASTER_ACTS)
@pytest.mark.parametrize("n", [70, 8])  # 8: B*k > 3n, so the gathers read a bf16 copy of W_dec (ops._gathered)
def test_master_weights_beside_bf16_activations(monkeypatch, backend, master_in_kernel, act, n):
    """fp32 weights with bf16 x. The triton backend's encoder tiles get a bf16 copy, or (master_in_kernel)
    the fp32 weights themselves and round them in registers; its decoder and backward kernels read fp32
    and write fp32 gradients."""
    seen = _spy_triton_encoder_weights(monkeypatch, master_in_kernel) if backend == "triton" else None
    check_master_weights(backend, act, n=n)
    if seen is not None and act != "batchtopk":  # BatchTopK selects through the torch backend's candidates
        assert seen and set(seen) == {torch.float32 if master_in_kernel else torch.bfloat16}


@pytest.mark.parametrize("act", MASTER_ACTS)
def test_reference_reads_master_weights_as_autocast_copies(act):
    """The spec of master weights: the op on the weights rounded to the activations' dtype."""
    x, *weights = make_sae_tensors(13, 9, 70, torch.float32, seed=3)
    x = x.to(torch.bfloat16)
    theta = (torch.rand(70, generator=torch.Generator().manual_seed(4)) * 0.3 + 0.05).requires_grad_()
    masters = [*weights, theta]
    copies = [t.detach().to(torch.bfloat16).requires_grad_() for t in masters]

    def run(W_enc, b_enc, W_dec, b_dec, theta):
        if act == "topk_sae":
            out = ops.topk_sae(x, W_enc, b_enc, W_dec, b_dec, 3, torch.arange(70) % 3 == 0, 3)
            return out.values, out.indices, out.x_hat, out.aux_values.float().sum()
        return encode_decode(act, 3, x, W_enc, b_enc, W_dec, b_dec, theta)

    with sae_fast.use_backend("reference"):
        a, b = run(*masters), run(*copies)
        for u, v in zip(a, b):
            assert torch.equal(u, v)
        loss = lambda v, i, xh, extra: (xh.float() ** 2).sum() + (v.float() ** 2).sum() + extra.float()
        ga = torch.autograd.grad(loss(*a), masters, allow_unused=True)
        gb = torch.autograd.grad(loss(*b), copies, allow_unused=True)
    for u, v in zip(ga, gb):
        assert (u is None) == (v is None)
        if u is not None:
            # Equal up to where the two sum a weight's several uses (fp32 here, bf16 for the copies).
            assert u.dtype == torch.float32
            torch.testing.assert_close(u, v.float(), atol=1e-2 * v.abs().max().item(), rtol=1e-2)


def test_weights_must_match_x_or_be_fp32_masters():
    x, W_enc, b_enc, W_dec, b_dec = make_sae_tensors(4, 3, 8)
    with pytest.raises(TypeError, match="float32 master weights"):
        ops.topk_encode(x.bfloat16(), W_enc.half(), b_enc, b_dec, 2)
    with pytest.raises(TypeError, match="like x; got"):
        ops.topk_encode(x, W_enc.bfloat16(), b_enc, b_dec, 2)  # 16-bit weights beside fp32 x: no


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_k_equals_n_and_k_one(backend):
    x, W_enc, b_enc, W_dec, b_dec = make_sae_tensors(5, 3, 6)
    for k in (1, 6):
        with sae_fast.use_backend(backend):
            v, i = ops.topk_encode(x, W_enc, b_enc, b_dec, k)
        with sae_fast.use_backend("reference"):
            rv, ri = ops.topk_encode(x, W_enc, b_enc, b_dec, k)
        assert torch.equal(i, ri)
        torch.testing.assert_close(v, rv)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ties_lower_index_wins(backend):
    # Identical encoder rows give identical scores: every backend must keep the lowest latent ids.
    x = torch.randn(4, 3)
    W_enc = torch.ones(10, 3)
    b = torch.zeros(10)
    with sae_fast.use_backend(backend):
        v, i = ops.topk_encode(x, W_enc, b, torch.zeros(3), 4)
    assert i.tolist() == [[0, 1, 2, 3]] * 4


# (examples, largest B, d, n) per backend: fewer and smaller for the interpreted triton.
FUZZ = {"triton": (6, 20, 20, 90)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_fuzzed_shapes(backend):
    examples, B_max, d_max, n_max = FUZZ.get(backend, (25, 40, 24, 300))

    @settings(max_examples=examples, deadline=None)
    @given(B=st.integers(1, B_max), d=st.integers(1, d_max), n=st.integers(1, n_max), data=st.data())
    def fuzz(B, d, n, data):
        check_topk_against_reference(backend, B, d, n, data.draw(st.integers(1, n)))

    fuzz()


def check_topk_against_reference(backend, B, d, n, k):
    """topk_sae's indices, x_hat and weight gradients against the reference backend, fp32."""
    x, W_enc, b_enc, W_dec, b_dec = make_sae_tensors(B, d, n, seed=B * 1000 + n)
    with sae_fast.use_backend(backend):
        out = ops.topk_sae(x, W_enc, b_enc, W_dec, b_dec, k)
        g = torch.autograd.grad(out.x_hat.pow(2).sum(), [W_enc, b_enc, W_dec, b_dec])
    with sae_fast.use_backend("reference"):
        ref = ops.topk_sae(x, W_enc, b_enc, W_dec, b_dec, k)
        g_ref = torch.autograd.grad(ref.x_hat.pow(2).sum(), [W_enc, b_enc, W_dec, b_dec])
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.x_hat, ref.x_hat, atol=1e-4, rtol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-3 * (b.abs().max().item() + 1), rtol=1e-3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_input_gradient(backend):
    x, W_enc, b_enc, W_dec, b_dec = make_sae_tensors(6, 5, 20)
    x.requires_grad_(True)
    with sae_fast.use_backend(backend):
        gx = torch.autograd.grad(ops.topk_sae(x, W_enc, b_enc, W_dec, b_dec, 3).x_hat.pow(2).sum(), x)[0]
    with sae_fast.use_backend("reference"):
        gx_ref = torch.autograd.grad(ops.topk_sae(x, W_enc, b_enc, W_dec, b_dec, 3).x_hat.pow(2).sum(), x)[0]
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradients_bitwise_deterministic(backend):
    tensors = make_sae_tensors(64, 16, 256)

    def grads():
        with sae_fast.use_backend(backend):
            out = ops.topk_sae(*tensors, 8)
            return torch.autograd.grad(out.x_hat.pow(2).sum(), tensors[1:])

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_sparse_backends_float64(backend):
    """float64 (triton: it falls back to the torch backend) with exact gradients."""
    x, W_enc, b_enc, W_dec, b_dec = [t.double().detach().requires_grad_() for t in make_sae_tensors(4, 3, 7)]
    with sae_fast.use_backend(backend):
        f = lambda x, We, be, Wd, bd: ops.topk_sae(x, We, be, Wd, bd, 2).x_hat
        assert torch.autograd.gradcheck(f, (x, W_enc, b_enc, W_dec, b_dec))
        g = lambda We, be, bd: ops.relu_encode(x, We, be, bd)[0]
        assert torch.autograd.gradcheck(g, (W_enc, b_enc, b_dec))


def test_b_dec_gradient_through_the_gemv_form(monkeypatch):
    # GPUs take db_dec's encoder part as db_enc @ W_enc; check that form here by allowing it on CPU.
    monkeypatch.setattr(ops, "_gemv_for_bias_grad", lambda W: True)
    x, W_enc, b_enc, W_dec, b_dec = make_sae_tensors(9, 5, 40)
    dead = torch.arange(40) % 2 == 0
    grads = {}
    for backend in ["torch", "reference"]:
        with sae_fast.use_backend(backend):
            out = ops.topk_sae(x, W_enc, b_enc, W_dec, b_dec, 3, dead, 4)
            v, i = ops.relu_encode(x, W_enc, b_enc, b_dec)
            loss = out.x_hat.pow(2).sum() + out.aux_values.sum() + ops.sparse_decode(v, i, W_dec, b_dec).sum()
            grads[backend] = torch.autograd.grad(loss, b_dec)[0]
    torch.testing.assert_close(grads["torch"], grads["reference"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,K,n,d", [(1, 1, 1, 1), (7, 5, 33, 3), (64, 12, 9, 17)])
def test_decoder_norm_l1_and_its_gradients_match_reference(backend, dtype, B, K, n, d):
    # Repeated latents within and across rows, and zero-valued padding slots at latent 0.
    g = torch.Generator().manual_seed(B * 100 + K)
    idx = torch.randint(0, n, (B, K), generator=g, dtype=torch.int32)
    values = torch.randn(B, K, generator=g).relu().to(dtype).requires_grad_()
    with torch.no_grad():
        values[:, -1] = 0
    idx[:, -1] = 0
    W_dec = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    with sae_fast.use_backend(backend):
        l1 = ops.decoder_norm_l1(values, idx, W_dec)
        gv, gw = torch.autograd.grad(l1 * 3.0, (values, W_dec))
        again = torch.autograd.grad(ops.decoder_norm_l1(values, idx, W_dec) * 3.0, (values, W_dec))
    v64, w64 = values.detach().double().requires_grad_(), W_dec.detach().double().requires_grad_()
    ref = R.l1_penalty(v64, idx, w64)
    gv_ref, gw_ref = torch.autograd.grad(ref * 3.0, (v64, w64))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    close(l1, ref, tol, tol, "l1")
    close(gv, gv_ref, tol, tol, "grad values")
    close(gw, gw_ref, tol, tol, "grad W_dec")
    assert torch.equal(gv, again[0]) and torch.equal(gw, again[1])  # bitwise, run to run


def test_segment_sum_sums_each_latent_in_a_fixed_order():
    idx = torch.tensor([[3, 0, 3], [1, 3, 0]])
    src = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]])
    assert ops._segment_sum(src, idx, 5).tolist() == [34.0, 8.0, 0.0, 21.0, 0.0]
