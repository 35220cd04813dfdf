"""The triton backend's kernels against reference.py, run on CPU tensors by Triton's interpreter.

The interpreter must be on before triton is imported (conftest.py sets TRITON_INTERPRET=1 when there is
no GPU). Sizes are small: the interpreter runs every program in numpy. The same kernels are compiled for
sm_80/sm_90 in test_triton_static.py and run on a GPU at realistic sizes in test_triton_gpu.py.
"""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU runs of the Triton kernels need TRITON_INTERPRET=1 set before triton is imported",
                allow_module_level=True)

import sae_fast  # noqa: E402
from sae_fast import dispatch, ops, reference as R  # noqa: E402
from sae_fast.backends.base import SparseBackend  # noqa: E402
from sae_fast.kernels import decoder as dec, encoder as enc, latent_backward as lb  # noqa: E402

from conftest import DTYPES, encode_decode, make_sae_tensors  # noqa: E402
from test_ops import (MASTER_ACTS, _close, _grads_match, _ref_grads, check_encode_decode,  # noqa: E402
                      check_master_weights, check_topk_against_reference)

SHAPES = [(1, 1, 1, 1), (7, 5, 33, 1), (33, 17, 70, 7), (9, 33, 300, 32), (5, 3, 6, 6)]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("B,d,n,k", SHAPES)
def test_topk_sae_matches_reference(dtype, atol, rtol, B, d, n, k):
    """Fused encode (with AuxK), decode, and every gradient of the one-node TopK SAE."""
    tensors = make_sae_tensors(B, d, n, dtype)
    dead = torch.arange(n) % 3 == 0
    k_aux = min(3, n)

    def fn(x, W_enc, b_enc, W_dec, b_dec):
        return ops.topk_sae(x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux)

    with sae_fast.use_backend("triton"):
        out = fn(*tensors)
    ref, t64 = _ref_grads(fn, tensors)
    if dtype == torch.float32:
        assert torch.equal(out.indices, ref.indices)
        assert torch.equal(out.aux_indices, ref.aux_indices)
    _close(R.sparse_to_dense(out.values, out.indices, n), R.sparse_to_dense(ref.values, ref.indices, n), atol, rtol,
           "values")
    _close(R.sparse_to_dense(out.aux_values, out.aux_indices, n),
           R.sparse_to_dense(ref.aux_values, ref.aux_indices, n), atol, rtol, "aux values")
    _close(out.x_hat, ref.x_hat, atol * 10, rtol, "x_hat")
    assert out.indices.dtype == torch.int32 and out.values.dtype == dtype and out.x_hat.dtype == dtype

    loss = lambda v, i, xh, av, ai: (xh.float() ** 2).sum() + (v.float() ** 2).sum() + av.float().sum()
    _grads_match(loss, out, ref, tensors, t64, atol, rtol)


@pytest.mark.parametrize("in_kernel", [False, True])
@pytest.mark.parametrize("act", MASTER_ACTS)
@pytest.mark.parametrize("n", [70, 8])  # 8: the gathers read a bf16 copy of W_dec (ops._gathered)
def test_master_weights_beside_bf16_activations(monkeypatch, act, in_kernel, n):
    """fp32 weights with bf16 x: the encoder tiles get a bf16 copy, or (MASTER_IN_KERNEL) the fp32 weights
    themselves and round them in registers; decoder and backward kernels read fp32 and write fp32 gradients."""
    monkeypatch.setattr(enc, "MASTER_IN_KERNEL", in_kernel)
    seen = []
    for name in ("topk_select", "threshold_select"):
        original = getattr(enc, name)
        spy = (lambda f: lambda x, W, *a, **kw: seen.append(W.dtype) or f(x, W, *a, **kw))(original)
        monkeypatch.setattr(enc, name, spy)
    check_master_weights("triton", act, n=n)
    if act != "batchtopk":  # BatchTopK selects through the torch backend's candidates
        assert seen and set(seen) == {torch.float32 if in_kernel else torch.bfloat16}


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("act", ["topk", "batchtopk", "relu", "threshold", "jumprelu"])
def test_encode_decode_matches_reference(dtype, atol, rtol, act):
    check_encode_decode("triton", act, dtype, atol, rtol, 13, 9, 70, 3)


