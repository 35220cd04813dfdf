"""The cpu backend's kernels against reference.py, exactly.

Inputs are small integers (and biases on a 1/8 grid), so every pre-activation is exact in fp32 whatever
the summation order: scores, indices and gradients compare bitwise with the float64 reference, and ties
are frequent, which checks the tie rule (lower latent index wins)."""
import os
import subprocess
import sys

import pytest
import torch
from helpers import ref_topk
from hypothesis import given, settings
from hypothesis import strategies as st

from sae_fast import dispatch, ops
from sae_fast import reference as R

pytest.importorskip("sae_fast._C", reason="sae_fast._C not built (source checkout)")
from sae_fast.backends import cpu as cpu_mod  # noqa: E402  (must import whenever _C does)
from sae_fast.backends.base import SparseBackend  # noqa: E402
from sae_fast.backends.base import pad_rows as TORCH_PAD

CPU = dispatch.lookup_backend("cpu")
TORCH = SparseBackend()


def int_tensors(B, d, n, seed=0, span=3):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randint(-span, span + 1, s, generator=g).float()
    return r(B, d), r(n, d), r(n) / 8, r(n, d), r(d)  # x, W_enc, b_enc, W_dec, b_dec


def test_cpu_backend_is_the_default_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("SAE_FAST_BACKEND", raising=False)
    assert ops.get_backend("cpu") is CPU


def check_topk(B, d, n, k, k_aux=0, seed=0, span=3):
    x, W_enc, b_enc, _, b_dec = int_tensors(B, d, n, seed, span)
    dead = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1)) < 0.4
    k_aux = min(k_aux, int(dead.sum()))
    pre, idx, aux_pre, aux_idx = CPU.topk_select(x, W_enc, b_enc, b_dec, k, dead if k_aux else None, k_aux)
    p = R.pre_activations(x.double(), W_enc.double(), b_enc.double(), b_dec.double())
    want_pre, want_idx = ref_topk(p, k)
    assert idx.dtype == torch.int32 and pre.dtype == torch.float32 and pre.shape == (B, k)
    assert torch.equal(idx, want_idx)
    assert torch.equal(pre.double(), want_pre)
    if k_aux:
        want_aux_pre, want_aux_idx = ref_topk(p.masked_fill(~dead, float("-inf")), k_aux)
        assert torch.equal(aux_idx, want_aux_idx)
        assert torch.equal(aux_pre.double(), want_aux_pre)
    else:
        assert aux_pre is None and aux_idx is None


@pytest.mark.parametrize("B", [1, 7, 33, 1000])
@pytest.mark.parametrize("n,k", [(1, 1), (7, 1), (7, 7), (33, 5), (64, 64), (1000, 32), (1024, 1), (1024, 1024)])
def test_topk_select_exact(B, n, k):
    check_topk(B, 16, n, k, k_aux=min(4, n))


@pytest.mark.parametrize("d", [1, 7, 64, 385])
def test_topk_select_widths_and_ties(d):
    # span=1 makes most scores collide: only the tie rule decides the order
    check_topk(130, d, 2048, 40, k_aux=17, span=1)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 80), d=st.integers(1, 40), n=st.integers(1, 700), data=st.data())
def test_topk_select_fuzzed(B, d, n, data):
    k = data.draw(st.integers(1, n))
    k_aux = data.draw(st.integers(0, n))
    check_topk(B, d, n, k, k_aux, seed=B * 1000 + n, span=data.draw(st.sampled_from([1, 3])))


def test_topk_select_tiles_rows_and_latents(monkeypatch):
    # Several row and latent tiles, a partial last tile of each: the running state must carry across.
    monkeypatch.setattr(cpu_mod, "_TILE_ROWS", 16)
    monkeypatch.setattr(cpu_mod, "_TILE_COLS", 48)
    check_topk(45, 9, 300, 20, k_aux=30, span=1)
    check_topk(45, 9, 300, 300, k_aux=7)


def ref_lists(p, listed):
    rows, cols = listed.nonzero(as_tuple=True)  # row-major: rows ascending, latents ascending
    return TORCH_PAD(rows, cols, p[rows, cols], p.shape[0])


def check_threshold(backend, B, d, n, seed=0, span=3, shift=0.0):
    x, W_enc, b_enc, _, b_dec = int_tensors(B, d, n, seed, span)
    b_enc = b_enc + shift
    cutoff = torch.randint(-2, 6, (n,), generator=torch.Generator().manual_seed(seed)).float() / 2
    pre, idx = backend.threshold_select(x, W_enc, b_enc, b_dec, cutoff)
    p = R.pre_activations(x.double(), W_enc.double(), b_enc.double(), b_dec.double())
    want_pre, want_idx = ref_lists(p, p > cutoff.double())
    assert pre.dtype == torch.float32 and idx.dtype == torch.int32
    assert torch.equal(idx, want_idx)
    assert torch.equal(pre.double(), want_pre)


