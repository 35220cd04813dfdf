"""Matryoshka SAEs (sae_fast/matryoshka.py) against reference.py: prefix reconstructions, loss, every gradient."""
import pytest
import torch
from helpers import CPU_BACKENDS, INTERPRETED_TRITON
from torch.autograd import gradcheck

import sae_fast
from sae_fast import SAEConfig, SparseAutoencoder
from sae_fast import reference as R
from sae_fast.matryoshka import prefix_reconstructions
from sae_fast.optim import FusedAdam

BACKENDS = ["reference", *CPU_BACKENDS, *INTERPRETED_TRITON]  # triton: by its interpreter here
WIDTHS = [5, 13, 30, 48]  # odd group sizes 5, 8, 17, 18


def _data(B=64, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(40, d, generator=g)
    codes = torch.relu(torch.randn(B, 40, generator=g) - 1.0)
    return codes @ dirs + 0.01 * torch.randn(B, d, generator=g)


def test_reference_prefixes_are_sliced_dictionaries():
    # First principles: prefix i is the dense code's first m_i latents through the first m_i decoder rows.
    g = torch.Generator().manual_seed(0)
    f = torch.relu(torch.randn(6, 48, generator=g, dtype=torch.float64) - 0.5)
    W_dec, b_dec = torch.randn(48, 4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    v, i = R.dense_to_sparse(f)
    prefixes = R.matryoshka_decode(v, i, W_dec, b_dec, WIDTHS)
    for m, p in zip(WIDTHS, prefixes):
        torch.testing.assert_close(p, f[:, :m] @ W_dec[:m] + b_dec)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    total, each = R.matryoshka_loss(x, v, i, W_dec, b_dec, WIDTHS)
    torch.testing.assert_close(each, torch.stack([R.fvu(p, x) for p in prefixes]))
    torch.testing.assert_close(total, each.sum())
    vv, W, b = (t.clone().requires_grad_() for t in (v, W_dec, b_dec))
    assert gradcheck(lambda vv, W, b: R.matryoshka_loss(x, vv, i, W, b, WIDTHS)[0], (vv, W, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_reconstructions_match_reference_with_an_empty_group(backend):
    g = torch.Generator().manual_seed(1)
    B, d, n, K = 7, 5, 48, 6
    idx = torch.randint(0, n, (B, K), generator=g, dtype=torch.int32)
    idx = torch.where((idx >= 5) & (idx < 13), idx + 8, idx)  # group [5, 13) has no entry at all
    values = torch.relu(torch.randn(B, K, generator=g))
    values[:, 0] = 0.0  # inactive entries too
    W_dec, b_dec = torch.randn(n, d, generator=g), torch.randn(d, generator=g)
    x = torch.randn(B, d, generator=g)

    def run(fast):
        v, W, b = (t.clone().requires_grad_() for t in (values, W_dec, b_dec))
        if fast:
            with sae_fast.use_backend(backend):
                full = sae_fast.ops.sparse_decode(v, idx, W, b)
                p = prefix_reconstructions(v, idx, W, b, WIDTHS, full)
        else:
            p = R.matryoshka_decode(v, idx, W, b, WIDTHS)
        sum(R.fvu(q, x) for q in p).backward()
        return p.detach(), v.grad, W.grad, b.grad

    got, want = run(True), run(False)
    torch.testing.assert_close(got[0][1], got[0][0])  # the empty group adds nothing
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _reference_step(sae, x):
    """reference.py's loss and float64 gradients for the SAE's weights (AuxK off)."""
    W_enc, b_enc, W_dec, b_dec = (p.detach().double().requires_grad_()
                                  for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    pre = R.pre_activations(x.double(), W_enc, b_enc, b_dec)
    v, i = R.topk(pre, sae.cfg.k) if sae.cfg.activation == "topk" else R.batch_topk(pre, sae.cfg.k)
    loss, each = R.matryoshka_loss(x.double(), v, i, W_dec, b_dec, sae.cfg.matryoshka)
    loss.backward()
    return loss, each, {"W_enc": W_enc.grad, "b_enc": b_enc.grad, "W_dec": W_dec.grad, "b_dec": b_dec.grad}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["topk", "batchtopk"])
def test_sae_loss_and_every_gradient_match_reference(backend, act):
    x = _data()
    sae = SparseAutoencoder(16, 48, act, k=4, seed=0, k_aux=0, matryoshka=WIDTHS)
    with torch.no_grad():
        sae.b_enc[5:13] = -100.0  # the second group never fires
    with sae_fast.use_backend(backend):
        out = sae(x)
        out.loss.backward()
    loss, each, grads = _reference_step(sae, x)
    assert out.prefix_fvu.shape == (4,) and out.prefix_fvu[0] == out.prefix_fvu[1]
    torch.testing.assert_close(out.prefix_fvu.double(), each, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss.double(), loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.fvu, out.prefix_fvu[-1])
    for name, g_ref in grads.items():
        g = getattr(sae, name).grad.double()
        torch.testing.assert_close(g, g_ref, atol=1e-4 * (g_ref.abs().max().item() + 1), rtol=1e-4)


@pytest.mark.parametrize("backend", [*CPU_BACKENDS, *INTERPRETED_TRITON])
def test_auxk_on_the_full_residual_matches_the_reference_backend(backend):
    x = _data()

    def step(name):
        sae = SparseAutoencoder(16, 48, "topk", k=4, seed=0, dead_tokens=64, matryoshka=WIDTHS)
        sae(x)  # one step so some latents are dead and AuxK runs
        with sae_fast.use_backend(name):
            out = sae(x)
            out.loss.backward()
        return out, {n: p.grad for n, p in sae.named_parameters()}

    (out, grads), (ref, ref_grads) = step(backend), step("reference")
    assert ref.aux_loss > 0
    torch.testing.assert_close(out.loss, out.prefix_fvu.sum() + out.aux_loss / 32)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    for name, g_ref in ref_grads.items():
        torch.testing.assert_close(grads[name], g_ref, atol=1e-4 * (g_ref.abs().max().item() + 1), rtol=1e-4)


def test_save_load_roundtrip(tmp_path):
    sae = SparseAutoencoder(16, 48, "batchtopk", k=4, seed=0, matryoshka=WIDTHS)
    sae(_data())
    sae.save(tmp_path / "sae")
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert loaded.cfg.matryoshka == WIDTHS and loaded.cfg == sae.cfg
    sae.eval(), loaded.eval()
    x = _data(seed=1)
    a, b = sae(x), loaded(x)
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.prefix_fvu, b.prefix_fvu)


def test_plain_sae_has_no_prefixes():
    assert SparseAutoencoder(16, 48, "topk", k=4, seed=0)(_data()).prefix_fvu is None


FUSED = [b for b in ("cpu", *INTERPRETED_TRITON) if b in sae_fast.available_backends()]


FUSED_CASES = [("cpu", "topk", dict(k=4, k_aux=6)), ("cpu", "topk", dict(k=4, k_aux=0)),
               ("cpu", "batchtopk", dict(k=4))]
FUSED_CASES = [c for c in FUSED_CASES if c[0] in FUSED] + [(b, "topk", dict(k=4, k_aux=6)) for b in FUSED
                                                          if b == "triton"]  # the interpreter: one case


@pytest.mark.parametrize("backend,act,opts", FUSED_CASES, ids=lambda v: v if isinstance(v, str) else
                         ("auxk" if v.get("k_aux") else "-"))
def test_fused_step_matches_the_unfused_step(backend, act, opts):
    # FusedAdam.step_fused runs fused for Matryoshka SAEs (once per group on that group's rows) and gives
    # what loss.backward(), remove_parallel_grad_, Adam and normalize_decoder_ give.
    import copy
    sae = SparseAutoencoder(16, 48, act, seed=0, dead_tokens=100, matryoshka=WIDTHS, **opts)
    sae.tokens_since_fired[::3] = 1000  # dead latents in every group: AuxK has work
    with torch.no_grad():
        sae.W_enc.add_(torch.randn(48, 16, generator=torch.Generator().manual_seed(2)) * 0.3)
        sae.b_enc[5:13] = -100.0  # a group that never fires
    ref = copy.deepcopy(sae)
    fused, plain = FusedAdam(sae, lr=3e-3), torch.optim.Adam(ref.parameters(), lr=3e-3)
    with sae_fast.use_backend(backend):
        for step in range(3 if backend == "cpu" else 1):
            x = _data(seed=step)
            assert fused.fused_reason(x) is None
            out = fused.step_fused(x)
            want = ref(x)
            want.loss.backward()
            ref.remove_parallel_grad_()
            plain.step()
            plain.zero_grad(set_to_none=True)
            ref.normalize_decoder_()
            for name in ("loss", "fvu", "aux_loss", "prefix_fvu"):
                torch.testing.assert_close(getattr(out, name), getattr(want, name).detach(), rtol=1e-5, atol=1e-6,
                                           msg=f"{name} at step {step}")
            for (name, p), q in zip(sae.named_parameters(), ref.parameters()):
                torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=2e-6, msg=f"{name} at step {step}")
    assert out.aux_loss > 0 if opts.get("k_aux") else True


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(matryoshka=[5, 5, 48]), ValueError, "strictly increasing"),
    (dict(matryoshka=[0, 48]), ValueError, "positive and strictly increasing"),
    (dict(matryoshka=[5, 40]), ValueError, "last prefix width must be n_latents=48"),
    (dict(matryoshka=[5, 48], activation="relu"), ValueError, "needs activation 'topk' or 'batchtopk'"),
    (dict(matryoshka=[5.5, 48]), TypeError, "list of ints"),
    (dict(matryoshka="5,48"), TypeError, "list of prefix widths"),
])
def test_config_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        SAEConfig(**{"d_in": 16, "n_latents": 48, "k": 4, **kwargs})


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("act", ["topk", "batchtopk"])
def test_bf16_autocast_over_fp32_master_weights(backend, act):
    x = _data()
    sae = SparseAutoencoder(16, 48, act, k=4, seed=0, k_aux=0, matryoshka=WIDTHS)
    with sae_fast.use_backend(backend):
        want = sae(x).prefix_fvu.detach()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sae(x)
        out.loss.backward()
    assert sae.W_dec.grad.dtype == torch.float32 and torch.isfinite(sae.W_dec.grad).all()
    torch.testing.assert_close(out.prefix_fvu, want, atol=3e-2, rtol=3e-2)
