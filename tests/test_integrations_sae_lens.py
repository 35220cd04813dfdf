"""sae_fast.integrations.sae_lens against the real sae-lens: every patched class, patched and unpatched on the
same weights and inputs, gives the same outputs, losses and gradients; SAELens' SAETrainer gives the same loss
curve, and what it saves loads unpatched."""
from __future__ import annotations

import copy

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")

from sae_lens import saes  # noqa: E402
from sae_lens.saes.sae import TrainStepInput  # noqa: E402

from sae_fast.integrations import sae_lens as patch_sae_lens  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def _unpatched():
    patch_sae_lens.unpatch()
    yield
    patch_sae_lens.unpatch()


def _sae(cls, cfg_cls, d, n, seed=0, **cfg):
    sae = cls(cfg_cls(d_in=d, d_sae=n, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random nonzero weights and biases, so every gradient path is exercised
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.3 + 0.02)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 1 else d ** -0.5))
    return sae


def _grads(sae, loss, x=None):
    sae.zero_grad()
    loss.backward()
    out = {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}
    if x is not None and x.grad is not None:
        out["x"] = x.grad.clone()
    return out


def _compare_grads(ours, theirs):
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], **TOL, msg=name)


def _dense(t):
    return t.to_dense() if t.is_sparse else t


def _step(sae, x, dead, coefficients):
    out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefficients, dead_neuron_mask=dead,
                                                   n_training_steps=0, is_logging_step=False))
    return out, _grads(sae, out.loss)


TRAINING = {
    "topk": (saes.TopKTrainingSAE, saes.TopKTrainingSAEConfig, dict(k=6, rescale_acts_by_decoder_norm=False)),
    "topk-rescale": (saes.TopKTrainingSAE, saes.TopKTrainingSAEConfig, dict(k=6)),
    "topk-no-b_dec-in": (saes.TopKTrainingSAE, saes.TopKTrainingSAEConfig,
                         dict(k=6, apply_b_dec_to_input=False, aux_loss_coefficient=0.5)),
    "topk-sparse-acts": (saes.TopKTrainingSAE, saes.TopKTrainingSAEConfig,
                         dict(k=6, use_sparse_activations=True, rescale_acts_by_decoder_norm=False)),
    "batchtopk": (saes.BatchTopKTrainingSAE, saes.BatchTopKTrainingSAEConfig,
                  dict(k=6, rescale_acts_by_decoder_norm=False)),
    "batchtopk-rescale": (saes.BatchTopKTrainingSAE, saes.BatchTopKTrainingSAEConfig, dict(k=6)),
    "jumprelu-step": (saes.JumpReLUTrainingSAE, saes.JumpReLUTrainingSAEConfig, dict(jumprelu_bandwidth=0.1)),
    "jumprelu-tanh": (saes.JumpReLUTrainingSAE, saes.JumpReLUTrainingSAEConfig,
                      dict(jumprelu_sparsity_loss_mode="tanh", l0_coefficient=0.3)),
    "standard": (saes.StandardTrainingSAE, saes.StandardTrainingSAEConfig, dict(l1_coefficient=2.0)),
    "standard-l2": (saes.StandardTrainingSAE, saes.StandardTrainingSAEConfig, dict(lp_norm=2.0)),
}
SHAPES = [(64, 16, 128), (37, 24, 96), (128, 32, 512)]


