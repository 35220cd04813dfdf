"""The SparseAutoencoder module: shapes, losses, training behaviour, decoder constraints, save/load."""
import json

import pytest
import torch
from helpers import CPU_BACKENDS

import sae_fast
from sae_fast import SAEConfig, SparseAutoencoder
from sae_fast import reference as R

ACTS = ["topk", "batchtopk", "relu", "jumprelu"]


def _data(B=64, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Activations built from a few sparse directions, so an SAE can learn them.
    dirs = torch.randn(40, d, generator=g)
    codes = torch.relu(torch.randn(B, 40, generator=g) - 1.0)
    return codes @ dirs + 0.01 * torch.randn(B, d, generator=g)


@pytest.mark.parametrize("act", ACTS)
def test_forward_shapes_and_losses(act):
    sae = SparseAutoencoder(d_in=16, n_latents=48, activation=act, k=4, seed=0)
    x = _data()
    out = sae(x)
    assert out.x_hat.shape == x.shape
    assert out.values.shape == out.indices.shape and out.values.shape[0] == 64
    assert out.indices.dtype == torch.int32
    for name in ("loss", "mse", "fvu", "aux_loss", "l1", "l0"):
        t = getattr(out, name)
        assert t.dim() == 0 and torch.isfinite(t), name
    assert out.mse.item() == pytest.approx(R.mse(out.x_hat, x).item(), rel=1e-5)
    assert out.fvu.item() == pytest.approx(R.fvu(out.x_hat, x).item(), rel=1e-5)
    if act == "topk":
        assert out.values.shape[1] == 4 and out.l0.item() <= 4
    out.loss.backward()
    assert sae.W_enc.grad is not None and sae.W_dec.grad is not None


def test_loss_composition():
    x = _data()
    relu = SparseAutoencoder(16, 48, "relu", l1_coeff=2.0, seed=0)
    out = relu(x)
    assert out.loss.item() == pytest.approx(out.mse.item() + 2.0 * out.l1.item(), rel=1e-5)
    topk = SparseAutoencoder(16, 48, "topk", k=4, seed=0, aux_coeff=0.5)
    out = topk(x)
    assert out.loss.item() == pytest.approx(out.fvu.item() + 0.5 * out.aux_loss.item(), rel=1e-5)


def test_leading_dims_are_kept():
    sae = SparseAutoencoder(16, 48, "topk", k=4, seed=0)
    x = torch.randn(2, 5, 16)
    out = sae(x)
    assert out.x_hat.shape == (2, 5, 16) and out.values.shape == (2, 5, 4)
    v, i = sae.encode(x)
    assert torch.allclose(sae.decode(v, i), out.x_hat, atol=1e-6)


def test_init_unit_decoder_and_tied_encoder():
    sae = SparseAutoencoder(16, 48, seed=3)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(48))
    assert torch.equal(sae.W_enc, sae.W_dec)
    assert sae.W_enc.data_ptr() != sae.W_dec.data_ptr()
    assert torch.equal(SparseAutoencoder(16, 48, seed=3).W_dec, sae.W_dec)


def test_normalize_and_remove_parallel_grad():
    sae = SparseAutoencoder(16, 48, seed=0)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(48, 1) * 3 + 0.1)
    sae.normalize_decoder_()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(48), atol=1e-6)
    sae(_data()).loss.backward()
    sae.remove_parallel_grad_()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert parallel.abs().max() < 1e-6


def test_dead_latent_tracking_and_auxk():
    sae = SparseAutoencoder(16, 48, "topk", k=2, dead_tokens=100, seed=0)
    x = _data(B=64)
    sae.train()
    out = sae(x)
    assert out.aux_loss.item() == 0.0  # nothing is dead yet
    assert (sae.tokens_since_fired == 64)[out.indices[out.values > 0].long()].sum() == 0
    fired = torch.zeros(48, dtype=torch.bool)
    fired[out.indices[out.values > 0].long()] = True
    assert torch.equal(sae.tokens_since_fired == 0, fired)
    sae(x)  # 128 tokens: latents that never fired are dead now
    assert torch.equal(sae.dead_mask, ~fired & (sae.tokens_since_fired >= 100))
    out = sae(x)
    assert sae.dead_mask.any() and out.aux_loss.item() > 0
    out.loss.backward()
    dead = sae.dead_mask
    assert sae.W_enc.grad[dead].abs().sum() > 0  # AuxK trains dead latents
    sae.eval()
    assert sae(x).aux_loss.item() == 0.0