# ----------------------------------------------------------------------------- encoder kernel paths
def _ref_topk(x, W_enc, b_enc, b_dec, k, dead=None):
    pre = R.pre_activations(*(t.double() for t in (x, W_enc, b_enc, b_dec)))
    if dead is not None:
        pre = pre.masked_fill(~dead, float("-inf"))
    idx = R.topk_indices(pre, k)
    return pre.gather(1, idx), idx.to(torch.int32)


CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, splits, SMALL)
    enc.EncoderConfig(16, 32, 16, 4, 1, 1, 0),    # every tile with a winner through tl.topk
    enc.EncoderConfig(16, 32, 16, 4, 1, 3, 16),   # winners one at a time, 3 splits merged
    enc.EncoderConfig(32, 64, 32, 4, 1, 2, 2),    # both paths
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["topk-path", "insert-path-3-splits", "mixed"])
def test_topk_kernel_paths_agree_with_reference(cfg):
    B, d, n, k, k_aux = 17, 20, 130, 8, 5
    x, W_enc, b_enc, _, b_dec = make_sae_tensors(B, d, n, requires_grad=False, seed=3)
    dead = torch.rand(n, generator=torch.Generator().manual_seed(4)) < 0.3
    c = enc.fold_bias(W_enc, b_enc, b_dec)
    pre, idx, aux_pre, aux_idx = enc.topk_select(x, W_enc, c, k, dead, k_aux, config=cfg)
    ref_pre, ref_idx = _ref_topk(x, W_enc, b_enc, b_dec, k)
    ref_aux_pre, ref_aux_idx = _ref_topk(x, W_enc, b_enc, b_dec, k_aux, dead)
    assert torch.equal(idx, ref_idx) and torch.equal(aux_idx, ref_aux_idx)
    _close(pre, ref_pre, 1e-5, 1e-5, "pre")
    _close(aux_pre, ref_aux_pre, 1e-5, 1e-5, "aux pre")


@pytest.mark.parametrize("cfg", CONFIGS, ids=["topk-path", "insert-path-3-splits", "mixed"])
def test_ties_lower_index_wins_across_tiles_and_splits(cfg):
    # Identical encoder rows give identical scores: every row must keep the lowest latent ids. Small integer
    # activations make the scores exact in any summation order (a BLAS may sum tile columns differently).
    n, k = 150, 8
    x = torch.randint(1, 4, (5, 16), generator=torch.Generator().manual_seed(0)).float()
    W_enc = torch.ones(n, 16)
    W_enc[100:] *= 0.5  # a lower score for the tail: ties only decide inside the head
    c = torch.zeros(n)
    _, idx, _, _ = enc.topk_select(x, W_enc, c, k, config=cfg)
    assert idx.tolist() == [list(range(k))] * 5


# ----------------------------------------------------------------------------- GEMM + scan (topk_scan)
SCAN_CHUNKS = [7, 32, 50, 1000]  # narrower than a tile, one tile, not a multiple of tiles, all of n at once


