"""Matryoshka SAEs in SAELens' format, against the real sae-lens package: its Matryoshka BatchTopK training
checkpoints load as Matryoshka BatchTopK SAEs with the same codes, prefix reconstructions and losses; ours
save as its inference form (JumpReLU with the learned threshold, as SAELens saves them) and load back."""
import pytest
import torch

from sae_fast import SparseAutoencoder
from sae_fast import io as sio
from sae_fast.matryoshka import prefix_reconstructions
from sae_fast.reference import sparse_to_dense

sl = pytest.importorskip("sae_lens")
D, N, K, B = 24, 40, 5, 16
WIDTHS = [3, 11, 26, 40]  # odd group sizes


def _x(seed=1):
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed))


def _randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 1.7 / p.shape[-1] ** 0.5))
    return module


def _saelens_matryoshka(widths, rescale=True):
    from sae_lens import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig
    theirs = _randomise(MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=D, d_sae=N, k=K, matryoshka_widths=list(widths), rescale_acts_by_decoder_norm=rescale)))
    theirs.topk_threshold.fill_(0.25)
    return theirs


def _close(a, b, atol=1e-5):
    assert a.shape == b.shape and (a - b).abs().max().item() <= atol, (a - b).abs().max().item()


@pytest.mark.parametrize("rescale", [True, False])
def test_saelens_matryoshka_training_checkpoint_loads_with_same_prefixes_and_loss(tmp_path, rescale):
    from sae_lens.saes.sae import TrainStepInput
    theirs = _saelens_matryoshka(WIDTHS, rescale)
    theirs.save_model(tmp_path / "sl")
    ours = sio.load_sae(tmp_path / "sl")
    assert ours.cfg.activation == "batchtopk" and ours.cfg.matryoshka == WIDTHS and ours.cfg.k == K
    assert float(ours.threshold) == 0.25
    x = _x()
    with torch.no_grad():
        step = theirs.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                                           n_training_steps=0, is_logging_step=False))
        ours.train()
        out = ours(x)
        _close(sparse_to_dense(out.values, out.indices, N), step.feature_acts)  # BatchTopK over the batch
        prefixes = prefix_reconstructions(out.values, out.indices, ours.W_dec, ours.b_dec, WIDTHS)
        theirs_prefixes = [p for _, p in theirs._iterable_decode(step.feature_acts, include_outer_loss=True)]
        for got, want in zip(prefixes, theirs_prefixes, strict=True):
            _close(got, want)
        # SAELens' loss: the outer MSE plus every inner prefix's (summed over d, mean over tokens); ours is
        # the same sum over prefixes, each as an FVU: MSE * B / total variance.
        total = (x - x.mean(0)).pow(2).sum()
        _close(out.prefix_fvu.sum() * total / B, step.loss, atol=1e-4)
        assert (step.feature_acts > 0).any() and (step.feature_acts == 0).any()


def test_saelens_matryoshka_widths_without_d_sae_get_it_appended(tmp_path):
    with pytest.warns(UserWarning, match="final matryoshka level"):
        theirs = _saelens_matryoshka(WIDTHS[:-1])
    theirs.save_model(tmp_path / "sl")
    assert sio.load_sae(tmp_path / "sl").cfg.matryoshka == WIDTHS


def test_matryoshka_batchtopk_saves_as_saelens_jumprelu_and_loads_back(tmp_path):
    ours = _randomise(SparseAutoencoder(D, N, "batchtopk", k=K, seed=0, matryoshka=WIDTHS))
    ours.threshold.fill_(0.2)  # the learned inference threshold
    ours.eval()
    sio.save_saelens(ours, tmp_path / "sl")
    theirs = sl.SAE.load_from_disk(tmp_path / "sl")
    assert type(theirs).__name__ == "JumpReLUSAE"
    x = _x()
    with torch.no_grad():
        v, i = ours.encode(x)
        acts = theirs.encode(x)
        _close(sparse_to_dense(v, i, N), acts)
        assert (acts > 0).any() and (acts == 0).any()
        _close(ours(x).x_hat, theirs.decode(acts))
        back = sio.load_sae(tmp_path / "sl").eval()
        _close(back(x).x_hat, ours(x).x_hat)


def test_saelens_matryoshka_inference_save_loads(tmp_path):
    theirs = _saelens_matryoshka(WIDTHS)
    theirs.save_inference_model(tmp_path / "sl")
    ours = sio.load_sae(tmp_path / "sl").eval()
    assert ours.cfg.activation == "jumprelu"
    x = _x()
    with torch.no_grad():
        inference = sl.SAE.load_from_disk(tmp_path / "sl")
        _close(sparse_to_dense(*ours.encode(x), N), inference.encode(x))
        _close(ours(x).x_hat, inference.decode(inference.encode(x)))


def test_bad_matryoshka_widths_in_a_saelens_checkpoint(tmp_path):
    import json
    theirs = _saelens_matryoshka(WIDTHS)
    theirs.save_model(tmp_path / "sl")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    for bad, match in (([11, 3, 40], "strictly increasing"), ([], "non-empty list matryoshka_widths")):
        cfg["matryoshka_widths"] = bad
        (tmp_path / "sl" / "cfg.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=match):
            sio.load_sae(tmp_path / "sl")
