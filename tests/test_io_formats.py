"""SAELens and sparsify folders: loaded and written exactly, checked against the real packages.

Oracles: SAEs built in the peer package with random weights and saved with its own save function; we load
them and compare codes and reconstructions on the same inputs (1e-5). The other way: folders we write are
loaded by the peer package and must give our outputs. Peer tests skip when the peers are not installed
(they are in the ``test`` extra, so CI runs them).
"""
import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

from sae_fast import SparseAutoencoder
from sae_fast import io as sio
from sae_fast.reference import dense_to_sparse, sparse_to_dense

if not torch.cuda.is_available():
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decoder needs a GPU

D, N, K, B = 24, 40, 5, 16  # n != d, so a transposed matrix cannot pass a shape check
ATOL = 1e-5


def _x(seed=1, B=B, d=D):
    return torch.randn(B, d, generator=torch.Generator().manual_seed(seed))


def _dense(sae, x):
    values, indices = sae.encode(x)
    return sparse_to_dense(values, indices, sae.n_latents)


def _close(a, b, atol=ATOL):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= atol, (a - b).abs().max().item()


def _randomise(module, seed=0):
    """Random weights of a realistic scale everywhere (non-unit decoder norms, non-zero biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            scale = 0.3 if p.dim() == 1 else 1 / p.shape[-1] ** 0.5 * 1.7
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))
    return module


def _random_eval_sae(act, seed, threshold_seed):
    """A randomised SAE in eval mode with a random JumpReLU threshold and a BatchTopK inference threshold."""
    sae = _randomise(SparseAutoencoder(D, N, act, k=K, seed=0), seed=seed)
    if act == "jumprelu":
        with torch.no_grad():
            sae.log_threshold.copy_(torch.randn(N, generator=torch.Generator().manual_seed(threshold_seed)) - 1.0)
    if act == "batchtopk":
        sae.threshold.fill_(0.2)
    return sae.eval()


# ============================================================================ SAELens
@pytest.fixture(scope="module")
def sl():
    return pytest.importorskip("sae_lens")


def _saelens_case(sl, case):
    from sae_lens.saes import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    kw = dict(d_in=D, d_sae=N)
    return {
        "topk": lambda: TopKSAE(TopKSAEConfig(k=K, **kw)),
        "topk_rescale_no_bdec_in": lambda: TopKSAE(TopKSAEConfig(
            k=K, rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=False, **kw)),
        "topk_training": lambda: TopKTrainingSAE(TopKTrainingSAEConfig(k=K, **kw)),  # rescale on by default
        "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(apply_b_dec_to_input=False, **kw)),
        "jumprelu_training": lambda: JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(**kw)),
        "standard": lambda: StandardSAE(StandardSAEConfig(**kw)),
        "batchtopk_training": lambda: BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=K, **kw)),
    }[case]()


def _compare_with_saelens(theirs, ours, x):
    """Codes, reconstructions, and our decode of their codes."""
    with torch.no_grad():
        acts = theirs.encode(x)
        _close(_dense(ours, x), acts)
        _close(ours.decode(*ours.encode(x)), theirs.decode(acts))
        values, indices = dense_to_sparse(acts)
        _close(ours.decode(values, indices), theirs.decode(acts))
    assert (acts > 0).any() and (acts == 0).any()  # the comparison saw both active and inactive latents


# Inference SAEs are saved with save_model; training SAEs both ways: a training checkpoint (save_model) and
# the inference folder (save_inference_model: decoder norms folded, BatchTopK turned into JumpReLU).
SAELENS_CASES = [(c, "save_model") for c in ("topk", "topk_rescale_no_bdec_in", "jumprelu", "standard")] + [
    (c, s) for c in ("topk_training", "jumprelu_training", "batchtopk_training")
    for s in ("save_model", "save_inference_model")]


@pytest.mark.parametrize("case,save", SAELENS_CASES)
def test_saelens_files_load_with_same_outputs(sl, tmp_path, case, save):
    theirs = _randomise(_saelens_case(sl, case))
    with torch.no_grad():
        if case == "jumprelu":  # thresholds at or below zero: SAELens' inference module treats them as zero
            theirs.threshold[:5] = torch.tensor([0.0, -0.2, -1.0, 0.0, -0.05])
        if case == "jumprelu_training":  # its training module keeps thresholds >= 0 (and skips the ReLU)
            theirs.threshold.abs_()[:3] = 0.0
    if case == "batchtopk_training":
        theirs.topk_threshold.fill_(0.25)
    getattr(theirs, save)(tmp_path / "sl")
    ours = sio.load_sae(tmp_path / "sl")
    assert isinstance(ours, SparseAutoencoder) and sio.detect_format(tmp_path / "sl") == "saelens"
    assert (ours.d_in, ours.n_latents) == (D, N)
    x = _x()
    if case == "batchtopk_training" and save == "save_model":
        ours.train()  # a training checkpoint: BatchTopK over the batch, like SAELens' training module
        _compare_with_saelens(theirs, ours, x)
        ours.eval()  # at inference: the learned threshold, which is what SAELens' inference save holds
        assert float(ours.threshold) == 0.25
        return
    ours.eval()
    if save == "save_model":
        _compare_with_saelens(theirs, ours, x)
    # The folder read back by SAELens itself (training checkpoints load as the inference architecture).
    _compare_with_saelens(sl.SAE.load_from_disk(tmp_path / "sl"), ours, x)


def test_saelens_rescale_is_folded_exactly(sl, tmp_path):
    """rescale_acts_by_decoder_norm: scores scaled by ||W_dec_i|| before top-k; our decoder ends unit-norm."""
    theirs = _randomise(_saelens_case(sl, "topk_training"))
    norms = theirs.W_dec.detach().norm(dim=1)
    assert (norms - 1).abs().max() > 0.1  # the test means something only with non-unit decoder rows
    theirs.save_model(tmp_path / "sl")
    ours = sio.load_saelens(tmp_path / "sl")
    _close(ours.W_dec.detach().norm(dim=1), torch.ones(N))
    _compare_with_saelens(theirs, ours, _x())


def test_saelens_activation_scaler_factor_is_folded(sl, tmp_path):
    """expected_average_only_in: the SAE was trained on x * s. Our load takes raw x, like SAELens after its
    own fold_activation_norm_scaling_factor (what its trainer does at the end)."""
    from sae_lens.saes import StandardSAE, StandardSAEConfig
    from sae_lens.training.activation_scaler import ActivationScaler

    theirs = _randomise(StandardSAE(StandardSAEConfig(d_in=D, d_sae=N, normalize_activations="expected_average_only_in")))
    theirs.save_model(tmp_path / "sl")
    s = 0.37
    ActivationScaler(scaling_factor=s).save(str(tmp_path / "sl" / "activation_scaler.json"))
    ours = sio.load_sae(tmp_path / "sl")
    x = _x()
    with torch.no_grad():
        _close(ours.decode(*ours.encode(x)), theirs.decode(theirs.encode(x * s)) / s)
    theirs.fold_activation_norm_scaling_factor(s)
    _compare_with_saelens(theirs, ours, x)
    os.remove(tmp_path / "sl" / "activation_scaler.json")
    _compare_with_saelens(theirs, sio.load_saelens(tmp_path / "sl", norm_scaling_factor=s), x)
    with pytest.warns(UserWarning, match="no scaling factor"):
        sio.load_saelens(tmp_path / "sl")


def test_saelens_whitening_is_folded(sl, tmp_path):
    """covariance_whitening checkpoint (with rescale_acts_by_decoder_norm): oracle = SAELens' own fold."""
    from sae_lens.saes import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.activation_scaler import ActivationScaler, ActivationWhitening

    theirs = _randomise(TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=N, k=K,
                                                              normalize_activations="covariance_whitening")))
    g = torch.Generator().manual_seed(5)
    M = torch.randn(D, D, generator=g, dtype=torch.float64) / D ** 0.5 + torch.eye(D, dtype=torch.float64)
    mean = torch.randn(D, generator=g, dtype=torch.float64)
    theirs.save_model(tmp_path / "sl")
    ActivationScaler(whitening=ActivationWhitening(mean, M, torch.linalg.inv(M))).save(
        str(tmp_path / "sl" / "activation_scaler.json"))
    ours = sio.load_sae(tmp_path / "sl")
    theirs.fold_activation_whitening(mean, M, torch.linalg.inv(M))
    _compare_with_saelens(theirs, ours, _x())