def test_batchtopk_threshold_learned_and_used_at_eval():
    sae = SparseAutoencoder(16, 48, "batchtopk", k=4, seed=0)
    x = _data()
    sae.train()
    out = sae(x)
    assert out.l0.item() == pytest.approx(4.0)  # B*k winners over B rows
    assert sae.threshold.item() > 0
    sae.eval()
    v, i = sae.encode(x)
    assert (v[v > 0] > sae.threshold).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("act", ACTS)
def test_backends_agree_on_a_training_step(backend, act):
    x = _data()

    def step(name):
        sae = SparseAutoencoder(16, 48, act, k=4, seed=0, dead_tokens=64)
        sae(x)  # one step so some latents are dead and AuxK runs
        with sae_fast.use_backend(name):
            out = sae(x)
            out.loss.backward()
        return out, {n: p.grad for n, p in sae.named_parameters()}

    out, grads = step(backend)
    ref, ref_grads = step("reference")
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    for name in ref_grads:
        g_ref = ref_grads[name]
        torch.testing.assert_close(grads[name], g_ref, atol=1e-4 * (g_ref.abs().max().item() + 1), rtol=1e-4)


@pytest.mark.parametrize("act", ACTS)
def test_training_reduces_loss(act):
    torch.manual_seed(0)
    x = _data(B=256)
    sae = SparseAutoencoder(16, 64, act, k=4, seed=0, l1_coeff=0.01, l0_coeff=0.01)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        out = sae(x)
        first = first if first is not None else out.fvu.item()
        opt.zero_grad()
        out.loss.backward()
        if act in ("topk", "batchtopk"):
            sae.remove_parallel_grad_()
        opt.step()
        if act in ("topk", "batchtopk"):
            sae.normalize_decoder_()
    assert out.fvu.item() < 0.6 * first


def test_autocast_bf16_matches_fp32():
    sae = SparseAutoencoder(16, 48, "topk", k=4, seed=0)
    x = _data()
    ref = sae(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x)
    assert out.x_hat.dtype == torch.bfloat16
    assert abs(out.fvu.item() - ref.fvu.item()) < 0.05
    out.loss.backward()
    assert sae.W_enc.grad.dtype == torch.float32


def _parents_of_params(loss, params):
    """Names of the autograd nodes that hand each parameter its gradient."""
    parents, seen, stack = {id(p): set() for p in params}, set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            var = getattr(child, "variable", None)
            if var is not None and id(var) in parents:
                parents[id(var)].add(type(node).__name__)
            stack.append(child)
    return [parents[id(p)] for p in params]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("act", ACTS)
def test_autocast_reads_fp32_masters_without_copies(backend, act):
    """Under 16-bit autocast the ops get the fp32 parameters themselves: no 16-bit weight copies are made
    (no ToCopyBackward between the loss and a weight), and the gradients arrive in fp32."""
    sae = SparseAutoencoder(16, 48, act, k=4, seed=0)
    sae.train()
    with sae_fast.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(_data())
    assert out.x_hat.dtype == torch.bfloat16
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    for name, parents in zip(("W_enc", "b_enc", "W_dec", "b_dec"), _parents_of_params(out.loss, params)):
        assert parents and "ToCopyBackward0" not in parents, f"{name} reaches the loss through {parents}"
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in sae.parameters())


@pytest.mark.parametrize("act", ACTS)
def test_save_load_roundtrip(tmp_path, act):
    sae = SparseAutoencoder(16, 48, act, k=4, seed=0)
    sae.train()
    sae(_data())  # training state (threshold, dead counters) must survive too
    sae.save(tmp_path / "sae")
    files = sorted(p.name for p in (tmp_path / "sae").iterdir())
    assert files == ["cfg.json", "sae.safetensors"]
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["activation"] == act and cfg["n_latents"] == 48 and cfg["format"] == "sae-fast"
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    for (n1, t1), (n2, t2) in zip(sae.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)
    sae.eval(), loaded.eval()
    x = _data(seed=1)
    assert torch.equal(sae(x).x_hat, loaded(x).x_hat)
    sae.save(tmp_path / "sae")  # overwriting an existing folder works and leaves no temp folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected cfg.json and sae.safetensors"):
        SparseAutoencoder.load(tmp_path)


@pytest.mark.parametrize("kwargs,match", [
    (dict(d_in=0, n_latents=4), "d_in must be a positive int"),
    (dict(d_in=4, n_latents=4, activation="gelu"), "activation must be one of"),
    (dict(d_in=4, n_latents=4, k=5), "k must be between 1 and n_latents=4"),
    (dict(d_in=4, n_latents=4, k=2, l1_coeff=-1), "l1_coeff must be >= 0"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAEConfig(**kwargs)


def test_module_input_errors():
    sae = SparseAutoencoder(16, 48)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., d_in=16\); got shape \(4, 15\)"):
        sae(torch.randn(4, 15))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        sae([1.0] * 16)
