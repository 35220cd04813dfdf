"""sae_fast.integrations.sparsify against the real eai-sparsify: patched and unpatched SparseCoders on the same
weights and inputs give the same outputs, losses and gradients; its Trainer gives the same loss curve, and
what it saves loads unpatched."""
from __future__ import annotations

import contextlib
import copy
import io
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's own Triton decoder needs a GPU

with contextlib.redirect_stdout(io.StringIO()):  # sparsify prints its decoder choice at import
    sparsify = pytest.importorskip("sparsify")

import sae_fast.integrations as integrations  # noqa: E402
from sae_fast.integrations import sparsify as patch_sparsify  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def _unpatched():
    integrations.unpatch()
    yield
    integrations.unpatch()


def _coder(d, n, k, seed=0, **cfg):
    torch.manual_seed(seed)
    sc = sparsify.SparseCoder(d, sparsify.SparseCoderConfig(num_latents=n, k=k, **cfg))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every parameter random and nonzero, so every gradient path is exercised
        for p in sc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 1 else d ** -0.5))
    return sc


def _run(sc, x, y=None, dead_mask=None, total_variance=None, auxk_alpha=0.5):
    """Forward and backward as sparsify's Trainer does; returns the outputs and every gradient."""
    sc.zero_grad()
    x = x.clone().requires_grad_(True)
    out = sc(x, y, dead_mask=dead_mask, total_variance=total_variance)
    (out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
    grads = {name: p.grad.clone() for name, p in sc.named_parameters()}
    grads["x"] = x.grad.clone()
    return out, grads


def _sorted_code(acts, idx):
    order = idx.argsort(-1)
    return acts.gather(-1, order), idx.gather(-1, order)


def _compare(theirs, ours):
    (t_out, t_grads), (o_out, o_grads) = theirs, ours
    torch.testing.assert_close(o_out.sae_out, t_out.sae_out, **TOL)
    for name in ("fvu", "auxk_loss", "multi_topk_fvu"):
        torch.testing.assert_close(getattr(o_out, name), getattr(t_out, name), **TOL, msg=name)
    # sparsify's top-k is unsorted; ours comes in descending order: compare as sets.
    o_acts, o_idx = _sorted_code(o_out.latent_acts, o_out.latent_indices)
    t_acts, t_idx = _sorted_code(t_out.latent_acts, t_out.latent_indices)
    assert o_out.latent_indices.dtype == t_out.latent_indices.dtype
    torch.testing.assert_close(o_idx, t_idx)
    torch.testing.assert_close(o_acts, t_acts, **TOL)
    assert o_grads.keys() == t_grads.keys()
    for name in t_grads:
        torch.testing.assert_close(o_grads[name], t_grads[name], **TOL, msg=name)


SHAPES = [(64, 16, 128, 8), (33, 24, 96, 5), (128, 32, 512, 16)]
VARIANTS = {
    "plain": {},
    "transcode": {"transcode": True},
    "skip": {"skip_connection": True},
    "multi_topk": {"multi_topk": True},
}


@pytest.mark.parametrize("auxk", [False, True], ids=["no-auxk", "auxk"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-d{}-n{}-k{}".format(*s))
def test_patched_forward_matches_unpatched(shape, variant, auxk):
    B, d, n, k = shape
    theirs_sc = _coder(d, n, k, **VARIANTS[variant])
    ours_sc = copy.deepcopy(theirs_sc)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, d, generator=g)
    y = torch.randn(B, d, generator=g) if variant == "transcode" else None
    dead = (torch.rand(n, generator=g) < 0.5) if auxk else None
    theirs = _run(theirs_sc, x, y, dead)
    with patch_sparsify.patched():
        ours = _run(ours_sc, x, y, dead)
    _compare(theirs, ours)
    assert (float(theirs[0].auxk_loss.detach()) > 0) == auxk


def test_patched_forward_matches_with_total_variance_and_few_dead():
    """A chunked caller's total_variance, and fewer dead latents than k_aux (the loss is scaled down)."""
    theirs_sc = _coder(16, 128, 8)
    ours_sc = copy.deepcopy(theirs_sc)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(3))
    dead = torch.zeros(128, dtype=torch.bool)
    dead[[3, 50, 77]] = True
    tv = torch.tensor(123.0)
    theirs = _run(theirs_sc, x, dead_mask=dead, total_variance=tv)
    with patch_sparsify.patched():
        ours = _run(ours_sc, x, dead_mask=dead, total_variance=tv)
    _compare(theirs, ours)


def test_patched_decode_matches_unpatched():
    sc = _coder(24, 96, 6)
    g = torch.Generator().manual_seed(4)
    acts = torch.rand(10, 6, generator=g).requires_grad_(True)
    idx = torch.randint(0, 96, (10, 6), generator=g)
    ref = sc.decode(acts, idx)
    ref_grads = torch.autograd.grad(ref.square().sum(), [acts, sc.W_dec, sc.b_dec])
    with patch_sparsify.patched():
        out = sc.decode(acts, idx)
        grads = torch.autograd.grad(out.square().sum(), [acts, sc.W_dec, sc.b_dec])
    torch.testing.assert_close(out, ref, **TOL)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL)


def test_cpu_tensors_never_reach_sparsify_decoders(monkeypatch):
    """sparsify sends CPU tensors to its Triton decoder when triton is installed; the patch uses neither."""
    import sparsify.sparse_coder as sc_module

    def forbidden(*args, **kwargs):
        raise AssertionError("sparsify's decoder_impl was called")

    monkeypatch.setattr(sc_module, "decoder_impl", forbidden)
    sc = _coder(16, 128, 4, multi_topk=True)
    x = torch.randn(20, 16)
    with patch_sparsify.patched():
        out = sc(x, dead_mask=torch.rand(128) < 0.5)
        (out.fvu + out.auxk_loss + out.multi_topk_fvu).backward()
    with pytest.raises(AssertionError, match="decoder_impl"):
        sc(x)