def test_saelens_pre_6_config(sl, tmp_path):
    """An old SAELens folder (no version, activation_fn_str + kwargs), read by SAELens' own converter."""
    g = torch.Generator().manual_seed(3)
    weights = {"W_enc": torch.randn(D, N, generator=g) / 3, "b_enc": torch.randn(N, generator=g) / 3,
               "W_dec": torch.randn(N, D, generator=g) / 3, "b_dec": torch.randn(D, generator=g) / 3}
    folder = tmp_path / "old"
    folder.mkdir()
    save_file(weights, str(folder / "sae_weights.safetensors"))
    cfg = {"d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu", "hook_point": "blocks.0.hook_resid_pre",
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": False,
           "normalize_activations": False, "model_name": "gpt2", "hook_point_layer": 0}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    ours = sio.load_sae(folder)
    assert ours.cfg.activation == "topk" and ours.cfg.k == K
    _compare_with_saelens(sl.SAE.load_from_disk(folder), ours, _x())


@pytest.mark.parametrize("act", ["topk", "relu", "jumprelu", "batchtopk"])
def test_our_saelens_files_load_in_saelens(sl, tmp_path, act):
    ours = _random_eval_sae(act, seed=2, threshold_seed=4)
    sio.save_saelens(ours, tmp_path / "out", metadata={"hook_name": "blocks.3.hook_resid_post"})
    theirs = sl.SAE.load_from_disk(tmp_path / "out")
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    _compare_with_saelens(theirs, ours, _x())
    again = sio.load_sae(tmp_path / "out")  # and back: the same SAE, bit for bit where nothing was folded
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(again, name), getattr(ours, name)), name


