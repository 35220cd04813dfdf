"""Non-finite weights are never masked: every backend agrees with reference.py (NaN propagates)."""
import importlib.util

import pytest
import torch
from helpers import CPU_BACKENDS, make_sae_tensors

from sae_fast import SparseAutoencoder, ops

BACKENDS = ["reference"] + CPU_BACKENDS
if importlib.util.find_spec("triton") is not None and "triton" in ops.available_backends():
    BACKENDS.append("triton")  # under TRITON_INTERPRET=1 on CPU (tiny sizes); on CUDA tensors with -m gpu


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


# ---------------------------------------------------------------------------- the Triton kernels' own paths
TRITON_CONFIGS = {  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, splits, SMALL), as in test_triton_kernels.py
    "topk-path": (16, 32, 16, 4, 1, 1, 0), "insert-path-3-splits": (16, 32, 16, 4, 1, 3, 16),
    "mixed": (32, 64, 32, 4, 1, 2, 2)}


@pytest.mark.skipif("triton" not in [b if isinstance(b, str) else b.values[0] for b in BACKENDS],
                    reason="needs the triton backend (TRITON_INTERPRET=1 on CPU)")
@pytest.mark.parametrize("scan", [False, True], ids=["fused", "scan"])
@pytest.mark.parametrize("cfg", list(TRITON_CONFIGS))
def test_triton_kernel_paths_rank_nan_first_with_auxk(cfg, scan):
    """NaN scores from a NaN weight row, from a computed NaN (inf - inf: negative on x86) and in a dead latent:
    the packed main list, the AuxK list (unpacked), tl.topk merges and split merges all put them first."""
    from sae_fast import reference as R
    from sae_fast.kernels import scan_encoder, topk_encoder
    from sae_fast.kernels.encoder_common import EncoderConfig, fold_bias

    B, d, n, k, k_aux = 9, 16, 130, 6, 4
    x, W_enc, b_enc, _, b_dec = make_sae_tensors(B, d, n, requires_grad=False, seed=3)
    W_enc[37] = float("nan")
    W_enc[101] = float("nan")
    dead = torch.zeros(n, dtype=torch.bool)
    dead[[5, 37, 90, 120]] = True
    c = fold_bias(W_enc, b_enc, b_dec)
    c[64] = float("inf") - float("inf")  # a computed NaN
    cfg = EncoderConfig(*TRITON_CONFIGS[cfg])
    if scan:  # 16-bit x, fp32 scores from a GEMM, in chunks of 50 latents (W_enc rounded per chunk)
        x = x.bfloat16()
        pre, idx, aux_pre, aux_idx = scan_encoder.topk_scan(x, W_enc, c, k, dead, k_aux, torch.float32, 50, cfg)
        W_enc = W_enc.bfloat16()
    else:
        pre, idx, aux_pre, aux_idx = topk_encoder.topk_select(x, W_enc, c, k, dead, k_aux, config=cfg)
    scores = x.double() @ W_enc.double().T + c.double()
    ref_pre, ref_idx = R.topk(scores, k)
    ref_aux, ref_aux_idx = R.topk(scores.masked_fill(~dead, float("-inf")), k_aux)
    assert idx[:, :3].tolist() == [[37, 64, 101]] * B and torch.isnan(pre[:, :3]).all()
    assert torch.equal(idx, ref_idx) and torch.equal(aux_idx, ref_aux_idx)
    assert aux_idx[:, 0].tolist() == [37] * B and torch.isnan(aux_pre[:, 0]).all()
    torch.testing.assert_close(pre[:, 3:].double(), ref_pre[:, 3:], atol=1e-5, rtol=1e-5)