@pytest.mark.parametrize("dead", [False, True], ids=["no-dead", "dead"])
@pytest.mark.parametrize("arch", list(TRAINING))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-d{}-n{}".format(*s))
def test_training_forward_pass_matches_unpatched(shape, arch, dead):
    B, d, n = shape
    cls, cfg_cls, cfg = TRAINING[arch]
    theirs_sae = _sae(cls, cfg_cls, d, n, **cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, d, generator=g)
    mask = torch.rand(n, generator=g) < 0.4 if dead else None
    if dead:  # as dead latents are: mostly negative pre-activations (SAELens' AuxK does not ReLU them)
        with torch.no_grad():
            theirs_sae.b_enc[mask] -= torch.rand(int(mask.sum()), generator=g) * 2
    ours_sae = copy.deepcopy(theirs_sae)
    coefficients = {name: c.value for name, c in theirs_sae.get_coefficients().items()}
    theirs, t_grads = _step(theirs_sae, x, mask, coefficients)
    with patch_sae_lens.patched():
        ours, o_grads = _step(ours_sae, x, mask, coefficients)
    torch.testing.assert_close(ours.sae_out, theirs.sae_out, **TOL)
    assert ours.feature_acts.is_sparse == theirs.feature_acts.is_sparse
    torch.testing.assert_close(_dense(ours.feature_acts), _dense(theirs.feature_acts), **TOL)
    torch.testing.assert_close(ours.loss, theirs.loss, **TOL)
    assert ours.losses.keys() == theirs.losses.keys()
    for name in theirs.losses:
        torch.testing.assert_close(ours.losses[name], theirs.losses[name], **TOL, msg=name)
    if "auxiliary_reconstruction_loss" in theirs.losses:
        assert (float(theirs.losses["auxiliary_reconstruction_loss"].detach()) > 0) == dead
    # hidden_pre: only the active latents' pre-activations (the dense ones are never formed).
    active = _dense(theirs.feature_acts) != 0
    torch.testing.assert_close(_dense(ours.hidden_pre)[active], theirs.hidden_pre[active], **TOL)
    _compare_grads(o_grads, t_grads)
    if arch.startswith("batchtopk"):
        torch.testing.assert_close(ours_sae.topk_threshold, theirs_sae.topk_threshold, **TOL)


@pytest.mark.parametrize("arch", ["topk-rescale", "batchtopk", "jumprelu-step", "standard"])
def test_training_forward_pass_under_bf16_autocast(arch):
    """SAETrainer(autocast=True): the ops run in bf16 over the fp32 weights; close to SAELens' bf16 matmuls."""
    cls, cfg_cls, cfg = TRAINING[arch]
    theirs_sae = _sae(cls, cfg_cls, 32, 256, **cfg)
    ours_sae = copy.deepcopy(theirs_sae)
    g = torch.Generator().manual_seed(7)
    x, mask = torch.randn(64, 32, generator=g), torch.rand(256, generator=g) < 0.3
    coefficients = {name: c.value for name, c in theirs_sae.get_coefficients().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = theirs_sae.training_forward_pass(TrainStepInput(x, coefficients, mask, 0, False))
        with patch_sae_lens.patched():
            ours = ours_sae.training_forward_pass(TrainStepInput(x, coefficients, mask, 0, False))
    assert ours.sae_out.dtype == theirs.sae_out.dtype
    torch.testing.assert_close(ours.loss, theirs.loss, atol=0, rtol=1e-2)
    o_grads, t_grads = _grads(ours_sae, ours.loss), _grads(theirs_sae, theirs.loss)
    for name, t in t_grads.items():
        assert o_grads[name].dtype == t.dtype == torch.float32
        # bf16 rounding moves a few selections and threshold-window memberships: close in direction.
        assert float(torch.nn.functional.cosine_similarity(o_grads[name].flatten(), t.flatten(), 0)) > 0.95, name


INFERENCE = {
    "TopKSAE": (saes.TopKSAE, saes.TopKSAEConfig, dict(k=5)),
    "TopKSAE-rescale": (saes.TopKSAE, saes.TopKSAEConfig, dict(k=5, rescale_acts_by_decoder_norm=True)),
    "TopKSAE-layer_norm": (saes.TopKSAE, saes.TopKSAEConfig, dict(k=5, normalize_activations="layer_norm")),
    "JumpReLUSAE": (saes.JumpReLUSAE, saes.JumpReLUSAEConfig, {}),
    "JumpReLUSAE-no-b_dec-in": (saes.JumpReLUSAE, saes.JumpReLUSAEConfig, dict(apply_b_dec_to_input=False)),
    "StandardSAE": (saes.StandardSAE, saes.StandardSAEConfig, {}),
    "TopKTrainingSAE": (saes.TopKTrainingSAE, saes.TopKTrainingSAEConfig, dict(k=5)),
    "BatchTopKTrainingSAE": (saes.BatchTopKTrainingSAE, saes.BatchTopKTrainingSAEConfig, dict(k=5)),
    "JumpReLUTrainingSAE": (saes.JumpReLUTrainingSAE, saes.JumpReLUTrainingSAEConfig, {}),
    "StandardTrainingSAE": (saes.StandardTrainingSAE, saes.StandardTrainingSAEConfig, {}),
}


@pytest.mark.parametrize("lead", [(40,), (3, 7)], ids=["2d", "3d"])
@pytest.mark.parametrize("arch", list(INFERENCE))
def test_encode_and_forward_match_unpatched(arch, lead):
    cls, cfg_cls, cfg = INFERENCE[arch]
    theirs_sae = _sae(cls, cfg_cls, 24, 96, seed=2, **cfg)
    ours_sae = copy.deepcopy(theirs_sae)
    x = torch.randn(*lead, 24, generator=torch.Generator().manual_seed(3))

    def run(sae):
        xr = x.clone().requires_grad_(True)
        acts = _dense(sae.encode(xr))
        grads_acts = _grads(sae, (acts * torch.linspace(-1, 1, acts.shape[-1])).sum(), xr)
        xr = x.clone().requires_grad_(True)
        out = sae(xr)
        return acts.detach(), grads_acts, out.detach(), _grads(sae, out.square().sum(), xr)

    theirs = run(theirs_sae)
    with patch_sae_lens.patched():
        ours = run(ours_sae)
    torch.testing.assert_close(ours[0], theirs[0], **TOL)
    torch.testing.assert_close(ours[2], theirs[2], **TOL)
    _compare_grads(ours[1], theirs[1])
    _compare_grads(ours[3], theirs[3])


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu", "triton"])
def test_pre_at_matches_dense_pre_activations(backend):
    """AuxK's un-ReLU'd pre-activations of listed latents (integrations._patching.pre_at), on every backend."""
    import sae_fast
    from sae_fast.integrations._patching import pre_at
    if backend not in sae_fast.available_backends():
        pytest.skip(f"{backend} backend not available")
    g = torch.Generator().manual_seed(8)
    xc, W, b = torch.randn(9, 16, generator=g), torch.randn(64, 16, generator=g), torch.randn(64, generator=g)
    idx = torch.randint(0, 64, (9, 5), generator=g, dtype=torch.int32)
    weights = torch.randn(9, 5, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (xc, W, b)]
    dense = (leaves[0] @ leaves[1].T + leaves[2]).gather(1, idx.long())
    ref_grads = torch.autograd.grad((dense * weights).sum(), leaves)
    leaves = [t.clone().requires_grad_(True) for t in (xc, W, b)]
    with sae_fast.use_backend(backend):
        out = pre_at(*leaves, idx)
        grads = torch.autograd.grad((out * weights).sum(), leaves)
    torch.testing.assert_close(out, dense.detach(), **TOL)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, **TOL)