def test_saelens_jumprelu_zero_threshold_round_trip(sl, tmp_path):
    """A threshold <= 0 becomes log_threshold = -inf (theta = 0): exact, and written back as 0."""
    theirs = _randomise(_saelens_case(sl, "jumprelu"))
    with torch.no_grad():
        theirs.threshold[:3] = torch.tensor([0.0, -0.5, 0.0])
    theirs.save_model(tmp_path / "a")
    ours = sio.load_saelens(tmp_path / "a")
    assert torch.isinf(ours.log_threshold[:3]).all()
    sio.save_saelens(ours, tmp_path / "b")
    back = sl.SAE.load_from_disk(tmp_path / "b")
    assert torch.equal(back.threshold[:3], torch.zeros(3))
    _compare_with_saelens(theirs, sio.load_sae(tmp_path / "b"), _x())


# ============================================================================ sparsify
@pytest.fixture(scope="module")
def sp():
    return pytest.importorskip("sparsify")


def _sparsify_sae(sp, seed=0, **cfg):
    cfg = {"num_latents": N, "k": K, **cfg}
    return _randomise(sp.SparseCoder(D, sp.SparseCoderConfig(**cfg)), seed=seed)


def _compare_with_sparsify(theirs, ours, x):
    with torch.no_grad():
        top_acts, top_idx, _ = theirs.encode(x)
        _close(_dense(ours, x), sparse_to_dense(top_acts, top_idx, theirs.num_latents))
        _close(ours.decode(top_acts, top_idx), theirs.decode(top_acts, top_idx))
        _close(ours(x).x_hat, theirs(x).sae_out)
    assert (top_acts > 0).any()


@pytest.mark.parametrize("cfg", [{}, {"num_latents": 0, "expansion_factor": 2}])
def test_sparsify_files_load_with_same_outputs(sp, tmp_path, cfg):
    theirs = _sparsify_sae(sp, **cfg)
    theirs.save_to_disk(tmp_path / "layers.3")
    assert sio.detect_format(tmp_path / "layers.3") == "sparsify"
    ours = SparseAutoencoder.load(tmp_path / "layers.3")
    assert ours.cfg.activation == "topk" and ours.cfg.k == K and ours.n_latents == theirs.num_latents
    _compare_with_sparsify(theirs, ours, _x())