def test_groupmax_keeps_sparsify_forward(monkeypatch):
    sc = _coder(16, 128, 8, activation="groupmax")
    x = torch.randn(12, 16)
    ref = sc(x).sae_out
    with patch_sparsify.patched():
        import sparsify.fused_encoder as fe
        calls = []
        monkeypatch.setattr("sparsify.sparse_coder.fused_encoder",
                            lambda *a: calls.append(1) or fe.fused_encoder(*a))
        torch.testing.assert_close(sc(x).sae_out, ref, **TOL)
    assert calls, "groupmax should run sparsify's own encoder"


def test_unpatch_restores_the_originals_exactly():
    SC = sparsify.SparseCoder
    before = {name: SC.__dict__[name] for name in ("forward", "decode", "encode")}
    report = patch_sparsify.patch()
    assert report.patched == ["SparseCoder.forward", "SparseCoder.decode"] and report.tested
    assert SC.__dict__["forward"] is not before["forward"] and SC.__dict__["decode"] is not before["decode"]
    assert SC.__dict__["encode"] is before["encode"]
    assert patch_sparsify.patch() is report  # patching twice changes nothing
    patch_sparsify.unpatch()
    assert {name: SC.__dict__[name] for name in before} == before
    with patch_sparsify.patched():
        with patch_sparsify.patched():  # an inner block leaves the outer patch in place
            pass
        assert patch_sparsify.is_patched()
    assert not patch_sparsify.is_patched()
    assert {name: SC.__dict__[name] for name in before} == before


def test_unknown_version_warns_once_and_patches_matching_signatures(monkeypatch):
    patcher = patch_sparsify._patcher
    monkeypatch.setattr(patcher, "_version", "9.9.9")
    monkeypatch.setattr(patcher, "_warned", False)
    original = sparsify.SparseCoder.__dict__["decode"]

    def decode(self, acts, indices, extra=None):  # a "new version" whose decode gained a parameter
        return original(self, acts, indices)

    monkeypatch.setattr(sparsify.SparseCoder, "decode", decode)
    monkeypatch.setattr(patcher, "_found", None)
    with pytest.warns(UserWarning, match="untested"):
        report = patch_sparsify.patch()
    assert report.patched == ["SparseCoder.forward"]
    assert ("SparseCoder.decode" in dict(report.left_alone)) and "signature changed" in dict(report.left_alone)[
        "SparseCoder.decode"]
    patch_sparsify.unpatch()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_sparsify.patch()  # no second warning
    patch_sparsify.unpatch()
    monkeypatch.setattr(patcher, "_found", None)  # forget the fake version's targets


def test_entry_patches_every_installed_library():
    reports = integrations.patch(verbose=False)
    assert set(reports) == {"sae_lens", "sparsify"} and reports["sparsify"].patched
    assert "SparseCoder.forward" in str(reports["sparsify"])
    integrations.unpatch()
    assert not patch_sparsify.is_patched()
    with integrations.patched(sae_lens=False) as reports:
        assert set(reports) == {"sparsify"} and patch_sparsify.is_patched()
    assert not patch_sparsify.is_patched()


# ============================================================================ sparsify's own Trainer
def _train(model_dir, save_dir, patched: bool):
    import transformers
    from datasets import Dataset

    model = transformers.AutoModel.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, 1000, (48, 16), generator=g)  # 768 tokens, 24 steps of 2 sequences
    data = Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    cfg = sparsify.TrainConfig(sparsify.SaeConfig(expansion_factor=4, k=8), batch_size=2, layers=[1],
                               optimizer="adam", lr=3e-3, lr_warmup_steps=0, auxk_alpha=1 / 32,
                               dead_feature_threshold=64, save_every=10_000, log_to_wandb=False,
                               save_dir=str(save_dir), run_name="run")
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = sparsify.Trainer(cfg, data, model)
    losses = []

    def record(module, args, kwargs, out):
        losses.append((out.fvu.detach().item(), out.auxk_loss.detach().item()))

    for sae in trainer.saes.values():
        sae.register_forward_hook(record, with_kwargs=True)
    ctx = patch_sparsify.patched() if patched else contextlib.nullcontext()
    with ctx, contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer.fit()
    return trainer, torch.tensor(losses)


def test_trainer_gives_the_same_loss_curve_and_files_load_unpatched(tmp_path):
    from hf_tiny import tiny_model_dir

    model_dir = tiny_model_dir("gpt2", layers=2, width=32)
    _, theirs = _train(model_dir, tmp_path / "theirs", patched=False)
    trainer, ours = _train(model_dir, tmp_path / "ours", patched=True)
    assert len(ours) == len(theirs) == 24
    assert (theirs[:, 1] > 0).any(), "AuxK never ran: the test would not cover it"
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)

    (name, trained), = trainer.saes.items()
    loaded = sparsify.SparseCoder.load_from_disk(tmp_path / "ours" / "run" / name)
    assert not patch_sparsify.is_patched()
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, atol=0, rtol=0)
    x = torch.randn(8, 32)
    with torch.no_grad():
        ref = loaded(x).sae_out
        with patch_sparsify.patched():
            torch.testing.assert_close(loaded(x).sae_out, ref, **TOL)
