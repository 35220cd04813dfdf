"""Transcoder and skip-transcoder folders against the real peers: sparsify's (transcode, skip_connection) load
and save exactly, SAELens' Transcoder / SkipTranscoder / JumpReLU(Skip)Transcoder load with the same outputs,
and ours load in theirs; sae-fast's own folder keeps d_out and W_skip."""
import os

import pytest
import torch

from sae_fast import SparseAutoencoder
from sae_fast import io as sio
from sae_fast.reference import sparse_to_dense

if not torch.cuda.is_available():
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decoder needs a GPU

D, N, K, B = 24, 40, 5, 16
D_OUT = 17  # SAELens transcoders may predict another width


def _x(d=D, seed=1):
    return torch.randn(B, d, generator=torch.Generator().manual_seed(seed))


def _randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            scale = 0.3 if p.dim() == 1 else 1.7 / p.shape[-1] ** 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def _close(a, b, atol=1e-5):
    assert a.shape == b.shape and float((a - b).abs().max()) <= atol, float((a - b).abs().max())


def _ours_transcoder(act="topk", d_out=D, skip=True, seed=3):
    sae = _randomise(SparseAutoencoder(D, N, act, k=K, transcode=True, d_out=d_out, skip_connection=skip), seed)
    if act == "jumprelu":
        with torch.no_grad():
            sae.log_threshold.copy_(torch.randn(N, generator=torch.Generator().manual_seed(9)) - 1.0)
    return sae.eval()


def test_own_folder_round_trip(tmp_path):
    sae = _ours_transcoder(d_out=D_OUT)
    sae.save(tmp_path / "tc")
    back = SparseAutoencoder.load(tmp_path / "tc")
    assert back.cfg.transcode and back.cfg.skip_connection and back.d_out == D_OUT
    for (name, p), q in zip(sae.state_dict().items(), back.state_dict().values()):
        assert torch.equal(p, q), name


# ============================================================================ sparsify
@pytest.fixture(scope="module")
def sp():
    return pytest.importorskip("sparsify")


def _compare_sparsify(theirs, ours, x):
    with torch.no_grad():
        acts, idx, _ = theirs.encode(x)
        values, indices = ours.encode(x)
        _close(sparse_to_dense(values, indices, N), sparse_to_dense(acts, idx, N))
        _close(ours(x, target=x).x_hat, theirs(x).sae_out)
    assert (acts > 0).any()


@pytest.mark.parametrize("cfg", [{"transcode": True}, {"transcode": True, "skip_connection": True},
                                 {"skip_connection": True}], ids=["transcoder", "skip-transcoder", "skip-sae"])
def test_sparsify_coders_load_and_save_exactly(sp, tmp_path, cfg):
    theirs = _randomise(sp.SparseCoder(D, sp.SparseCoderConfig(num_latents=N, k=K, **cfg)))
    theirs.save_to_disk(tmp_path / "theirs")
    ours = SparseAutoencoder.load(tmp_path / "theirs").eval()
    assert ours.cfg.transcode == cfg.get("transcode", False)
    assert ours.cfg.skip_connection == cfg.get("skip_connection", False)
    x = _x()
    if ours.cfg.transcode:
        _compare_sparsify(theirs, ours, x)
    else:  # a skip SAE reconstructs its input
        with torch.no_grad():
            _close(ours(x).x_hat, theirs(x).sae_out)
    sio.save_sparsify(ours, tmp_path / "ours")
    again = sp.SparseCoder.load_from_disk(tmp_path / "ours")
    assert again.cfg.transcode == theirs.cfg.transcode and again.cfg.skip_connection == theirs.cfg.skip_connection
    for name, p in theirs.state_dict().items():  # bit for bit through our loader and writer
        assert torch.equal(again.state_dict()[name], p), name