def test_sparsify_square_decoder_is_not_transposed(sp, tmp_path):
    """n == d: a transposed W_dec would pass every shape check, so only the outputs can catch it."""
    theirs = _randomise(sp.SparseCoder(D, sp.SparseCoderConfig(num_latents=D, k=K)))
    theirs.save_to_disk(tmp_path / "sq")
    _compare_with_sparsify(theirs, sio.load_sparsify(tmp_path / "sq"), _x())


def test_sparsify_run_folder_with_several_hookpoints(sp, tmp_path):
    """A sparsify run: one folder per hookpoint, plus the trainer's pickles, which we must never open."""
    run = tmp_path / "run"
    saes = {"layers.0.mlp": _sparsify_sae(sp, seed=0), "layers.10": _sparsify_sae(sp, seed=1),
            "layers.2": _sparsify_sae(sp, seed=2)}
    for name, s in saes.items():
        s.save_to_disk(run / name)
    (run / "config.json").write_text("{}")
    marker = tmp_path / "unpickled"

    class Boom:  # unpickling this file would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (run / "state.pt").write_bytes(pickle.dumps(Boom()))
    loaded = sio.load_sae(run)
    assert list(loaded) == ["layers.0.mlp", "layers.2", "layers.10"]  # natural order, like sparsify
    x = _x()
    for name, ours in loaded.items():
        _compare_with_sparsify(saes[name], ours, x)
    _compare_with_sparsify(saes["layers.2"], SparseAutoencoder.load(run, hookpoint="layers.2"), x)
    assert set(sio.load_sparsify(run)) == set(saes)
    with pytest.raises(ValueError, match="several hookpoints.*hookpoint="):
        SparseAutoencoder.load(run)
    with pytest.raises(FileNotFoundError, match="no SAE for hookpoint 'layers.7'.*layers.0.mlp"):
        sio.load_sae(run, hookpoint="layers.7")
    assert not marker.exists()


def test_our_sparsify_files_load_in_sparsify(sp, tmp_path):
    ours = _randomise(SparseAutoencoder(D, N, "topk", k=K, seed=0), seed=3)
    sio.save_sparsify(ours, tmp_path / "one")
    _compare_with_sparsify(sp.SparseCoder.load_from_disk(tmp_path / "one"), ours, _x())
    other = _randomise(SparseAutoencoder(D, 2 * N, "topk", k=3, seed=0), seed=4)
    sio.save_sparsify({"layers.1": ours, "layers.5": other}, tmp_path / "run")
    theirs = sp.SparseCoder.load_many(str(tmp_path / "run"), local=True)
    assert list(theirs) == ["layers.1", "layers.5"]
    _compare_with_sparsify(theirs["layers.5"], other, _x())
    assert torch.equal(sio.load_sae(tmp_path / "run")["layers.5"].W_dec, other.W_dec)


# ============================================================================ no peers needed
def _own_and_peer_folders(tmp_path):
    sae = _randomise(SparseAutoencoder(D, N, "topk", k=K, seed=0))
    sae.save(tmp_path / "own")
    sio.save_saelens(sae, tmp_path / "saelens")
    sio.save_sparsify(sae, tmp_path / "sparsify")
    return sae


def test_detect_format_and_single_entry(tmp_path):
    sae = _own_and_peer_folders(tmp_path)
    x = _x()
    for fmt, folder in [("sae-fast", "own"), ("saelens", "saelens"), ("sparsify", "sparsify")]:
        assert sio.detect_format(tmp_path / folder) == fmt
        assert sio.detect_format(tmp_path / folder / "cfg.json") == fmt  # a file inside the folder works too
        loaded = SparseAutoencoder.load(tmp_path / folder)
        assert torch.equal(loaded.W_enc, sae.W_enc) and torch.equal(loaded.b_dec, sae.b_dec), fmt
        assert torch.equal(loaded.decode(*loaded.encode(x)), sae.decode(*sae.encode(x))), fmt
    assert set(sio.load_sae(tmp_path)) == {"own", "saelens", "sparsify"}  # a folder of SAE folders


