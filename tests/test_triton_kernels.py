"""The triton backend's kernels against reference.py, run on CPU tensors by Triton's interpreter.

The interpreter must be on before triton is imported (conftest.py sets TRITON_INTERPRET=1 when there is
no GPU). Sizes are small: the interpreter runs every program in numpy. The same kernels are compiled for
sm_80/sm_90 in test_triton_static.py and run on a GPU at realistic sizes in test_triton_gpu.py.
"""
import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU runs of the Triton kernels need TRITON_INTERPRET=1 set before triton is imported",
                allow_module_level=True)

from helpers import (  # noqa: E402
    DTYPES,
    close,
    encode_decode,
    grads_match,
    load_script,
    make_sae_tensors,
    ref_grads,
    ref_topk,  # noqa: E402
)

import sae_fast  # noqa: E402
from sae_fast import dispatch, ops  # noqa: E402
from sae_fast import reference as R  # noqa: E402
from sae_fast.backends.base import SparseBackend  # noqa: E402
from sae_fast.backends.triton import EncoderOptions  # noqa: E402
from sae_fast.kernels import decoder as dec  # noqa: E402
from sae_fast.kernels import latent_backward as lb  # noqa: E402
from sae_fast.kernels import scan_encoder as scan  # noqa: E402
from sae_fast.kernels import threshold_encoder as thr  # noqa: E402
from sae_fast.kernels import topk_encoder as topk  # noqa: E402
from sae_fast.kernels.encoder_common import EncoderConfig, fold_bias  # noqa: E402

# The backend's tests against reference.py (every activation, gradients, master weights, fuzzed shapes) are
# test_ops.py's, parametrised over the triton backend too; here are its kernels' own paths.


# ----------------------------------------------------------------------------- encoder kernel paths
def _ref_topk(x, W_enc, b_enc, b_dec, k, dead=None):
    pre = R.pre_activations(*(t.double() for t in (x, W_enc, b_enc, b_dec)))
    if dead is not None:
        pre = pre.masked_fill(~dead, float("-inf"))
    return ref_topk(pre, k)


CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, splits, SMALL)
    EncoderConfig(16, 32, 16, 4, 1, 1, 0),    # every tile with a winner through tl.topk
    EncoderConfig(16, 32, 16, 4, 1, 3, 16),   # winners one at a time, 3 splits merged
    EncoderConfig(32, 64, 32, 4, 1, 2, 2),    # both paths
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["topk-path", "insert-path-3-splits", "mixed"])
def test_topk_kernel_paths_agree_with_reference(cfg):
    B, d, n, k, k_aux = 17, 20, 130, 8, 5
    x, W_enc, b_enc, _, b_dec = make_sae_tensors(B, d, n, requires_grad=False, seed=3)
    dead = torch.rand(n, generator=torch.Generator().manual_seed(4)) < 0.3
    c = fold_bias(W_enc, b_enc, b_dec)
    pre, idx, aux_pre, aux_idx = topk.topk_select(x, W_enc, c, k, dead, k_aux, config=cfg)
    ref_pre, ref_idx = _ref_topk(x, W_enc, b_enc, b_dec, k)
    ref_aux_pre, ref_aux_idx = _ref_topk(x, W_enc, b_enc, b_dec, k_aux, dead)
    assert torch.equal(idx, ref_idx) and torch.equal(aux_idx, ref_aux_idx)
    close(pre, ref_pre, 1e-5, 1e-5, "pre")
    close(aux_pre, ref_aux_pre, 1e-5, 1e-5, "aux pre")


