"""The Matryoshka primitives of every backend (backends/base.py: matryoshka_decode, matryoshka_gather_dot,
matryoshka_latent_backward) against reference.matryoshka_decode and its autograd gradients, and the
one-pass structure: one decode for all prefixes, one latent-sorted backward for all prefix losses."""
import pytest
import torch
from helpers import CPU_BACKENDS, INTERPRETED_TRITON

import sae_fast
from sae_fast import SparseAutoencoder, dispatch
from sae_fast import reference as R
from sae_fast.ops import suffix_sums

BACKENDS = [*CPU_BACKENDS, *INTERPRETED_TRITON]
WIDTHS = [3, 10, 11, 40, 41]  # groups of 3, 7, 1, 29, 1; [10, 11) and [40, 41) get no entry below


def _code(B=9, K=7, n=41, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n, generator=g)[:K] for _ in range(B)]).to(torch.int32)
    idx = torch.where((idx == 10) | (idx == 40), idx - 5, idx)  # two groups with no entry (duplicates are fine)
    values = torch.relu(torch.randn(B, K, generator=g))
    values[:, -1] = 0.0  # inactive entries, as list padding has
    W, bias = torch.randn(n, d, generator=g), torch.randn(d, generator=g)
    gP = torch.randn(len(WIDTHS), B, d, generator=g)  # dL/dx_hat_p of every prefix
    return values, idx, W, bias, gP