@pytest.mark.parametrize("chunk", SCAN_CHUNKS)
@pytest.mark.parametrize("cfg", [None, enc.EncoderConfig(16, 32, 16, 4, 1, 3, 2)], ids=["default", "3-splits-mixed"])
def test_scan_over_score_chunks_agrees_with_reference(chunk, cfg):
    """topk_scan: chunks of fp32 scores from a GEMM, merged into running lists that persist across chunks."""
    B, d, n, k, k_aux = 17, 20, 130, 8, 5
    x, W_enc, b_enc, _, b_dec = make_sae_tensors(B, d, n, requires_grad=False, seed=3)
    x = x.bfloat16()
    dead = torch.rand(n, generator=torch.Generator().manual_seed(4)) < 0.3
    c = enc.fold_bias(W_enc, b_enc, b_dec)
    W16 = W_enc.bfloat16()  # what the chunks multiply (a master W_enc is rounded per chunk)
    pre, idx, aux_pre, aux_idx = enc.topk_scan(x, W_enc, c, k, dead, k_aux, torch.float32, chunk, cfg)
    p = x.double() @ W16.double().T + c.double()
    ref_idx = R.topk_indices(p, k)
    ref_aux_idx = R.topk_indices(p.masked_fill(~dead, float("-inf")), k_aux)
    assert torch.equal(idx.long(), ref_idx) and torch.equal(aux_idx.long(), ref_aux_idx)
    _close(pre, p.gather(1, ref_idx), 1e-5, 1e-5, "pre")
    _close(aux_pre, p.gather(1, ref_aux_idx), 1e-5, 1e-5, "aux pre")


@pytest.mark.parametrize("chunk", SCAN_CHUNKS)
def test_scan_ties_lower_index_wins_across_chunks(chunk):
    n, k = 150, 8
    x = torch.randn(5, 16).abs().bfloat16()
    W_enc = torch.ones(n, 16, dtype=torch.bfloat16)
    W_enc[100:] *= 0.5
    _, idx, _, _ = enc.topk_scan(x, W_enc, torch.zeros(n), k, chunk=chunk)
    assert idx.tolist() == [list(range(k))] * 5


@pytest.mark.parametrize("k", [1, 33])
def test_scan_is_what_topk_select_runs_when_chunked(monkeypatch, k):
    """With SCAN_CHUNK set, ops on 16-bit x go through topk_scan: the whole TopK SAE against reference.py."""
    monkeypatch.setattr(enc, "SCAN_CHUNK", 16)
    calls = []
    original = enc.topk_scan
    monkeypatch.setattr(enc, "topk_scan", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    tensors = make_sae_tensors(9, 11, 40, torch.bfloat16, seed=5)
    dead = torch.arange(40) % 4 == 0
    fn = lambda *t: ops.topk_sae(*t, k, dead, 3)  # noqa: E731
    with sae_fast.use_backend("triton"):
        out = fn(*tensors)
    assert calls
    ref, t64 = _ref_grads(fn, tensors)
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.aux_indices, ref.aux_indices)
    _close(out.x_hat, ref.x_hat, 3e-1, 3e-2, "x_hat")
    loss = lambda v, i, xh, av, ai: (xh.float() ** 2).sum() + (v.float() ** 2).sum() + av.float().sum()  # noqa: E731
    _grads_match(loss, out, ref, tensors, t64, 3e-2, 3e-2)


@pytest.mark.parametrize("chunk", SCAN_CHUNKS)
def test_threshold_scan_lists_every_entry_in_latent_order(chunk):
    """threshold_select as GEMM + scan: each row's list grows chunk by chunk in ascending latent order; a
    first capacity too small is rerun exactly."""
    B, d, n = 13, 20, 130
    x, W_enc, b_enc, _, b_dec = make_sae_tensors(B, d, n, requires_grad=False, seed=6)
    x = x.bfloat16()
    c = enc.fold_bias(W_enc, b_enc - 0.3, b_dec)
    cut = torch.full((n,), 0.1)
    pre, idx, need = enc.threshold_select(x, W_enc, c, cut, capacity=2, chunk=chunk)
    p = x.double() @ W_enc.bfloat16().double().T + c.double()
    hit = p > 0.1
    assert need == int(hit.sum(1).max()) > 2  # the first pass overflowed and was rerun
    for b in range(B):
        want = hit[b].nonzero().squeeze(1)
        got = idx[b, : len(want)].long()
        assert torch.equal(got, want) and torch.isinf(pre[b, len(want):]).all()
        _close(pre[b, : len(want)], p[b, want], 1e-2, 1e-2, f"row {b}")