def _calls_fast_path(monkeypatch):
    calls = []
    code = patch_sae_lens._Code
    monkeypatch.setattr(patch_sae_lens, "_Code", lambda *a: calls.append(1) or code(*a))
    return calls


def test_hooks_and_error_term_and_other_architectures_run_sae_lens_code(monkeypatch):
    calls = _calls_fast_path(monkeypatch)
    x = torch.randn(10, 16)
    with patch_sae_lens.patched():
        topk = _sae(saes.TopKSAE, saes.TopKSAEConfig, 16, 64, k=4)
        topk(x)
        assert len(calls) == 1
        seen = []
        topk.hook_sae_acts_post.add_hook(lambda t, hook: seen.append(t.shape) or t)
        topk(x)  # a hook in use: SAELens' own forward, so the hook sees the dense activations
        assert seen == [(10, 64)] and len(calls) == 1
        topk.reset_hooks()
        with pytest.warns(DeprecationWarning):
            topk.use_error_term = True
        with_error = topk(x)  # SAELens' forward (its encode calls are the patched encode)
        patch_sae_lens.unpatch()
        torch.testing.assert_close(with_error, topk(x), **TOL)
        patch_sae_lens.patch()
        calls.clear()
        for cls, cfg_cls, cfg in [(saes.AbsTopKTrainingSAE, saes.AbsTopKTrainingSAEConfig, dict(k=4)),
                                  (saes.MatryoshkaBatchTopKTrainingSAE, saes.MatryoshkaBatchTopKTrainingSAEConfig,
                                   dict(k=4, matryoshka_widths=[32, 64])),
                                  (saes.GatedTrainingSAE, saes.GatedTrainingSAEConfig, {}),
                                  (saes.JumpReLUTrainingSAE, saes.JumpReLUTrainingSAEConfig,
                                   dict(pre_act_loss_coefficient=1e-3)),
                                  (saes.BatchTopKTrainingSAE, saes.BatchTopKTrainingSAEConfig, dict(k=2.5))]:
            sae = _sae(cls, cfg_cls, 16, 64, **cfg)
            coefficients = {name: c.value for name, c in sae.get_coefficients().items()}
            sae.training_forward_pass(TrainStepInput(x, coefficients, None, 0, False)).loss.backward()
            sae(x)
        assert not calls