def _reference(values, idx, W, bias, gP):
    """float64 reference.matryoshka_decode and the gradients of sum_p <gP_p, x_hat_p>."""
    v, Wd, b = (t.double().requires_grad_() for t in (values, W, bias))
    out = R.matryoshka_decode(v, idx, Wd, b, WIDTHS)
    dv, dW, db = torch.autograd.grad((out * gP.double()).sum(), (v, Wd, b))
    return out.detach(), dv, dW, db


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_primitives_match_reference(backend, dtype, tol):
    values, idx, W, bias, gP = _code()
    be = dispatch.lookup_backend(backend)
    Wt = W.to(dtype)
    want, dv, dW, db = _reference(values, idx, Wt.float(), bias, gP)
    got = be.matryoshka_decode(values, idx, Wt, bias, WIDTHS)
    assert got.shape == (len(WIDTHS), 9, 6) and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=tol * 10, rtol=tol)
    assert torch.equal(got[1], got[2]) and torch.equal(got[3], got[4])  # the empty groups add nothing
    nobias = be.matryoshka_decode(values, idx, Wt, None, WIDTHS)
    torch.testing.assert_close(nobias.double(), want - bias.double(), atol=tol * 10, rtol=tol)

    S = suffix_sums(gP)
    got_dv = be.matryoshka_gather_dot(S, idx, Wt, WIDTHS)
    torch.testing.assert_close(got_dv.double(), dv, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(S[0].sum(0).double(), db, atol=1e-5, rtol=1e-5)

    # One pass: the encoder half (plain latent_backward math) beside the decoder half with per-group rows.
    g = torch.Generator().manual_seed(5)
    dp, xc = torch.randn(values.shape, generator=g), torch.randn(9, 6, generator=g)
    dW_enc, db_enc, dW_dec = be.matryoshka_latent_backward(idx, 41, dp, xc, values, S, WIDTHS, dtype)
    rows = torch.arange(9).repeat_interleave(7)
    want_enc = torch.zeros(41, 6, dtype=torch.float64).index_add_(
        0, idx.reshape(-1).long(), dp.reshape(-1, 1).double() * xc.double()[rows])
    want_b = torch.zeros(41, dtype=torch.float64).index_add_(0, idx.reshape(-1).long(), dp.reshape(-1).double())
    for a, b in ((dW_enc, want_enc), (db_enc, want_b), (dW_dec, dW)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, atol=tol * 10, rtol=tol)
    only_dec = be.matryoshka_latent_backward(idx, 41, None, None, values, S, WIDTHS, dtype)
    assert only_dec[0] is None and only_dec[1] is None
    torch.testing.assert_close(only_dec[2], dW_dec)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_group_is_the_plain_decoder(backend):
    values, idx, W, bias, gP = _code()
    be = dispatch.lookup_backend(backend)
    n = W.shape[0]
    torch.testing.assert_close(be.matryoshka_decode(values, idx, W, bias, [n])[0],
                               be.sparse_decode(values, idx, W, bias))
    torch.testing.assert_close(be.matryoshka_gather_dot(gP[:1], idx, W, [n]), be.gather_dot(gP[0], idx, W))
    torch.testing.assert_close(be.matryoshka_latent_backward(idx, n, None, None, values, gP[:1], [n])[2],
                               be.latent_backward(idx, n, v=values, g=gP[0])[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_index_is_refused(backend):
    values, idx, W, bias, gP = _code()
    idx[0, 0] = 41
    be = dispatch.lookup_backend(backend)
    with pytest.raises((ValueError, IndexError, RuntimeError)):
        be.matryoshka_decode(values, idx, W, bias, WIDTHS)
    with pytest.raises((ValueError, IndexError, RuntimeError)):
        be.matryoshka_latent_backward(idx, 41, None, None, values, suffix_sums(gP), WIDTHS)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="sae_fast._C not built")
@pytest.mark.parametrize("act", ["topk", "batchtopk"])
def test_one_decode_and_one_latent_sorted_backward_for_every_prefix(act, monkeypatch):
    # No per-prefix re-decoding: a Matryoshka step makes the same kernel calls as a plain one, with the
    # Matryoshka decode and backward in place of the plain ones (AuxK off).
    be = dispatch.lookup_backend("cpu")
    calls = []
    for name in ("sparse_decode", "gather_dot", "latent_backward", "matryoshka_decode", "matryoshka_gather_dot",
                 "matryoshka_latent_backward"):
        fn = getattr(be, name)
        monkeypatch.setattr(be, name, lambda *a, _fn=fn, _name=name, **kw: (calls.append(_name), _fn(*a, **kw))[1])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 16, generator=g)
    sae = SparseAutoencoder(16, 48, act, k=4, seed=0, k_aux=0, matryoshka=[5, 13, 30, 48])
    with sae_fast.use_backend("cpu"):
        sae(x).loss.backward()
    assert calls.count("matryoshka_decode") == 1 and calls.count("matryoshka_latent_backward") == 1
    assert calls.count("matryoshka_gather_dot") == 1 and "gather_dot" not in calls
    # TopK: the encoder's gradient rows come out of the same pass; BatchTopK's come from its encoder's own
    # pass, as for a plain BatchTopK SAE. sparse_decode: only dL/dx through the encoder (W_enc), once.
    assert calls.count("latent_backward") == (0 if act == "topk" else 1)
    assert calls.count("sparse_decode") <= 1


def test_prefix_fvus_and_suffix_sums_match_reference():
    from torch.autograd import gradcheck

    from sae_fast.matryoshka import prefix_fvus
    g = torch.Generator().manual_seed(0)
    P = torch.randn(4, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(prefix_fvus(P, x), torch.stack([R.fvu(p, x) for p in P]))
    assert gradcheck(prefix_fvus, (P, x))
    gP = torch.randn(4, 5, 3, generator=g)
    torch.testing.assert_close(suffix_sums(gP), torch.stack([gP[p:].sum(0) for p in range(4)]))


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="sae_fast._C not built")
def test_cpu_kernels_are_bitwise_the_same_for_any_thread_count():
    # One thread per output row / latent: the sums have one order whatever the thread count (a size above
    # the backend's one-thread cutoff, so the second run really uses two threads).
    be = dispatch.lookup_backend("cpu")
    g = torch.Generator().manual_seed(3)
    B, K, n, d, widths = 300, 24, 500, 64, [7, 100, 101, 333, 500]
    idx = torch.stack([torch.randperm(n, generator=g)[:K] for _ in range(B)]).to(torch.int32)
    values = torch.relu(torch.randn(B, K, generator=g))
    W, bias = torch.randn(n, d, generator=g), torch.randn(d, generator=g)
    S, dp, xc = torch.randn(len(widths), B, d, generator=g), torch.randn(B, K, generator=g), torch.randn(B, d, generator=g)

    def run(threads):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return (be.matryoshka_decode(values, idx, W, bias, widths), be.matryoshka_gather_dot(S, idx, W, widths),
                    *be.matryoshka_latent_backward(idx, n, dp, xc, values, S, widths))
        finally:
            torch.set_num_threads(before)

    for a, b in zip(run(1), run(2)):
        assert torch.equal(a, b)


def test_public_ops_check_the_widths_first():
    from sae_fast import ops
    from sae_fast.matryoshka import matryoshka_decode
    values, idx, W, bias, _ = _code()
    x = torch.randn(9, 6)
    with pytest.raises(ValueError, match="last prefix width must be n_latents=41"):
        ops.topk_sae(x, W, torch.zeros(41), W, bias, 3, matryoshka=[3, 40])
    with pytest.raises(ValueError, match="strictly increasing"):
        matryoshka_decode(values, idx, W, bias, [10, 3, 41])