@pytest.mark.parametrize("act", ["relu", "threshold", "jumprelu"])
def test_threshold_scan_is_what_ops_run_when_chunked(monkeypatch, act):
    monkeypatch.setattr(enc, "SCAN_CHUNK", 16)
    calls = []
    original = enc._mm_fp32
    monkeypatch.setattr(enc, "_mm_fp32", lambda *a: calls.append(1) or original(*a))
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
    _close(dense * far, dense_ref * far, 3e-2, 3e-2, "values")


def test_k_above_fused_limit_falls_back_to_torch():
    n, k = 300, enc.MAX_K + 1
    x, W_enc, b_enc, W_dec, b_dec = make_sae_tensors(3, 4, n, requires_grad=False)
    with sae_fast.use_backend("triton"):
        v, i = ops.topk_encode(x, W_enc, b_enc, b_dec, k)
    with sae_fast.use_backend("reference"):
        rv, ri = ops.topk_encode(x, W_enc, b_enc, b_dec, k)
    assert torch.equal(i, ri)
    torch.testing.assert_close(v, rv)


def test_large_auxk_comes_from_a_gemm_over_dead_rows():
    n, k, k_aux = 120, 3, enc.MAX_K_AUX + 7
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
    c = enc.fold_bias(W_enc, b_enc, b_dec)
    cutoff = torch.full((n,), 0.2)
    cfg = enc.EncoderConfig(16, 32, 16, 4, 1, 2, 32)
    small = enc.threshold_select(x, W_enc, c, cutoff, capacity=1, config=cfg)
    big = enc.threshold_select(x, W_enc, c, cutoff, capacity=128, config=cfg)
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
    c = enc.fold_bias(W_enc, b_enc, b_dec)
    pre, idx, need = enc.threshold_select(x, W_enc, c, torch.full((20,), 1e9))
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
        _close(dec.sparse_decode(values, idx, W, b), base.sparse_decode(values, idx, W, b), atol, rtol, "decode")
    _close(dec.gather_dot(grad, idx, W), base.gather_dot(grad, idx, W), atol * 10, rtol, "gather_dot")


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
        _close(a, e, 1e-5, 1e-5, "latent_backward")
        _close(b, e, 1e-5, 1e-5, "latent_backward (default config)")
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
            _close(a, e, 1e-5, 1e-5, "latent_backward with padding")


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


def test_float64_falls_back_to_torch_with_exact_gradients():
    x, W_enc, b_enc, W_dec, b_dec = [t.double().detach().requires_grad_() for t in make_sae_tensors(4, 3, 7)]
    with sae_fast.use_backend("triton"):
        f = lambda x, We, be, Wd, bd: ops.topk_sae(x, We, be, Wd, bd, 2).x_hat
        assert torch.autograd.gradcheck(f, (x, W_enc, b_enc, W_dec, b_dec))


@settings(max_examples=6, deadline=None)
@given(B=st.integers(1, 20), d=st.integers(1, 20), n=st.integers(1, 90), data=st.data())
def test_topk_fuzzed_shapes(B, d, n, data):
    check_topk_against_reference("triton", B, d, n, data.draw(st.integers(1, n)))


def test_encoder_ab_script_runs_on_the_interpreter(tmp_path, monkeypatch):
    """benchmarks/encoder_ab.py is for GPU time, which is scarce: it must not fail there on a typo."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "encoder_ab.py"
    spec = importlib.util.spec_from_file_location("encoder_ab", path)
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
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
                  "fused, fp32 W_enc rounded in the tiles (MASTER_IN_KERNEL)"):
        assert rows[label]["ms"] == 1.0 and rows[label]["same_latents"] == 1.0, rows[label]
    sae = [r for r in rows.values() if r["row"].startswith("SAE")]
    assert len(sae) == 3 and all(r["ms"] == 1.0 for r in sae), sae
    assert "GEMM + scan, chunk 16" in out.with_suffix(".txt").read_text()