@pytest.mark.parametrize("cfg", CONFIGS, ids=["topk-path", "insert-path-3-splits", "mixed"])
def test_ties_lower_index_wins_across_tiles_and_splits(cfg):
    # Identical encoder rows give identical scores: every row must keep the lowest latent ids. Small integer
    # activations make the scores exact in any summation order (a BLAS may sum tile columns differently).
    n, k = 150, 8
    x = torch.randint(1, 4, (5, 16), generator=torch.Generator().manual_seed(0)).float()
    W_enc = torch.ones(n, 16)
    W_enc[100:] *= 0.5  # a lower score for the tail: ties only decide inside the head
    c = torch.zeros(n)
    _, idx, _, _ = topk.topk_select(x, W_enc, c, k, config=cfg)
    assert idx.tolist() == [list(range(k))] * 5


# ----------------------------------------------------------------------------- GEMM + scan (topk_scan)
SCAN_CHUNKS = [7, 32, 50, 1000]  # narrower than a tile, one tile, not a multiple of tiles, all of n at once


@pytest.mark.parametrize("chunk", SCAN_CHUNKS)
@pytest.mark.parametrize("cfg", [None, EncoderConfig(16, 32, 16, 4, 1, 3, 2)], ids=["default", "3-splits-mixed"])
def test_scan_over_score_chunks_agrees_with_reference(chunk, cfg):
    """topk_scan: chunks of fp32 scores from a GEMM, merged into running lists that persist across chunks."""
    B, d, n, k, k_aux = 17, 20, 130, 8, 5
    x, W_enc, b_enc, _, b_dec = make_sae_tensors(B, d, n, requires_grad=False, seed=3)
    x = x.bfloat16()
    dead = torch.rand(n, generator=torch.Generator().manual_seed(4)) < 0.3
    c = fold_bias(W_enc, b_enc, b_dec)
    W16 = W_enc.bfloat16()  # what the chunks multiply (a master W_enc is rounded per chunk)
    pre, idx, aux_pre, aux_idx = scan.topk_scan(x, W_enc, c, k, dead, k_aux, torch.float32, chunk, cfg)
    p = x.double() @ W16.double().T + c.double()
    ref_idx = R.topk_indices(p, k)
    ref_aux_idx = R.topk_indices(p.masked_fill(~dead, float("-inf")), k_aux)
    assert torch.equal(idx.long(), ref_idx) and torch.equal(aux_idx.long(), ref_aux_idx)
    close(pre, p.gather(1, ref_idx), 1e-5, 1e-5, "pre")
    close(aux_pre, p.gather(1, ref_aux_idx), 1e-5, 1e-5, "aux pre")


@pytest.mark.parametrize("chunk", SCAN_CHUNKS)
def test_scan_ties_lower_index_wins_across_chunks(chunk):
    n, k = 150, 8
    x = torch.randn(5, 16).abs().bfloat16()
    W_enc = torch.ones(n, 16, dtype=torch.bfloat16)
    W_enc[100:] *= 0.5
    _, idx, _, _ = scan.topk_scan(x, W_enc, torch.zeros(n), k, chunk=chunk)
    assert idx.tolist() == [list(range(k))] * 5


@pytest.mark.parametrize("k", [1, 33])
def test_scan_is_what_ops_run_when_chunked(monkeypatch, k):
    """With options.scan_chunk set, ops on 16-bit x go through topk_scan: the whole TopK SAE against
    reference.py."""
    monkeypatch.setattr(dispatch.lookup_backend("triton"), "options", EncoderOptions(scan_chunk=16))
    calls = []
    original = scan.topk_scan
    monkeypatch.setattr(scan, "topk_scan", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    tensors = make_sae_tensors(9, 11, 40, torch.bfloat16, seed=5)
    dead = torch.arange(40) % 4 == 0
    fn = lambda *t: ops.topk_sae(*t, k, dead, 3)  # noqa: E731
    with sae_fast.use_backend("triton"):
        out = fn(*tensors)
    assert calls
    ref, t64 = ref_grads(fn, tensors)
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.aux_indices, ref.aux_indices)
    close(out.x_hat, ref.x_hat, 3e-1, 3e-2, "x_hat")
    loss = lambda v, i, xh, av, ai: (xh.float() ** 2).sum() + (v.float() ** 2).sum() + av.float().sum()  # noqa: E731
    grads_match(loss, out, ref, tensors, t64, 3e-2, 3e-2)


