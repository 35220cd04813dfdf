"""The triton backend on a GPU at realistic sizes, against reference.py in float64 (skipped without CUDA).

Run on a GPU machine: ``python -m pytest -q -m gpu tests/test_triton_gpu.py`` (benchmarks/gpu_run.sh
runs it with the benchmark).
"""
import pytest
import torch
from helpers import make_sae_tensors

import sae_fast
from sae_fast import dispatch, ops
from sae_fast import reference as R
from sae_fast.bench.workloads import WORKLOADS

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

DEV = "cuda"
W1, W2 = WORKLOADS["w1"], WORKLOADS["w2"]


def _truth(x, W_enc, b_enc, b_dec):
    return R.pre_activations(*(t.detach().double() for t in (x, W_enc, b_enc, b_dec)))


def test_triton_is_the_default_for_cuda_tensors(monkeypatch):
    monkeypatch.delenv("SAE_FAST_BACKEND", raising=False)
    assert ops.get_backend(DEV).name == "triton"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,d,n,k", [W1.shape, (1000, 1024, 65536, 64), (333, 129, 5000, 1)])
def test_topk_selects_the_true_top_k(dtype, B, d, n, k):
    x, W_enc, b_enc, W_dec, b_dec = make_sae_tensors(B, d, n, dtype, requires_grad=False, device=DEV)
    with sae_fast.use_backend("triton"):
        v, idx = ops.topk_encode(x, W_enc, b_enc, b_dec, k)
    p = _truth(x, W_enc, b_enc, b_dec)
    true_v = p.topk(k, dim=1).values
    got = p.gather(1, idx.long())  # the exact scores of the latents the kernel chose
    # Chosen scores equal the true top-k scores, in order (a near-tie may swap two latents, nothing more).
    torch.testing.assert_close(got, true_v, atol=1e-4, rtol=1e-5)
    assert (idx.long() == p.topk(k, dim=1).indices).float().mean() > 0.999
    assert (idx.sort(1).values.diff(dim=1) > 0).all()  # no latent twice in a row
    torch.testing.assert_close(v.double(), true_v.relu(), atol=2e-2 if dtype == torch.bfloat16 else 1e-4, rtol=1e-2)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float32, 1e-4)])
def test_topk_sae_gradients_match_reference(dtype, tol):
    B, d, n, k = 2048, 512, 16384, 32
    tensors = make_sae_tensors(B, d, n, dtype, device=DEV)
    dead = torch.arange(n, device=DEV) % 7 == 0

    def loss(backend, ts):
        with sae_fast.use_backend(backend):
            out = ops.topk_sae(*ts, k, dead, 16)
        return (out.x_hat.float() ** 2).sum() + out.aux_values.float().sum(), out

    total, out = loss("triton", tensors)
    grads = torch.autograd.grad(total, tensors[1:])
    t64 = [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    l64, ref = loss("reference", t64)
    grads64 = torch.autograd.grad(l64, t64[1:])
    match = (out.indices == ref.indices).all(1)  # rows where a near-tie did not swap a latent
    assert match.float().mean() > 0.99
    torch.testing.assert_close(out.x_hat[match].double(), ref.x_hat[match], atol=tol * 10, rtol=tol)
    for name, a, b in zip(["W_enc", "b_enc", "W_dec", "b_dec"], grads, grads64):
        scale = b.abs().max().item() + 1.0
        err = (a.double() - b).abs().max().item() / scale
        assert err < (5e-2 if dtype == torch.bfloat16 else 1e-3), \
            f"grad {name}: max error {err:.2e} of scale {scale:.2e}"


def test_backward_is_bitwise_deterministic():
    tensors = make_sae_tensors(W1.batch, W1.d, W1.n, torch.bfloat16, device=DEV)

    def grads():
        with sae_fast.use_backend("triton"):
            out = ops.topk_sae(*tensors, 32)
            return torch.autograd.grad(out.x_hat.float().pow(2).sum(), tensors[1:])

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("act", ["relu", "jumprelu", "batchtopk", "threshold"])
def test_other_activations_match_reference(act):
    B, d, n, k = 1024, 768, 16384, 32
    x, W_enc, b_enc, W_dec, b_dec = make_sae_tensors(B, d, n, torch.bfloat16, requires_grad=False, device=DEV)
    b_enc = b_enc - 3.0  # a sparse regime: tens of active latents per row
    theta = torch.full((n,), 0.05, dtype=torch.bfloat16, device=DEV)

    def enc(x, W_enc, b_enc, b_dec):
        if act == "relu":
            return ops.relu_encode(x, W_enc, b_enc, b_dec)
        if act == "jumprelu":
            return ops.jumprelu_encode(x, W_enc, b_enc, b_dec, theta.to(x.dtype), 0.01)
        if act == "batchtopk":
            return ops.batch_topk_encode(x, W_enc, b_enc, b_dec, k)
        return ops.threshold_encode(x, W_enc, b_enc, b_dec, 0.1)

    with sae_fast.use_backend("triton"):
        v, i = enc(x, W_enc, b_enc, b_dec)
    with sae_fast.use_backend("reference"):
        rv, ri = enc(*(t.double() for t in (x, W_enc, b_enc, b_dec)))
    dense, dense_ref = R.sparse_to_dense(v.double(), i, n), R.sparse_to_dense(rv, ri, n)
    p = _truth(x, W_enc, b_enc, b_dec)
    cut = {"relu": 0.0, "jumprelu": 0.05, "threshold": 0.1}.get(act)
    far = (p - cut).abs() > 1e-3 if cut is not None else (p - p.flatten().topk(B * k).values[-1]).abs() > 1e-3
    torch.testing.assert_close(dense * far, dense_ref * far, atol=2e-2, rtol=1e-2)


def test_encoder_memory_does_not_grow_with_n():
    """Peak memory of a top-k encode beyond its inputs: no (B, n) buffer, at n = 262144."""
    B, d, n, k = 4096, 768, 262144, 32
    x, W_enc, b_enc, _, b_dec = make_sae_tensors(B, d, n, torch.bfloat16, requires_grad=False, device=DEV)
    with sae_fast.use_backend("triton"):
        ops.topk_encode(x, W_enc, b_enc, b_dec, k)  # compile first
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ops.topk_encode(x, W_enc, b_enc, b_dec, k)
        torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < B * n * 2 / 16, f"encode used {extra / 2**20:.0f} MiB beyond its inputs"


def test_master_weights_in_the_tiles_choose_what_a_bf16_copy_chooses(monkeypatch):
    """master_in_kernel rounds fp32 W_enc to bf16 in registers (round to nearest even, as .to() does):
    the same latents and scores as the per-call bf16 copy."""
    from sae_fast.backends.triton import EncoderOptions

    x, W_enc, b_enc, _, b_dec = make_sae_tensors(W1.batch, W1.d, W1.n, torch.float32, requires_grad=False, device=DEV)
    x = x.bfloat16()
    runs = []
    for in_kernel in (False, True):
        monkeypatch.setattr(dispatch.lookup_backend("triton"), "options", EncoderOptions(master_in_kernel=in_kernel))
        with sae_fast.use_backend("triton"):
            runs.append(ops.topk_encode(x, W_enc, b_enc, b_dec, 32))
    assert torch.equal(runs[0][1], runs[1][1])
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=1e-5, rtol=1e-5)


