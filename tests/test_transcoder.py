"""Transcoders and skip transcoders: the module against reference.py on every backend (values and every
gradient, d_out = d_in and not, AuxK on the target's residual), and the fused step against the unfused one."""
import copy

import pytest
import torch
from helpers import CPU_BACKENDS, INTERPRETED_TRITON

import sae_fast
from sae_fast import SparseAutoencoder
from sae_fast import reference as R
from sae_fast.optim import FusedAdam, training_loss


def _transcoder(d, n, d_out, skip, act="topk", seed=1, **opts):
    sae = SparseAutoencoder(d, n, act, transcode=True, d_out=d_out, skip_connection=skip, seed=seed,
                            dead_tokens=100, **opts)
    sae.tokens_since_fired[::3] = 1000  # some dead latents for AuxK
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # W_dec and W_skip start at zero; make every term count
        sae.W_dec.copy_(torch.randn(n, d_out, generator=g) / d_out ** 0.5)
        sae.b_dec.copy_(torch.randn(d_out, generator=g) * 0.1)
        sae.b_enc.copy_(torch.randn(n, generator=g) * 0.1)
        if skip:
            sae.W_skip.copy_(torch.randn(d_out, d, generator=g) * 0.1)
    return sae


def _data(B, d, d_out, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g)
    return x, torch.randn(B, d_out, generator=g) + x[:, :1]


def test_config_and_init_follow_sparsify():
    sae = SparseAutoencoder(8, 32, transcode=True, skip_connection=True, seed=0)
    assert sae.d_out == 8 and sae.cfg.k_aux == 4
    assert not sae.W_dec.any() and not sae.W_skip.any() and sae.W_skip.shape == (8, 8)
    assert not sae.unit_norm_decoder  # transcoders keep no unit-norm decoder rows (sparsify)
    assert SparseAutoencoder(8, 32, transcode=True, d_out=5).W_dec.shape == (32, 5)
    with pytest.raises(ValueError, match="only a transcoder"):
        SparseAutoencoder(8, 32, d_out=5)
    with pytest.raises(TypeError, match="transcode must be a bool"):
        SparseAutoencoder(8, 32, transcode=1)
    with pytest.raises(TypeError, match="needs target="):
        sae(torch.randn(2, 8))
    with pytest.raises(ValueError, match="target= is for transcoders"):
        SparseAutoencoder(8, 32)(torch.randn(2, 8), target=torch.randn(2, 8))


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS + INTERPRETED_TRITON)
@pytest.mark.parametrize("d_out", [20, 13])
@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_transcoder_matches_reference(backend, d_out, skip):
    B, d, n, k = 9, 20, 48, 4
    sae = _transcoder(d, n, d_out, skip, k=k, k_aux=7)
    x, y = _data(B, d, d_out)
    dead = sae.dead_mask.clone()
    with sae_fast.use_backend(backend):
        out = sae(x, target=y)
        out.loss.backward()
    params = dict(sae.named_parameters())
    ref = {name: p.detach().double().requires_grad_() for name, p in params.items()}
    y_hat, values, indices, fvu, loss = R.transcoder_forward(
        x.double(), y.double(), ref["W_enc"], ref["b_enc"], ref["W_dec"], ref["b_dec"], ref.get("W_skip"), k,
        dead, 7, sae.cfg.aux_coeff)
    loss.backward()
    assert torch.equal(out.indices.long(), indices.long())
    torch.testing.assert_close(out.x_hat.double(), y_hat.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.fvu.double(), fvu.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), loss.detach(), rtol=1e-5, atol=1e-6)
    assert float(out.aux_loss.detach()) > 0
    for name, p in params.items():
        torch.testing.assert_close(p.grad.double(), ref[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def _unfused_step(sae, opt, x, y, weight):
    out = sae(x, target=y)
    training_loss(sae, out, weight).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out


CASES = {"topk+auxk": ("topk", dict(k=5, k_aux=9)), "batchtopk": ("batchtopk", dict(k=5)),
         "relu": ("relu", dict(l1_coeff=0.3)),
         "jumprelu": ("jumprelu", dict(l0_coeff=0.5, jumprelu_bandwidth=0.5, jumprelu_init_threshold=0.2))}


@pytest.mark.parametrize("backend", [b for b in ("cpu",) if b in CPU_BACKENDS] + INTERPRETED_TRITON)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_fused_step_matches_unfused(backend, case, skip):
    """The transcoder's step fused (zero encoder bias, target y, W_skip's dense gradient + Adam) equals the
    module's backward + torch.optim.Adam."""
    act, opts = CASES[case]
    B, d, n = 11, 20, 40
    sae = _transcoder(d, n, d, skip, act, **opts)
    ref = copy.deepcopy(sae)
    fused, plain = FusedAdam(sae, lr=3e-3), torch.optim.Adam(ref.parameters(), lr=3e-3)
    assert not fused.unit_norm_decoder
    for step in range(3):
        x, y = _data(B, d, d, seed=step)
        with sae_fast.use_backend(backend):
            assert fused.fused_reason(x) is None
            out = fused.step_fused(x, 0.5, target=y)
        with sae_fast.use_backend("cpu" if "cpu" in CPU_BACKENDS else "torch"):
            want = _unfused_step(ref, plain, x, y, 0.5)
        for key in ("loss", "fvu", "aux_loss", "l0"):
            torch.testing.assert_close(getattr(out, key), getattr(want, key).detach(), rtol=1e-5, atol=1e-6, msg=key)
        for (name, p), q in zip(sae.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=2e-6, msg=f"{name} at step {step}")


def test_fused_step_falls_back_for_different_widths():
    sae = _transcoder(20, 40, 13, True, k=4)
    opt = FusedAdam(sae, lr=1e-3)
    x, y = _data(6, 20, 13)
    assert "d_out != d_in" in opt.fused_reason(x)
    before = sae.W_skip.detach().clone()
    out = opt.step_fused(x, target=y)
    assert out.x_hat.shape == (6, 13) and not torch.equal(before, sae.W_skip.detach())


@pytest.mark.parametrize("backend", INTERPRETED_TRITON)
def test_triton_fused_step_under_bf16_autocast(backend):
    """bf16 activations beside fp32 master weights, W_skip included (the GPU default)."""
    sae = _transcoder(20, 40, 20, True, k=5, k_aux=9)
    ref = copy.deepcopy(sae)
    fused, plain = FusedAdam(sae, lr=1e-3), torch.optim.Adam(ref.parameters(), lr=1e-3)
    x, y = _data(9, 20, 20)
    with sae_fast.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused.fused_reason(x) is None
        out = fused.step_fused(x, target=y)
        want = ref(x, target=y)
    training_loss(ref, want, 1.0).backward()
    plain.step()
    torch.testing.assert_close(out.loss, want.loss.detach(), rtol=1e-2, atol=1e-3)
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    for p, q in zip(sae.parameters(), ref.parameters()):  # bf16 rounding can flip a step's sign: |diff| <= 2 lr
        assert float((p - q).abs().max()) <= 2.5e-3


def test_predict_needs_no_target_and_includes_the_skip_term():
    sae = _transcoder(20, 40, 13, True, k=4).eval()
    x, y = _data(5, 20, 13)
    torch.testing.assert_close(sae.predict(x[None]), sae(x, target=y).x_hat[None])
    values, indices = sae.encode(x)
    assert not torch.allclose(sae.decode(values, indices), sae.predict(x))  # decode has no skip term
    plain = SparseAutoencoder(20, 40, "topk", k=4, seed=0).eval()
    torch.testing.assert_close(plain.predict(x), plain(x).x_hat)