def test_dtype_is_kept_or_converted(tmp_path):
    sae = _randomise(SparseAutoencoder(D, N, "topk", k=K, seed=0)).to(torch.bfloat16)
    sio.save_saelens(sae, tmp_path / "sl")
    sio.save_sparsify(sae, tmp_path / "sp")
    for folder in ("sl", "sp"):
        loaded = sio.load_sae(tmp_path / folder)
        assert loaded.W_enc.dtype == torch.bfloat16 and torch.equal(loaded.W_enc, sae.W_enc)
        assert sio.load_sae(tmp_path / folder, dtype="float32").W_dec.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        sio.load_sae(tmp_path / "sl", dtype="int8")


def test_old_finetuning_scaling_factor_is_folded_into_the_decoder(tmp_path):
    """SAELens < 6 decoded (acts * scaling_factor) @ W_dec + b_dec."""
    g = torch.Generator().manual_seed(0)
    W_enc, b_enc = torch.randn(D, N, generator=g) / 3, torch.randn(N, generator=g) / 3
    W_dec, b_dec, sf = torch.randn(N, D, generator=g), torch.randn(D, generator=g), torch.rand(N, generator=g) + 0.5
    folder = tmp_path / "old"
    folder.mkdir()
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "scaling_factor": sf},
              str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": N, "finetuning_scaling_factor": True}))
    ours = sio.load_sae(folder)
    x = _x()
    acts = torch.relu((x - b_dec) @ W_enc + b_enc)
    _close(_dense(ours, x), acts)
    _close(ours.decode(*ours.encode(x)), (acts * sf) @ W_dec + b_dec)


def _break(folder, *, cfg=None, drop=None, tensors=None):
    """Rewrite a saved folder: update cfg.json keys, drop a file, or replace/add/remove tensors."""
    from safetensors.torch import load_file

    if cfg is not None:
        c = json.loads((folder / "cfg.json").read_text())
        c.update(cfg)
        (folder / "cfg.json").write_text(json.dumps(c))
    if drop is not None:
        os.remove(folder / drop)
    if tensors is not None:
        wfile = next(p for p in folder.iterdir() if p.suffix == ".safetensors")
        t = load_file(str(wfile))
        for k, v in tensors.items():
            if v is None:
                t.pop(k)
            else:
                t[k] = v
        save_file(t, str(wfile))


@pytest.mark.parametrize("fmt,change,error,match", [
    ("saelens", dict(drop="sae_weights.safetensors"), FileNotFoundError, "has cfg.json but no weights"),
    ("saelens", dict(drop="cfg.json"), FileNotFoundError, "not an SAE folder"),
    ("saelens", dict(cfg={"architecture": "gated"}), ValueError, "unsupported SAELens architecture 'gated'"),
    ("saelens", dict(cfg={"normalize_activations": "layer_norm"}), ValueError, "cannot be folded"),
    ("saelens", dict(cfg={"k": 2.5}), ValueError, "k must be a whole number"),
    ("saelens", dict(cfg={"k": N + 1}), ValueError, "k must be between 1 and n_latents"),
    ("saelens", dict(tensors={"W_enc": torch.zeros(N, D)}), ValueError,
     r"tensor 'W_enc' in .*sae_weights.safetensors has shape \(40, 24\); expected \(24, 40\) \(d_in, d_sae\)"),
    ("saelens", dict(tensors={"b_dec": None}), ValueError, "has no tensor 'b_dec'"),
    ("saelens", dict(tensors={"b_gate": torch.zeros(N)}), ValueError, "does not understand .*b_gate"),
    ("saelens", dict(tensors={"b_enc": torch.zeros(N, dtype=torch.int32)}), ValueError, "must be floating point"),
    ("sparsify", dict(tensors={"W_dec": torch.zeros(D, N)}), ValueError,
     r"tensor 'W_dec' .* has shape \(24, 40\); expected \(40, 24\)"),
    ("sparsify", dict(tensors={"encoder.bias": torch.zeros(N + 1)}), ValueError, "tensor 'encoder.bias'"),
    ("sparsify", dict(cfg={"activation": "groupmax"}), ValueError, "unsupported sparsify activation 'groupmax'"),
    ("sparsify", dict(cfg={"transcode": "yes"}), ValueError, "transcode must be true or false"),
    ("sparsify", dict(cfg={"skip_connection": True}), ValueError, "has no tensor 'W_skip'"),
    ("sparsify", dict(cfg={"signed": True}), ValueError, "signed activations"),
    ("sparsify", dict(cfg={"num_latents": N + 2}), ValueError, r"tensor 'encoder.weight' .* expected \(42, 24\)"),
])
def test_bad_files_give_clear_errors(tmp_path, fmt, change, error, match):
    _own_and_peer_folders(tmp_path)
    _break(tmp_path / fmt, **change)
    with pytest.raises(error, match=match):
        sio.load_sae(tmp_path / fmt)


