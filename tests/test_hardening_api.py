"""API argument errors name the argument at the call (not at a later forward), numpy integers are integers,
and a bad SAE folder's error names its file."""
import json

import numpy as np
import pytest
import torch
from helpers import CPU_BACKENDS
from safetensors.torch import load_file, save_file

import sae_fast
from sae_fast import SparseAutoencoder, ops

B, D, N = 4, 8, 16


def _t():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, D, generator=g), torch.randn(N, D, generator=g), torch.zeros(N), torch.zeros(D)


@pytest.mark.parametrize("call, error, message", [
    (lambda x, W, b, bd: ops.threshold_encode(x, W, b, bd, "abc"), TypeError, "threshold must be a finite number"),
    (lambda x, W, b, bd: ops.threshold_encode(x, W, b, bd, float("nan")), TypeError, "threshold must be a finite number"),
    (lambda x, W, b, bd: ops.topk_sae(x, W, b, W, bd, 4, k_aux=-5), ValueError, "k_aux must be >= 0; got -5"),
    (lambda x, W, b, bd: ops.topk_encode(x, W, b, bd, 2.5), TypeError, "k must be an int; got float 2.5"),
    (lambda x, W, b, bd: ops.relu_encode(x, W[:0], b[:0], bd), ValueError, "W_enc must have at least one latent"),
    (lambda x, W, b, bd: ops.threshold_encode(x, W[:0], b[:0], bd, 0.1), ValueError, "W_enc must have at least one"),
    (lambda x, W, b, bd: ops.topk_encode(*(t.to("meta") for t in (x, W, b, bd)), 4), ValueError, "meta device"),
])
def test_op_argument_errors_name_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call(*_t())


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(k=2.5), TypeError, "k must be an int; got float 2.5"),
    (dict(k="4"), TypeError, "k must be an int; got str '4'"),
    (dict(k=True), TypeError, "k must be an int; got bool True"),
    (dict(dead_tokens="many"), TypeError, "dead_tokens must be an int; got str 'many'"),
    (dict(aux_coeff=float("nan")), TypeError, "aux_coeff must be a finite number"),
    (dict(k_aux=-1), ValueError, "k_aux must be >= 0"),
])
def test_sae_constructor_refuses_bad_values_at_once(kwargs, error, message):
    with pytest.raises(error, match=message):
        SparseAutoencoder(D, N, "topk", **{"k": 4, **kwargs})


def test_numpy_integers_are_integers():
    x = _t()[0]
    sae = SparseAutoencoder(np.int64(D), np.int32(N), "topk", k=np.int64(4), k_aux=np.int16(2))
    assert type(sae.cfg.k) is int and type(sae.d_in) is int and sae.cfg.k_aux == 2
    assert sae(x).values.shape == (B, 4)
    assert ops.topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, np.int64(3))[0].shape == (B, 3)
    json.dumps(sae.cfg.to_dict())  # what save writes: plain ints


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
def test_decode_with_no_active_latent_is_the_bias(backend):
    _, W, _, bd = _t()
    bd = bd + 1.5
    with sae_fast.use_backend(backend):
        out = ops.sparse_decode(torch.zeros(B, 0), torch.zeros(B, 0, dtype=torch.int32), W, bd)
    torch.testing.assert_close(out, bd.expand(B, D))


@pytest.mark.parametrize("key, value, message", [
    ("k", 2.5, "k must be an int; got float 2.5"),
    ("k", True, "k must be an int; got bool True"),
    ("l1_coeff", float("nan"), "l1_coeff must be a finite number; got float nan"),
    ("dead_tokens", "many", "dead_tokens must be an int"),
])
def test_bad_cfg_values_are_refused_naming_the_file(tmp_path, key, value, message):
    SparseAutoencoder(D, N, "topk", k=4).save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    cfg[key] = value
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"{tmp_path / 's' / 'cfg.json'}: {message}"):
        SparseAutoencoder.load(tmp_path / "s")


def test_float_dead_counters_are_refused(tmp_path):
    SparseAutoencoder(D, N, "topk", k=4).save(tmp_path / "s")
    w = load_file(str(tmp_path / "s" / "sae.safetensors"))
    w["tokens_since_fired"] = w["tokens_since_fired"].float()
    save_file(w, str(tmp_path / "s" / "sae.safetensors"))
    with pytest.raises(ValueError, match="tensor 'tokens_since_fired' in .*sae.safetensors must be int64"):
        SparseAutoencoder.load(tmp_path / "s")


def test_undecodable_cfg_names_the_file(tmp_path):
    SparseAutoencoder(D, N, "topk", k=4).save(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match=f"{tmp_path / 's' / 'cfg.json'} is not valid JSON"):
        SparseAutoencoder.load(tmp_path / "s")


def test_cfg_without_format_says_so(tmp_path):
    SparseAutoencoder(D, N, "topk", k=4).save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    del cfg["format"]
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r'has no "format" entry.*a sae-fast config that lost its "format"'):
        SparseAutoencoder.load(tmp_path / "s")