def test_autocast_training_step_gets_fp32_gradients_without_weight_copies():
    """SparseAutoencoder under bf16 autocast on the GPU: fp32 gradients matching the copies' path, and the
    step's peak memory holds no 16-bit copy of W_dec or gradient tensors (W2's n; B*k small enough that the
    decoder gathers read the fp32 W_dec, see ops._gathered)."""
    from sae_fast import SparseAutoencoder

    d, n = W2.d, W2.n
    sae = SparseAutoencoder(d, n, "topk", k=32, k_aux=0, seed=0, device=DEV)
    x = torch.randn(2048, d, device=DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        sae(x).loss.backward()  # compile and allocate the gradients first
    grads = [p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    assert all(g.dtype == torch.float32 for g in grads)
    sae.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        sae(x).loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # The fp32 gradients (2 n d x 4 bytes), one transient bf16 copy of W_enc for the encoder tiles (n d x 2)
    # and small (B, k) and (B, d) tensors. The copies' path also held bf16 W_enc and W_dec through the
    # backward and bf16 gradients beside the fp32 ones: 8 n d bytes more.
    assert extra < 2 * n * d * 4 + 1.5 * n * d * 2, f"the step used {extra / 2**20:.0f} MiB beyond the weights"
    with sae_fast.use_backend("reference"), torch.autocast("cuda", dtype=torch.bfloat16):
        sae.zero_grad(set_to_none=True)
        sae(x).loss.backward()
    for name, a, p in zip(["W_enc", "b_enc", "W_dec", "b_dec"], grads,
                          (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)):
        # Relative to the whole gradient: the reference scores in bf16, so a near-tie may pick another latent.
        assert ((a - p.grad).norm() / p.grad.norm()).item() < 5e-2, name


@pytest.mark.parametrize("chunk", [2048, 5000])
def test_gemm_scan_selects_the_true_top_k(chunk):
    """scan_encoder.topk_scan (cuBLAS fp32-output chunks + the scan kernel), with AuxK, at W1's shape."""
    from sae_fast.kernels.encoder_common import fold_bias
    from sae_fast.kernels.scan_encoder import topk_scan

    B, d, n, k = W1.shape
    x, W_enc, b_enc, _, b_dec = make_sae_tensors(B, d, n, torch.bfloat16, requires_grad=False, device=DEV)
    dead = torch.arange(n, device=DEV) % 5 == 0
    c = fold_bias(W_enc, b_enc, b_dec)
    pre, idx, aux_pre, aux_idx = topk_scan(x, W_enc, c, k, dead, 16, torch.float32, chunk)
    p = _truth(x, W_enc, b_enc, b_dec)
    for got_idx, got_pre, scores, kk in ((idx, pre, p, k), (aux_idx, aux_pre, p.masked_fill(~dead, -1e30), 16)):
        true_v = scores.topk(kk, dim=1).values
        torch.testing.assert_close(scores.gather(1, got_idx.long()), true_v, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(got_pre.double(), true_v, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("act,kw", [("topk", dict(k=32)), ("relu", dict(l1_coeff=0.01))])
def test_fused_training_step_matches_the_unfused_one(act, kw):
    """FusedAdam.step_fused (kernels/fused_step.py) against backward + torch's Adam + the decoder constraints,
    fp32 at a W1-like size with AuxK on (every 10th latent dead), three steps."""
    import copy

    from sae_fast.optim import UNIT_NORM_ACTIVATIONS, FusedAdam, training_loss
    B, d, n = 1024, 768, 16384
    sae = sae_fast.SparseAutoencoder(d, n, act, seed=0, device=DEV, dead_tokens=100, **kw)
    sae.tokens_since_fired[::10] = 1000
    with torch.no_grad():
        sae.W_enc.add_(torch.randn(n, d, device=DEV) * 0.3 / d ** 0.5)  # untied: no rounding-level gradients
    ref = copy.deepcopy(sae)
    fused, plain = FusedAdam(sae, lr=1e-4), torch.optim.Adam(ref.parameters(), lr=1e-4)
    g = torch.Generator(device=DEV).manual_seed(0)
    with sae_fast.use_backend("triton"):
        for _ in range(3):
            x = torch.randn(B, d, device=DEV, generator=g)
            assert fused.fused_reason(x) is None
            fused.step_fused(x)
            out = ref(x)
            training_loss(ref, out).backward()
            if act in UNIT_NORM_ACTIVATIONS:
                ref.remove_parallel_grad_()
            plain.step()
            plain.zero_grad(set_to_none=True)
            if act in UNIT_NORM_ACTIVATIONS:
                ref.normalize_decoder_()
    for (name, p), q in zip(sae.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-6, msg=name)


@pytest.mark.parametrize("act", ["topk", "batchtopk"])
def test_matryoshka_prefixes_and_gradients_match_the_torch_backend(act):
    # The Triton Matryoshka kernels (kernels/matryoshka.py) at a realistic size, fp32, against the plain
    # torch primitives (which match reference.py in tests/test_matryoshka_kernels.py).
    B, d, n, k = 2048, 512, 16384, 32
    widths = [256, 1000, 4096, 16384]
    x = make_sae_tensors(B, d, n, torch.float32, requires_grad=False, device=DEV)[0]

    def run(backend):
        sae = sae_fast.SparseAutoencoder(d, n, act, k=k, seed=0, k_aux=0, matryoshka=widths, device=DEV)
        with sae_fast.use_backend(backend):
            out = sae(x)
            out.loss.backward()
        return out, {name: p.grad for name, p in sae.named_parameters()}

    (out, grads), (ref, ref_grads) = run("triton"), run("torch")
    if out.indices.shape == ref.indices.shape:  # a near-tie may swap a latent in a few rows, nothing more
        assert (out.indices == ref.indices).all(1).float().mean() > 0.99
    torch.testing.assert_close(out.prefix_fvu, ref.prefix_fvu, atol=1e-4, rtol=1e-4)
    for name, g in ref_grads.items():
        scale = g.abs().max().item() + 1.0
        assert (grads[name] - g).abs().max().item() / scale < 1e-3, name


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("act", ["topk", "batchtopk", "relu", "jumprelu"])
def test_training_steps_do_not_sync(act, fused):
    """tests/test_no_sync.py on the GPU: after a step that sizes the lists, whole bf16-autocast steps (AuxK
    at the default k_aux = d / 2, every 10th latent dead) under torch.cuda.set_sync_debug_mode("error")."""
    from sae_fast.checks import deferred_finite_checks, raise_if_nonfinite
    from sae_fast.optim import UNIT_NORM_ACTIVATIONS, FusedAdam, make_adam, training_loss
    B, d, n = 1024, 256, 8192
    sae = sae_fast.SparseAutoencoder(d, n, act, k=16, seed=0, device=DEV, dead_tokens=1_000_000, l1_coeff=0.01)
    sae.tokens_since_fired[::10] = 2_000_000
    opt = FusedAdam(sae, lr=1e-4) if fused else make_adam(sae.parameters(), 1e-4)
    g = torch.Generator(device=DEV).manual_seed(0)
    xs = [torch.randn(B, d, device=DEV, generator=g) for _ in range(3)]

    def step(x):
        with torch.autocast(DEV, dtype=torch.bfloat16):
            if fused:
                return opt.step_fused(x).loss
            out = sae(x)
            training_loss(sae, out).backward()
        if act in UNIT_NORM_ACTIVATIONS:
            sae.remove_parallel_grad_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if act in UNIT_NORM_ACTIVATIONS:
            sae.normalize_decoder_()
        return out.loss.detach()

    with sae_fast.use_backend("triton"), deferred_finite_checks():
        if fused:
            assert opt.fused_reason(xs[0]) is None
        step(xs[0])  # sizes the lists (reads)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            losses = [step(x) for x in xs[1:]]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        raise_if_nonfinite()
    assert all(torch.isfinite(v) for v in losses)
