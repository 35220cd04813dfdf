"""Non-finite weights are never masked: every backend agrees with reference.py (NaN propagates)."""
import importlib.util

import pytest
import torch
from helpers import CPU_BACKENDS, make_sae_tensors

from sae_fast import SparseAutoencoder, ops

BACKENDS = ["reference"] + CPU_BACKENDS
if importlib.util.find_spec("triton") is not None and "triton" in ops.available_backends():
    # Under TRITON_INTERPRET=1 here (tiny sizes). Its packed sort keys still rank NaN below numbers:
    # not fixed yet (kernels/topk_encoder.py), kept visible as a strict xfail.
    BACKENDS.append(pytest.param("triton", marks=pytest.mark.xfail(
        strict=True, reason="triton encoder keys drop NaN scores (kernels/topk_encoder.py), issue 20")))


def _encode(backend, x, W_enc, b_enc, b_dec, k):
    with ops.use_backend(backend):
        return ops.topk_encode(x, W_enc, b_enc, b_dec, k)


def _weights(n=40, d=8, B=5):
    x, W_enc, b_enc, _, b_dec = make_sae_tensors(B, d, n, requires_grad=False)
    return x, W_enc, b_enc, b_dec


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_row_in_W_enc_is_selected_first(backend):
    x, W_enc, b_enc, b_dec = _weights()
    W_enc[17] = float("nan")
    values, idx = _encode(backend, x, W_enc, b_enc, b_dec, 4)
    assert (idx[:, 0] == 17).all(), idx
    assert torch.isnan(values[:, 0]).all() and torch.isfinite(values[:, 1:]).all()
    ref_v, ref_i = _encode("reference", x, W_enc, b_enc, b_dec, 4)
    assert torch.equal(idx, ref_i)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["W_enc", "b_dec", "b_enc"])
def test_all_nan_gives_nan_values_like_reference(backend, where):
    x, W_enc, b_enc, b_dec = _weights()
    {"W_enc": W_enc, "b_dec": b_dec, "b_enc": b_enc}[where].fill_(float("nan"))
    values, idx = _encode(backend, x, W_enc, b_enc, b_dec, 3)
    ref_v, ref_i = _encode("reference", x, W_enc, b_enc, b_dec, 3)
    assert torch.isnan(ref_v).all()
    assert torch.isnan(values).all(), values
    assert torch.equal(idx, ref_i), (idx, ref_i)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_inf_score_is_selected_first(backend):
    x, W_enc, b_enc, b_dec = _weights()
    b_enc[9] = float("inf")
    values, idx = _encode(backend, x, W_enc, b_enc, b_dec, 2)
    assert (idx[:, 0] == 9).all() and torch.isinf(values[:, 0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sae_with_nan_weights_reports_nan_loss(backend):
    torch.manual_seed(0)
    sae = SparseAutoencoder(8, 32, k=4)
    with torch.no_grad():
        sae.W_enc[3] = float("nan")
    x = torch.randn(6, 8)
    with ops.use_backend(backend):
        out = sae(x)
    assert torch.isnan(out.loss) and torch.isnan(out.fvu)