def test_bad_json_and_missing_folder(tmp_path):
    _own_and_peer_folders(tmp_path)
    (tmp_path / "sparsify" / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="cfg.json is not valid JSON"):
        sio.load_sae(tmp_path / "sparsify")
    (tmp_path / "saelens" / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        sio.load_sae(tmp_path / "saelens")
    with pytest.raises(FileNotFoundError, match="not an SAE folder"):
        sio.load_sae(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="not an SAE folder"):
        sio.load_sae(empty)


def test_saving_what_a_format_cannot_hold_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sparsify stores top-k SAEs only.*'relu'"):
        sio.save_sparsify(SparseAutoencoder(D, N, "relu"), tmp_path / "x")
    with pytest.raises(ValueError, match="hookpoint 'b'"):
        sio.save_sparsify({"a": SparseAutoencoder(D, N, "topk", k=K), "b": SparseAutoencoder(D, N, "jumprelu")},
                          tmp_path / "x")
    with pytest.raises(ValueError, match="no learned threshold yet"):
        sio.save_saelens(SparseAutoencoder(D, N, "batchtopk", k=K), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temp folders left behind


def test_saves_replace_a_folder_atomically(tmp_path):
    sae = SparseAutoencoder(D, N, "topk", k=K, seed=0)
    for save in (sio.save_saelens, sio.save_sparsify):
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        save(sae, tmp_path / "out")
        save(SparseAutoencoder(D, N, "topk", k=K, seed=1), tmp_path / "out")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        assert not torch.equal(sio.load_sae(tmp_path / "out").W_dec, sae.W_dec)


@pytest.mark.parametrize("act", ["topk", "relu", "jumprelu", "batchtopk"])
def test_folded_activation_scale_reads_raw_activations(tmp_path, act):
    # An SAE trained on activations * scale; the folded copy (and the files written with act_scale) read
    # raw activations and reconstruct in raw units, with the same latents.
    scale = 2.5
    ours = _random_eval_sae(act, seed=3, threshold_seed=5)
    x = _x(seed=7)
    with torch.no_grad():
        want = ours(x * scale)
        folded = sio.fold_activation_scale(ours, scale)
        got = folded(x)
    assert torch.equal(got.indices, want.indices)
    _close(got.x_hat, want.x_hat / scale)
    assert torch.equal(ours.W_enc, _randomise(SparseAutoencoder(D, N, act, k=K, seed=0), seed=3).W_enc)  # copy
    sio.save_saelens(ours, tmp_path / "sl", act_scale=scale)
    with torch.no_grad():
        _close(sio.load_sae(tmp_path / "sl").decode(*sio.load_sae(tmp_path / "sl").encode(x)), want.x_hat / scale)
    if act == "topk":
        sio.save_sparsify({"h.1": ours}, tmp_path / "sp", act_scale={"h.1": scale})
        with torch.no_grad():
            _close(sio.load_sae(tmp_path / "sp", hookpoint="h.1")(x).x_hat, want.x_hat / scale)
    with pytest.raises(ValueError, match="scale must be a positive number"):
        sio.fold_activation_scale(ours, 0.0)
