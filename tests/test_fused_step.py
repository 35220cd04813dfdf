"""sae_fast.optim.FusedAdam: the fused training step against the unfused reference path
(loss.backward(), remove_parallel_grad_(), torch.optim.Adam, normalize_decoder_()), its determinism,
its Adam state (torch.optim.Adam's, so runs resume across fused and unfused) and its fallbacks."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from helpers import INTERPRETED_TRITON

import sae_fast
from sae_fast import SparseAutoencoder, ops
from sae_fast.optim import UNIT_NORM_ACTIVATIONS, FusedAdam, training_loss

pytestmark = pytest.mark.skipif("cpu" not in ops.available_backends(), reason="needs the cpu backend (sae_fast._C)")

# (activation, SAE options): JumpReLU with a wide window so its thresholds get gradients.
CASES = {
    "topk+auxk": ("topk", dict(k=5, k_aux=9)),
    # Wider than the triton encoder's fused AuxK list (32) beside bf16 tiles: its dead-row block.
    "topk+wide auxk": ("topk", dict(k=5, k_aux=36)),
    "topk k=1": ("topk", dict(k=1, k_aux=3)),
    "topk no aux": ("topk", dict(k=4, k_aux=0)),
    "batchtopk": ("batchtopk", dict(k=5)),
    "relu": ("relu", dict(l1_coeff=0.3)),
    "jumprelu": ("jumprelu", dict(l0_coeff=0.5, jumprelu_bandwidth=0.5, jumprelu_init_threshold=0.2)),
}


def _sae(act, d, n, opts, dead_every=3):
    sae = SparseAutoencoder(d, n, act, seed=0, dead_tokens=100, **opts)
    sae.tokens_since_fired[::dead_every] = 1000  # some dead latents (AuxK), fewer than k_aux at times
    # Untie the encoder from the decoder: with tied rows a latent's gradient cancels to rounding level,
    # where Adam (g / (|g| + eps)) turns float rounding into steps of order lr, fused or not.
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        sae.W_enc.add_(torch.randn(n, d, generator=g) * 0.3)
        sae.b_enc.add_(torch.randn(n, generator=g) * 0.1)
    return sae


def _unfused_step(sae, opt, x, weight):
    out = sae(x)
    training_loss(sae, out, weight).backward()
    if sae.cfg.activation in UNIT_NORM_ACTIVATIONS:
        sae.remove_parallel_grad_()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if sae.cfg.activation in UNIT_NORM_ACTIVATIONS:
        sae.normalize_decoder_()
    return out


def _batches(B, d, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, d, generator=g) * 2 for _ in range(steps)]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", [(37, 20, 70), (16, 67, 131)], ids=["odd-small", "odd-d67"])
def test_fused_step_matches_unfused_reference_path(case, shape):
    act, opts = CASES[case]
    B, d, n = shape
    sae = _sae(act, d, n, opts)
    ref = copy.deepcopy(sae)
    fused = FusedAdam(sae, lr=3e-3)
    plain = torch.optim.Adam(ref.parameters(), lr=3e-3)
    with sae_fast.use_backend("cpu"):
        for step, x in enumerate(_batches(B, d, 4)):
            assert fused.fused_reason(x) is None
            out = fused.step_fused(x, sparsity_weight=0.5)
            want = _unfused_step(ref, plain, x, 0.5)
            for name in ("loss", "mse", "fvu", "aux_loss", "l1", "l0"):
                torch.testing.assert_close(getattr(out, name), getattr(want, name).detach(), rtol=1e-5, atol=1e-6,
                                           msg=f"{name} at step {step}")
            assert torch.equal(out.indices, want.indices)
            for (name, p), q in zip(sae.named_parameters(), ref.parameters()):
                torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=2e-6, msg=f"{name} at step {step}")
            torch.testing.assert_close(sae.tokens_since_fired, ref.tokens_since_fired)
    # Same state layout and values as torch.optim.Adam's.
    for p, q in zip(sae.parameters(), ref.parameters()):
        a, b = fused.state[p], plain.state[q]
        assert set(a) == set(b) == {"step", "exp_avg", "exp_avg_sq"}
        assert float(a["step"]) == float(b["step"]) == 4.0
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("case", ["topk+auxk", "relu"])
def test_fused_step_over_several_latent_blocks(case):
    # n > 256: the cpu kernel sums b_dec's encoder-side gradient per block of 256 latents, then the blocks.
    test_fused_step_matches_unfused_reference_path(case, (29, 12, 700))


@pytest.mark.parametrize("backend", INTERPRETED_TRITON)
@pytest.mark.parametrize("case", ["topk+auxk", "batchtopk", "relu", "jumprelu"])
def test_triton_fused_step_matches_unfused(backend, case):
    """kernels/fused_step.py under Triton's interpreter, small sizes (d = 20: a partial column block)."""
    act, opts = CASES[case]
    B, d, n = 9, 20, 40
    sae = _sae(act, d, n, opts)
    ref = copy.deepcopy(sae)
    fused = FusedAdam(sae, lr=3e-3)
    plain = torch.optim.Adam(ref.parameters(), lr=3e-3)
    for step, x in enumerate(_batches(B, d, 2)):
        with sae_fast.use_backend(backend):
            assert fused.fused_reason(x) is None
            out = fused.step_fused(x, sparsity_weight=0.5)
        with sae_fast.use_backend("cpu"):
            want = _unfused_step(ref, plain, x, 0.5)
        torch.testing.assert_close(out.loss, want.loss.detach(), rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(sae.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=2e-6, msg=f"{name} at step {step}")


@pytest.mark.parametrize("backend", INTERPRETED_TRITON)
@pytest.mark.parametrize("case", ["topk+auxk", "topk+wide auxk", "relu"])
def test_triton_fused_step_under_bf16_autocast(backend, case):
    """Mixed precision: bf16 activations beside fp32 master weights and moments (the GPU default)."""
    act, opts = CASES[case]
    sae = _sae(act, 20, 40, opts)
    ref = copy.deepcopy(sae)
    fused, plain = FusedAdam(sae, lr=1e-3), torch.optim.Adam(ref.parameters(), lr=1e-3)
    x = _batches(9, 20, 1)[0]
    with sae_fast.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused.fused_reason(x) is None
        out = fused.step_fused(x)
        want = ref(x)
    training_loss(ref, want, 1.0).backward()
    if act in UNIT_NORM_ACTIVATIONS:
        ref.remove_parallel_grad_()
    plain.step()
    if act in UNIT_NORM_ACTIVATIONS:
        ref.normalize_decoder_()
    torch.testing.assert_close(out.loss, want.loss.detach(), rtol=1e-2, atol=1e-3)
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    for p, q in zip(sae.parameters(), ref.parameters()):  # bf16 rounding can flip a step's sign: |diff| <= 2 lr
        assert float((p - q).abs().max()) <= 2.5e-3


def test_auxk_is_exercised():
    """The AuxK cases above see dead latents, and some batches have fewer dead latents than k_aux."""
    act, opts = CASES["topk+auxk"]
    sae = _sae(act, 20, 70, opts, dead_every=12)
    assert 0 < int(sae.dead_mask.sum()) < opts["k_aux"]
    out = FusedAdam(sae, lr=1e-3).step_fused(_batches(37, 20, 1)[0])
    assert float(out.aux_loss) > 0


def test_resume_across_fused_and_unfused():
    """A torch.optim.Adam continues from FusedAdam's state and the other way round, on the same trajectory."""
    act, opts = CASES["topk+auxk"]
    xs = _batches(37, 20, 6)
    sae = _sae(act, 20, 70, opts)
    ref = copy.deepcopy(sae)
    opt = FusedAdam(sae, lr=3e-3)
    with sae_fast.use_backend("cpu"):
        for x in xs[:2]:
            opt.step_fused(x)
        plain = torch.optim.Adam(sae.parameters(), lr=3e-3)
        plain.load_state_dict(opt.state_dict())
        for x in xs[2:4]:
            _unfused_step(sae, plain, x, 1.0)
        again = FusedAdam(sae, lr=3e-3)
        again.load_state_dict(plain.state_dict())
        for x in xs[4:]:
            again.step_fused(x)
        uninterrupted = FusedAdam(ref, lr=3e-3)
        for x in xs:
            uninterrupted.step_fused(x)
    for p, q in zip(sae.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=2e-6)
    assert float(again.state[sae.W_dec]["step"]) == 6.0


def test_falls_back_to_the_unfused_step_where_no_kernel_applies():
    act, opts = CASES["relu"]
    x = _batches(37, 20, 1)[0]
    sae = _sae(act, 20, 70, opts)
    ref = copy.deepcopy(sae)
    opt = FusedAdam(sae, lr=3e-3)
    with sae_fast.use_backend("torch"):
        assert "torch backend" in opt.fused_reason(x)
        opt.step_fused(x, 0.5)
    _unfused_step(ref, torch.optim.Adam(ref.parameters(), lr=3e-3), x, 0.5)
    for p, q in zip(sae.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=2e-6)
    assert all(p.grad is None for p in sae.parameters())
    opt.param_groups[0]["weight_decay"] = 0.1
    assert "weight decay" in opt.fused_reason(x)


def test_kernel_rejects_out_of_range_indices_and_updates_nothing():
    from sae_fast.dispatch import lookup_backend

    n, d, B, K = 8, 4, 3, 2
    W_enc, W_dec, b_enc = torch.randn(n, d), torch.randn(n, d), torch.randn(n)
    before = [t.clone() for t in (W_enc, b_enc, W_dec)]
    moments = [torch.zeros(n, d), torch.zeros(n, d), torch.zeros(n), torch.zeros(n), torch.zeros(n, d), torch.zeros(n, d)]
    idx = torch.tensor([[0, 1], [2, n], [3, 4]], dtype=torch.int32)
    ones = torch.ones(B, K)
    with pytest.raises(ValueError, match="indices must lie in"):
        lookup_backend("cpu").fused_adam_step(idx, ones, K, ones, torch.ones(B, d), ones, torch.ones(B, d), None,
                                              [W_enc, b_enc, W_dec], moments, (1e-3, 1.0, 0.9, 0.999, 1e-8), True, True)
    assert all(torch.equal(a, b) for a, b in zip(before, (W_enc, b_enc, W_dec)))


_DETERMINISM = r"""
import sys, torch, sae_fast
from sae_fast import SparseAutoencoder
from sae_fast.optim import FusedAdam
torch.set_num_threads(int(sys.argv[1]))
def run():
    out = []
    for act, kw in (("topk", dict(k=8, k_aux=24)), ("relu", dict(l1_coeff=0.1))):
        sae = SparseAutoencoder(64, 4096, act, seed=0, dead_tokens=100, **kw)
        sae.tokens_since_fired[::3] = 1000
        opt = FusedAdam(sae, lr=1e-3)
        g = torch.Generator().manual_seed(1)
        with sae_fast.use_backend("cpu"):
            for _ in range(3):
                opt.step_fused(torch.randn(256, 64, generator=g))
        out += [p.detach().clone() for p in sae.parameters()]
        out += [t for p in sae.parameters() for t in (opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])]
    return out
first, second = run(), run()
assert all(torch.equal(a, b) for a, b in zip(first, second)), "two runs differ"
torch.save(first, sys.argv[2])
"""


def test_fused_step_bitwise_across_runs_and_threads(tmp_path):
    """Large enough that the kernels run on the thread pool (n * d + B * K * d >= 2^18)."""
    script = tmp_path / "det.py"
    script.write_text(_DETERMINISM)
    results = []
    for run, threads in enumerate((1, 2)):
        path = tmp_path / f"out{run}.pt"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        subprocess.run([sys.executable, str(script), str(threads), str(path)], env=env, check=True)
        results.append(torch.load(path))
    for other in results[1:]:
        assert len(other) == len(results[0])
        for i, (a, b) in enumerate(zip(results[0], other)):
            assert torch.equal(a, b), f"tensor {i} differs"