@pytest.mark.parametrize("chunk", SCAN_CHUNKS)
def test_threshold_scan_lists_every_entry_in_latent_order(chunk):
    """threshold_select as GEMM + scan: each row's list grows chunk by chunk in ascending latent order; a
    first capacity too small is rerun exactly."""
    B, d, n = 13, 20, 130
    x, W_enc, b_enc, _, b_dec = make_sae_tensors(B, d, n, requires_grad=False, seed=6)
    x = x.bfloat16()
    c = fold_bias(W_enc, b_enc - 0.3, b_dec)
    cut = torch.full((n,), 0.1)
    pre, idx, need = scan.threshold_scan(x, W_enc, c, cut, capacity=2, chunk=chunk)
    p = x.double() @ W_enc.bfloat16().double().T + c.double()
    hit = p > 0.1
    assert need == int(hit.sum(1).max()) > 2  # the first pass overflowed and was rerun
    for b in range(B):
        want = hit[b].nonzero().squeeze(1)
        got = idx[b, : len(want)].long()
        assert torch.equal(got, want) and torch.isinf(pre[b, len(want):]).all()
        close(pre[b, : len(want)], p[b, want], 1e-2, 1e-2, f"row {b}")


@pytest.mark.parametrize("act", ["relu", "threshold", "jumprelu"])
def test_threshold_scan_is_what_ops_run_when_chunked(monkeypatch, act):
    monkeypatch.setattr(dispatch.lookup_backend("triton"), "options", EncoderOptions(scan_chunk=16))
    calls = []
    original = scan.threshold_scan
    monkeypatch.setattr(scan, "threshold_scan", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    tensors = make_sae_tensors(9, 11, 40, torch.bfloat16, seed=5)
    with sae_fast.use_backend("triton"):
        out = encode_decode(act, 3, *tensors, torch.full((40,), 0.2))
    with sae_fast.use_backend("reference"):
        ref = encode_decode(act, 3, *[t.detach().double() for t in tensors], torch.full((40,), 0.2).double())
    assert calls
    p = R.pre_activations(*[t.detach().double() for t in (tensors[0], tensors[1], tensors[2], tensors[4])])
    cut = {"relu": 0.0, "threshold": 0.1, "jumprelu": 0.2}[act]
    far = (p - cut).abs() > 2e-2
    dense, dense_ref = R.sparse_to_dense(out[0], out[1], 40), R.sparse_to_dense(ref[0], ref[1], 40)
    close(dense * far, dense_ref * far, 3e-2, 3e-2, "values")


def test_k_above_fused_limit_falls_back_to_torch():
    n, k = 300, topk.MAX_K + 1
    x, W_enc, b_enc, W_dec, b_dec = make_sae_tensors(3, 4, n, requires_grad=False)
    with sae_fast.use_backend("triton"):
        v, i = ops.topk_encode(x, W_enc, b_enc, b_dec, k)
    with sae_fast.use_backend("reference"):
        rv, ri = ops.topk_encode(x, W_enc, b_enc, b_dec, k)
    assert torch.equal(i, ri)
    torch.testing.assert_close(v, rv)


def test_large_auxk_comes_from_a_gemm_over_dead_rows():
    n, k, k_aux = 120, 3, topk.MAX_K_AUX + 7
    x, W_enc, b_enc, W_dec, b_dec = make_sae_tensors(6, 5, n, requires_grad=False, seed=8)
    dead = torch.arange(n) % 3 != 0  # 80 dead latents
    with sae_fast.use_backend("triton"):
        out = ops.topk_sae(x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux)
    with sae_fast.use_backend("reference"):
        ref = ops.topk_sae(x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux)
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.aux_indices, ref.aux_indices)
    torch.testing.assert_close(out.aux_values, ref.aux_values)