def test_our_transcoder_loads_in_sparsify(sp, tmp_path):
    ours = _ours_transcoder()
    sio.save_sparsify(ours, tmp_path / "t")
    _compare_sparsify(sp.SparseCoder.load_from_disk(tmp_path / "t"), ours, _x())
    with pytest.raises(ValueError, match="as wide as their input"):
        sio.save_sparsify(_ours_transcoder(d_out=D_OUT), tmp_path / "u")


def test_folded_scales_read_raw_activations(tmp_path):
    """A transcoder trained on x * s_in predicting y * s_out, written for raw activations."""
    ours = _ours_transcoder()
    s_in, s_out = 2.5, 0.4
    sio.save_sparsify(ours, tmp_path / "t", act_scale=s_in, target_scale=s_out)
    raw = SparseAutoencoder.load(tmp_path / "t").eval()
    x = _x()
    with torch.no_grad():
        _close(raw(x, target=x).x_hat, ours(x * s_in, target=x).x_hat / s_out, atol=1e-4)


# ============================================================================ SAELens
@pytest.fixture(scope="module")
def sl():
    return pytest.importorskip("sae_lens")


def _saelens_transcoder(sl, arch, d_out=D_OUT, seed=0):
    from sae_lens.saes import transcoder as T
    cls, cfg_cls = {"transcoder": (T.Transcoder, T.TranscoderConfig),
                    "skip_transcoder": (T.SkipTranscoder, T.SkipTranscoderConfig),
                    "jumprelu_transcoder": (T.JumpReLUTranscoder, T.JumpReLUTranscoderConfig),
                    "jumprelu_skip_transcoder": (T.JumpReLUSkipTranscoder, T.JumpReLUSkipTranscoderConfig)}[arch]
    tc = _randomise(cls(cfg_cls(d_in=D, d_sae=N, d_out=d_out, apply_b_dec_to_input=False)), seed)
    if "jumprelu" in arch:
        with torch.no_grad():
            tc.threshold.copy_(torch.rand(N, generator=torch.Generator().manual_seed(5)) * 0.5)
    return tc.eval()


ARCHS = ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"]


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_transcoders_load_with_same_outputs(sl, tmp_path, arch):
    theirs = _saelens_transcoder(sl, arch)
    theirs.save_model(str(tmp_path / arch))
    ours = SparseAutoencoder.load(tmp_path / arch).eval()
    assert ours.cfg.transcode and ours.d_out == D_OUT and ours.cfg.skip_connection == ("skip" in arch)
    x = _x()
    with torch.no_grad():
        y, acts = theirs.forward_with_activations(x)
        values, indices = ours.encode(x)
        _close(sparse_to_dense(values, indices, N), acts)
        _close(ours(x, target=y).x_hat, y)
    assert (acts > 0).any()


@pytest.mark.parametrize("arch", ARCHS + ["batchtopk"])
def test_our_transcoders_load_in_saelens(sl, tmp_path, arch):
    from sae_lens import SAE
    act = "batchtopk" if arch == "batchtopk" else ("jumprelu" if "jumprelu" in arch else "relu")
    ours = _ours_transcoder(act, d_out=D_OUT, skip="skip" in arch or arch == "batchtopk")
    if act == "batchtopk":
        ours.threshold.fill_(0.3)  # its learned inference threshold -> SAELens' JumpReLU transcoder
    sio.save_saelens(ours, tmp_path / "t")
    theirs = SAE.load_from_disk(str(tmp_path / "t")).eval()
    x = _x()
    with torch.no_grad():
        y, acts = theirs.forward_with_activations(x)
        values, indices = ours.encode(x)
        _close(sparse_to_dense(values, indices, N), acts)
        _close(ours(x, target=y).x_hat, y)
    assert (acts > 0).any()


def test_saelens_refuses_what_it_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="no top-k transcoder"):
        sio.save_saelens(_ours_transcoder("topk"), tmp_path / "t")
    sae = SparseAutoencoder(D, N, "relu", skip_connection=True)
    with pytest.raises(ValueError, match="skip connections on transcoders only"):
        sio.save_saelens(sae, tmp_path / "t")
    assert not (tmp_path / "t").exists()