def test_unpatch_restores_the_originals_exactly():
    classes = [c for c, *_ in patch_sae_lens._classes()] + [saes.AbsTopKTrainingSAE, saes.GatedSAE]
    names = ("training_forward_pass", "encode", "forward", "decode", "encode_with_hidden_pre")
    missing = object()
    before = {(c, m): c.__dict__.get(m, missing) for c in classes for m in names}
    report = patch_sae_lens.patch()
    assert report.tested and len(report.patched) == 18
    assert "TopKTrainingSAE.training_forward_pass" in report.patched
    assert saes.TopKSAE.__dict__["forward"] is not before[(saes.TopKSAE, "forward")]  # was inherited
    assert saes.GatedSAE.__dict__.get("forward", missing) is before[(saes.GatedSAE, "forward")]
    patch_sae_lens.unpatch()
    assert {key: key[0].__dict__.get(key[1], missing) for key in before} == before
    assert "forward" not in saes.TopKSAE.__dict__


# ============================================================================ SAELens' own SAETrainer
def _fit(arch, batches, tmp_path, patched):
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    cls, cfg_cls, cfg = TRAINING[arch]
    sae = _sae(cls, cfg_cls, 16, 128, seed=4, **cfg)
    trainer_cfg = SAETrainerConfig(total_training_samples=32 * len(batches), train_batch_size_samples=32,
                                   lr=3e-3, lr_end=3e-3, device="cpu", dead_feature_window=4,
                                   feature_sampling_window=8,
                                   checkpoint_path=str(tmp_path), save_final_checkpoint=True,
                                   logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(trainer_cfg, sae, iter(batches))
    losses = []
    step = type(sae).training_forward_pass

    def recording(step_input):
        out = step(sae, step_input)
        losses.append([out.loss.detach().item()] + [v.detach().item() for v in out.losses.values()])
        return out

    sae.training_forward_pass = recording  # an instance attribute wraps whichever class method is in place
    with patch_sae_lens.patched() if patched else _nothing():
        trainer.fit()
    del sae.training_forward_pass
    return sae, torch.tensor(losses)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("arch", ["topk-rescale", "batchtopk", "jumprelu-step", "standard"])
def test_trainer_gives_the_same_loss_curve_and_files_load_unpatched(arch, tmp_path):
    g = torch.Generator().manual_seed(6)
    mix = torch.randn(8, 16, generator=g)
    batches = [torch.randn(32, 8, generator=g) @ mix + 0.1 * torch.randn(32, 16, generator=g) for _ in range(30)]
    _, theirs = _fit(arch, batches, tmp_path / "theirs", patched=False)
    sae, ours = _fit(arch, batches, tmp_path / "ours", patched=True)
    assert ours.shape == theirs.shape and ours.shape[0] == 30
    if arch.startswith(("topk", "batchtopk")):
        assert (theirs[:, 2] > 0).any(), "AuxK never ran: the test would not cover it"
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)

    # The final checkpoint (save_model) and an inference export load in the unpatched library.
    assert not patch_sae_lens.is_patched()
    (folder,) = (tmp_path / "ours").iterdir()
    loaded = saes.TrainingSAE.load_from_disk(folder)
    for key, value in sae.state_dict().items():  # (SAELens loads BatchTopK's float64 threshold as float32)
        theirs = loaded.state_dict()[key]
        torch.testing.assert_close(theirs, value.to(theirs.dtype), atol=0, rtol=0)
    sae.save_inference_model(tmp_path / "inference")
    inference = saes.SAE.load_from_disk(tmp_path / "inference")
    x = batches[0]
    with torch.no_grad():
        ref = inference(x)
        if not arch.startswith("batchtopk"):  # BatchTopK is exported as JumpReLU: a different activation
            torch.testing.assert_close(sae(x), ref, atol=1e-4, rtol=1e-4)
        with patch_sae_lens.patched():
            torch.testing.assert_close(inference(x), ref, **TOL)