def test_threshold_capacity_overflow_reruns_exactly():
    B, d, n = 9, 8, 100
    x, W_enc, b_enc, _, b_dec = make_sae_tensors(B, d, n, requires_grad=False, seed=5)
    c = fold_bias(W_enc, b_enc, b_dec)
    cutoff = torch.full((n,), 0.2)
    cfg = EncoderConfig(16, 32, 16, 4, 1, 2, 32)
    small = thr.threshold_select(x, W_enc, c, cutoff, capacity=1, config=cfg)
    big = thr.threshold_select(x, W_enc, c, cutoff, capacity=128, config=cfg)
    assert small[2] > 1 and small[2] == big[2]  # the overflow was seen and the exact need reported
    assert torch.equal(small[0], big[0]) and torch.equal(small[1], big[1])
    p = R.pre_activations(x, W_enc, b_enc, b_dec)
    rows, cols = (p > 0.2).nonzero(as_tuple=True)
    listed = torch.isfinite(big[0])
    assert big[0].shape == (B, int((p > 0.2).sum(1).max()))
    assert torch.equal(listed.sum(1), (p > 0.2).sum(1))
    assert torch.equal(big[1][listed].long(), cols)  # row-major: ascending latents within each row
    torch.testing.assert_close(big[0][listed], p[rows, cols])


def test_threshold_with_no_entries_gives_one_padded_column():
    x, W_enc, b_enc, _, b_dec = make_sae_tensors(4, 5, 20, requires_grad=False)
    c = fold_bias(W_enc, b_enc, b_dec)
    pre, idx, need = thr.threshold_select(x, W_enc, c, torch.full((20,), 1e9))
    assert pre.shape == (4, 1) and torch.isinf(pre).all() and (idx == 0).all() and need == 0


# ----------------------------------------------------------------------------- decoder and backward
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_decoder_kernels_match_torch_on_strided_weights(dtype, atol, rtol, index_dtype):
    B, K, n, d = 11, 5, 40, 37
    g = torch.Generator().manual_seed(6)
    W = torch.randn(d, n, generator=g).to(dtype).T  # column-major view: strides (1, n)
    values = torch.randn(B, K, generator=g).to(dtype)
    idx = torch.randint(0, n, (B, K), generator=g).to(index_dtype)
    bias = torch.randn(d, generator=g).to(dtype)
    grad = torch.randn(B, d, generator=g).to(dtype)
    base = SparseBackend()
    for b in (bias, None):
        close(dec.sparse_decode(values, idx, W, b), base.sparse_decode(values, idx, W, b), atol, rtol, "decode")
    close(dec.gather_dot(grad, idx, W), base.gather_dot(grad, idx, W), atol * 10, rtol, "gather_dot")


@pytest.mark.parametrize("cfg", [lb.LatentBackwardConfig(4, 16, 4), lb.LatentBackwardConfig(16, 8, 4)])
def test_latent_backward_writes_zero_rows_and_is_deterministic(monkeypatch, cfg):
    B, K, n, d = 12, 4, 50, 19
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, 20, (B, K), generator=g, dtype=torch.int32)  # latents 20.. never appear
    idx[0] = 3  # one hot latent, repeated within a row
    dp, v = torch.randn(B, K, generator=g), torch.randn(B, K, generator=g)
    xc, grad = torch.randn(B, d, generator=g), torch.randn(B, d, generator=g)
    empty = torch.empty
    # Output memory starts as NaN: a row the kernel skipped would show.
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(float("nan"))
                        if kw.get("dtype", torch.float32).is_floating_point else empty(*a, **kw))
    first = lb.latent_backward(idx, n, dp, xc, v, grad, config=cfg)
    monkeypatch.undo()
    second = lb.latent_backward(idx, n, dp, xc, v, grad)
    expected = SparseBackend().latent_backward(idx, n, dp, xc, v, grad)
    for a, b, e in zip(first, second, expected):
        assert torch.isfinite(a).all()
        assert (a[20:] == 0).all()
        close(a, e, 1e-5, 1e-5, "latent_backward")
        close(b, e, 1e-5, 1e-5, "latent_backward (default config)")
    again = lb.latent_backward(idx, n, dp, xc, v, grad)
    assert all(torch.equal(a, b) for a, b in zip(second, again))  # bitwise, run to run
    only_dec = lb.latent_backward(idx, n, v=v, g=grad)
    assert only_dec[0] is None and only_dec[1] is None and torch.equal(only_dec[2], second[2])