@pytest.mark.parametrize("B,d,n", [(1, 1, 1), (7, 5, 33), (33, 16, 1000), (1000, 8, 64), (64, 24, 1024)])
@pytest.mark.parametrize("capacity", [1, 16, 64, 4096])
def test_threshold_select_exact_with_overflow(B, d, n, capacity):
    backend = cpu_mod.CpuBackend()
    backend._list_capacity = capacity  # small capacities overflow: those rows are recomputed
    check_threshold(backend, B, d, n)
    check_threshold(backend, B, d, n, seed=1, shift=-20.0)  # no entry passes: (B, 1) of padding
    check_threshold(backend, B, d, n, seed=2, shift=20.0)  # every entry passes: dense rows
    assert backend._list_capacity >= 64  # follows the last call's need


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 60), d=st.integers(1, 30), n=st.integers(1, 500), cap=st.integers(1, 80),
       seed=st.integers(0, 100))
def test_threshold_select_fuzzed(B, d, n, cap, seed):
    backend = cpu_mod.CpuBackend()
    backend._list_capacity = cap
    check_threshold(backend, B, d, n, seed=seed, span=1 + seed % 3)


def check_batch_topk(B, d, n, k, seed=0, span=3, hot_row=None):
    x, W_enc, b_enc, _, b_dec = int_tensors(B, d, n, seed, span)
    if hot_row is not None:
        x[hot_row] *= 50  # one row holds most of the batch's winners: its candidates must grow
    pre, idx = CPU.batch_topk_select(x, W_enc, b_enc, b_dec, k)
    p = R.pre_activations(x.double(), W_enc.double(), b_enc.double(), b_dec.double())
    want_pre, want_idx = ref_lists(p, R.batch_topk_mask(p, k))
    assert torch.equal(idx, want_idx)
    assert torch.equal(pre.double(), want_pre)


@pytest.mark.parametrize("B,d,n,k", [(1, 1, 1, 1), (7, 5, 33, 1), (7, 5, 33, 33), (33, 16, 1000, 8),
                                     (64, 8, 1024, 32), (1000, 4, 64, 2)])
def test_batch_topk_select_exact(B, d, n, k):
    check_batch_topk(B, d, n, k)
    check_batch_topk(B, d, n, k, seed=1, span=1)  # mostly ties: lower row, then lower latent wins
    check_batch_topk(B, d, n, k, seed=2, hot_row=B // 2)


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 40), d=st.integers(1, 20), n=st.integers(1, 400), seed=st.integers(0, 100), data=st.data())
def test_batch_topk_select_fuzzed(B, d, n, seed, data):
    k = data.draw(st.integers(1, n))
    check_batch_topk(B, d, n, k, seed=seed, span=1 + seed % 3, hot_row=data.draw(st.sampled_from([None, 0, B - 1])))


# d = 515: two column spans (384 + 131) of the AVX-512 reduction, with a masked tail
@pytest.mark.parametrize("B,K,n,d", [(1, 1, 1, 1), (7, 3, 33, 5), (33, 7, 1000, 64), (64, 32, 4096, 130), (9, 40, 50, 515)])
def test_latent_backward_exact(B, K, n, d):
    g = torch.Generator().manual_seed(B + n)
    r = lambda *s: torch.randint(-3, 4, s, generator=g).float()
    idx = torch.randint(0, n, (B, K), generator=g, dtype=torch.int32)
    dp, xc, v, grad = r(B, K), r(B, d), r(B, K), r(B, d)
    got = CPU.latent_backward(idx, n, dp, xc, v, grad)
    want = SparseBackend().latent_backward(idx, n, dp.double(), xc.double(), v.double(), grad.double())
    for name, a, b in zip(("dW_enc", "db_enc", "dW_dec"), got, want):
        assert a.dtype == torch.float32
        assert torch.equal(a.double(), b), name
    # Latents nobody selected get exact zero rows, written by the same pass.
    unused = torch.ones(n, dtype=torch.bool)
    unused[idx.long().flatten()] = False
    assert (got[0][unused] == 0).all() and (got[2][unused] == 0).all() and (got[1][unused] == 0).all()
    only_dec = CPU.latent_backward(idx, n, v=v, g=grad)
    assert only_dec[0] is None and only_dec[1] is None and torch.equal(only_dec[2], got[2])


@pytest.mark.parametrize("B,K,n,d", [(1, 1, 1, 1), (5, 3, 9, 17), (33, 7, 100, 384), (9, 40, 50, 515)])
@pytest.mark.parametrize("bias", [False, True])
def test_sparse_decode_and_gather_dot_exact(B, K, n, d, bias):
    # fp32 decode rows live in AVX-512 registers up to 384 columns at a time (masked tails); zero values skipped.
    g = torch.Generator().manual_seed(B * d)
    r = lambda *s: torch.randint(-3, 4, s, generator=g).float()
    v, W, grad, b = r(B, K), r(n, d), r(B, d), r(d) if bias else None
    idx = torch.randint(0, n, (B, K), generator=g, dtype=torch.int32)
    want = (v.double()[..., None] * W.double()[idx.long()]).sum(1) + (0 if b is None else b.double())
    assert torch.equal(CPU.sparse_decode(v, idx, W, b).double(), want)
    assert torch.equal(CPU.gather_dot(grad, idx, W).double(), (grad.double()[:, None] * W.double()[idx.long()]).sum(-1))