def test_latent_backward_skips_zero_padding():
    # A padded code: most slots point at latent 0 with zero coefficients (they must add nothing, and
    # must not be queued on latent 0's program).
    B, K, n, d = 6, 8, 30, 7
    g = torch.Generator().manual_seed(9)
    idx = torch.zeros(B, K, dtype=torch.int32)
    idx[:, :2] = torch.randint(0, n, (B, 2), generator=g, dtype=torch.int32)
    dp = torch.zeros(B, K)
    dp[:, :2] = torch.randn(B, 2, generator=g)
    xc = torch.randn(B, d, generator=g)
    entries, offsets = lb.sort_by_latent(idx, n, dp != 0)
    assert int(offsets[-1]) == int((dp != 0).sum())  # only live pairs fall inside latent ranges
    expected = SparseBackend().latent_backward(idx, n, dp, xc)
    for cfg in (None, lb.LatentBackwardConfig(16, 8, 4)):
        got = lb.latent_backward(idx, n, dp, xc, config=cfg)
        for a, e in zip(got[:2], expected[:2]):
            close(a, e, 1e-5, 1e-5, "latent_backward with padding")


# ----------------------------------------------------------------------------- dispatch and fallbacks
def test_cpu_tensors_need_the_interpreter_and_are_never_the_default(monkeypatch):
    backend = dispatch.lookup_backend("triton")
    monkeypatch.delenv("SAE_FAST_BACKEND", raising=False)
    assert backend.supports(torch.device("cpu"))
    assert ops.get_backend("cpu").name != "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # (the kernels were built for the interpreter; only the check runs)
    assert not backend.supports(torch.device("cpu"))
    with pytest.raises(ValueError, match="cannot run on device 'cpu'"):
        with sae_fast.use_backend("triton"):
            ops.get_backend("cpu")


def test_encoder_ab_script_runs_on_the_interpreter(tmp_path, monkeypatch):
    """benchmarks/encoder_ab.py is for GPU time, which is scarce: it must not fail there on a typo."""
    import json
    import sys

    ab = load_script("encoder_ab")
    monkeypatch.setattr(ab, "DEVICE", "cpu")
    monkeypatch.setattr(ab, "WORKLOADS", {"w1": (12, 8, 64, 4), "w4": (12, 8, 64, 4)})
    monkeypatch.setattr(ab, "do_bench", lambda fn, **kw: (fn(), 1.0)[1])
    monkeypatch.setattr(sys, "argv", ["encoder_ab.py", "--workloads", "w1", "w4", "--chunks", "16", "40",
                                      "--out", str(tmp_path)])
    ab.main()
    (out,) = tmp_path.glob("cpu-*-master-scan-ab.json")
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"] if r["workload"] == "w1"}
    w4 = {r["row"]: r for r in json.loads(out.read_text())["rows"] if r["workload"] == "w4"}
    assert w4["threshold GEMM + scan, chunk 40"]["same_latents"] is True, w4
    for label in ("GEMM + scan, chunk 16", "GEMM + scan, chunk 40",
                  "fused, fp32 W_enc rounded in the tiles (master_in_kernel)"):
        assert rows[label]["ms"] == 1.0 and rows[label]["same_latents"] == 1.0, rows[label]
    sae = [r for r in rows.values() if r["row"].startswith("SAE")]
    assert len(sae) == 3 and all(r["ms"] == 1.0 for r in sae), sae
    assert "GEMM + scan, chunk 16" in out.with_suffix(".txt").read_text()