@pytest.mark.parametrize("B,K,n,d", [(1, 1, 1, 1), (33, 7, 1000, 100), (64, 32, 2048, 130), (9, 40, 50, 515)])
def test_bf16_storage_computes_in_fp32_and_rounds_once(B, K, n, d):
    g = torch.Generator().manual_seed(n)
    bf = lambda *s: torch.randn(*s, generator=g).bfloat16()
    x, W_enc, b_enc, W_dec, b_dec = bf(B, d), bf(n, d), bf(n), bf(n, d), bf(d)
    v, dp, grad = bf(B, K), bf(B, K), bf(B, d)
    idx = torch.randint(0, n, (B, K), generator=g, dtype=torch.int32)
    f = lambda t: t.float()
    out = CPU.sparse_decode(v, idx, W_dec, b_dec)
    assert out.dtype == torch.bfloat16 and torch.equal(out, CPU.sparse_decode(f(v), idx, f(W_dec), f(b_dec)).bfloat16())
    out = CPU.gather_dot(grad, idx, W_dec)
    assert out.dtype == torch.bfloat16 and torch.equal(out, CPU.gather_dot(f(grad), idx, f(W_dec)).bfloat16())
    xc = x - b_dec
    got = CPU.latent_backward(idx, n, dp, xc, v, grad)
    want = CPU.latent_backward(idx, n, f(dp), f(xc), f(v), f(grad))
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b.bfloat16())
    k = min(K, n)
    got = CPU.topk_select(x, W_enc, b_enc, b_dec, k, torch.arange(n) % 2 == 0, min(3, (n + 1) // 2))
    want = CPU.topk_select(f(x), f(W_enc), f(b_enc), f(b_dec), k, torch.arange(n) % 2 == 0, min(3, (n + 1) // 2))
    assert got[0].dtype == torch.bfloat16
    for a, b in zip(got, want):
        assert torch.equal(a, b.bfloat16() if b.is_floating_point() else b)


# ----------------------------------------------------------------------------- determinism
_DETERMINISM_SCRIPT = r"""
import sys, torch, sae_fast
from sae_fast import ops
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
B, d, n, k = 300, 48, 3000, 16
x = torch.randn(B, d, generator=g)
W_enc = (torch.randn(n, d, generator=g) / d ** 0.5).requires_grad_()
b_enc = (torch.randn(n, generator=g) * 0.1).requires_grad_()
W_dec = (torch.randn(n, d, generator=g) / d ** 0.5).requires_grad_()
b_dec = (torch.randn(d, generator=g) * 0.1).requires_grad_()
dead = torch.arange(n) % 5 == 0
out = {}
for run in range(2):
    with sae_fast.use_backend("cpu"):
        r = ops.topk_sae(x, W_enc, b_enc, W_dec, b_dec, k, dead, 24)
    loss = (r.x_hat - x).pow(2).sum() + r.aux_values.pow(2).sum() + r.values.sum()
    grads = torch.autograd.grad(loss, [W_enc, b_enc, W_dec, b_dec])
    out[run] = [r.values, r.indices, r.x_hat, r.aux_values, r.aux_indices, *grads]
    for encode in (ops.relu_encode, ops.batch_topk_encode):  # threshold lists, BatchTopK
        with sae_fast.use_backend("cpu"):
            args = (x, W_enc, b_enc - 0.3, b_dec) + ((k,) if encode is ops.batch_topk_encode else ())
            v, i = encode(*args)
            x_hat = ops.sparse_decode(v, i, W_dec, b_dec)
        out[run] += [v, i, *torch.autograd.grad((x_hat - x).pow(2).sum(), [W_enc, b_enc, W_dec, b_dec])]
torch.save(out, sys.argv[2])
"""


def test_bitwise_deterministic_across_runs_and_threads(tmp_path):
    script = tmp_path / "det.py"
    script.write_text(_DETERMINISM_SCRIPT)
    results = []
    for threads in (1, 2):
        path = tmp_path / f"out{threads}.pt"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        subprocess.run([sys.executable, str(script), str(threads), str(path)], env=env, check=True)
        results.append(torch.load(path))
    grads = ["dW_enc", "db_enc", "dW_dec", "db_dec"]
    names = ["values", "indices", "x_hat", "aux_values", "aux_indices", *grads]
    names += [f"{enc} {what}" for enc in ("relu", "batchtopk") for what in ["values", "indices", *grads]]
    assert len(results[0][0]) == len(names)
    for res in results:
        for name, a, b in zip(names, res[0], res[1]):
            assert torch.equal(a, b), f"{name} differs between two runs"
    for name, a, b in zip(names, results[0][0], results[1][0]):
        assert torch.equal(a, b), f"{name} differs between OMP_NUM_THREADS=1 and 2"
