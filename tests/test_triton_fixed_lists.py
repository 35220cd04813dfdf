"""The triton backend's lists of data-dependent length at widths fixed on the host (backends/fixed_lists.py):
AuxK's dead-row block at the trainer's default k_aux (above the fused encoder's AuxK list), BatchTopK's
candidates and the ReLU/JumpReLU lists under deferred checks, against reference.py and against the same
calls sized exactly; an overflow is reported at the next check, never silent. Interpreter, small sizes.
"""
import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU runs of the Triton kernels need TRITON_INTERPRET=1 set before triton is imported",
                allow_module_level=True)

from helpers import close, grads_match, make_sae_tensors, ref_grads  # noqa: E402

import sae_fast  # noqa: E402
from sae_fast import checks, ops  # noqa: E402
from sae_fast import reference as R  # noqa: E402
from sae_fast.backends import fixed_lists  # noqa: E402
from sae_fast.backends.triton import TritonBackend  # noqa: E402
from sae_fast.kernels import topk_encoder as topk  # noqa: E402


def test_keyed_topk_is_exact_on_ties_and_nan():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (6, 40), generator=g).float()  # many exact ties
    scores[1, 7] = float("nan")
    scores[2, 3] = -0.0
    scores[3] = float("-inf")
    for k in (1, 5, 40):
        vals, pos = fixed_lists.keyed_topk(scores, k)
        want = R.topk_indices(scores, k)
        assert torch.equal(pos, want), k
        assert torch.equal(vals.nan_to_num(), scores.gather(1, want).nan_to_num())


AUX_DTYPES = [(torch.float32, 1e-4, 1e-4), (torch.bfloat16, 3e-2, 3e-2)]


@pytest.mark.parametrize("dtype,atol,rtol", AUX_DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("dead_every,bound", [(3, "exact"), (3, "loose"), (7, "exact"), (1, "none")],
                         ids=["dead-27", "dead-27-loose-bound", "dead-12-fewer-than-k_aux", "no-bound-all-dead"])
def test_large_auxk_dead_row_block_matches_reference(dtype, atol, rtol, dead_every, bound):
    """k_aux above the fused encoder's AuxK list (the trainer's default d / 2 is above it at every real d):
    values, indices and every gradient against reference.py, whatever the bound (exact, loose, none)."""
    B, d, n, k, k_aux = 9, 24, 80, 3, topk.MAX_K_AUX + 4
    tensors = make_sae_tensors(B, d, n, dtype, seed=11)
    dead = torch.arange(n) % dead_every == 0
    count = int(dead.sum())
    given = {"exact": lambda: count, "loose": lambda: count + 13, "none": None}[bound]
    fn = lambda *t: ops.topk_sae(*t, k, dead, k_aux, pad_aux=True)  # noqa: E731
    with sae_fast.use_backend("triton"), checks.dead_bound(given):
        out = fn(*tensors)
    ref, t64 = ref_grads(fn, tensors)
    assert torch.equal(out.indices, ref.indices)
    # Fewer dead latents than k_aux: the rest is padding (value 0), which reference.py fills with live latents.
    real = dead[ref.aux_indices.long()]
    assert torch.equal(out.aux_indices[real], ref.aux_indices[real]) and (out.aux_values[~real] == 0).all()
    close(out.aux_values, ref.aux_values, atol, rtol, "aux values")
    close(out.x_hat, ref.x_hat, atol * 10, rtol, "x_hat")
    loss = lambda v, i, xh, av, ai: (xh.float() ** 2).sum() + (av.float() ** 2).sum() + av.float().sum()  # noqa: E731
    grads_match(loss, out, ref, tensors, t64, atol * 3, rtol)


def _dead_rows(x, W, b_enc, b_dec, dead, k_aux, bound):
    with sae_fast.use_backend("triton"), checks.dead_bound(lambda: bound):
        return TritonBackend().topk_select(x, W, b_enc, b_dec, 2, dead, k_aux)


def test_a_dead_bound_too_small_is_exact_outside_deferred_checks_and_reported_inside():
    x, W, b_enc, _, b_dec = make_sae_tensors(5, 8, 50, requires_grad=False, seed=2)
    dead = torch.arange(50) % 2 == 0  # 25 dead
    exact = _dead_rows(x, W, b_enc, b_dec, dead, 10, 25)
    stale = _dead_rows(x, W, b_enc, b_dec, dead, 10, 4)  # counters written behind the bound's back
    assert torch.equal(stale[3], exact[3]) and torch.equal(stale[2], exact[2])
    with pytest.raises(ValueError, match="AuxK dead-row .* overflowed"):
        with checks.deferred_finite_checks():
            _dead_rows(x, W, b_enc, b_dec, dead, 10, 4)


def _dense(out, n):
    pre, idx = out
    return R.sparse_to_dense(torch.relu(pre.float()), idx, n)


@pytest.mark.parametrize("kind", ["relu", "batchtopk"])
def test_deferred_lists_equal_exact_ones_and_an_overflow_is_reported_then_learnt(kind):
    B, d, n, k = 10, 12, 70, 3
    x, W, b_enc, _, b_dec = make_sae_tensors(B, d, n, requires_grad=False, seed=4)
    pre = R.pre_activations(x.double(), W.double(), b_enc.double(), b_dec.double())
    if kind == "relu":
        want = R.sparse_to_dense(*R.relu(pre), n)
        call = lambda b: b.threshold_select(x, W, b_enc, b_dec, torch.zeros(n))  # noqa: E731
        keys = [("threshold rows", B, n), ("threshold", B, n)]
    else:
        want = R.sparse_to_dense(*R.batch_topk(pre, k), n)
        call = lambda b: b.batch_topk_select(x, W, b_enc, b_dec, k)  # noqa: E731
        keys = [("batchtopk", B, n, k)]
    backend = TritonBackend()
    close(_dense(call(backend), n), want, 1e-5, 1e-5, "exact")  # sizes the lists
    with checks.deferred_finite_checks():
        close(_dense(call(backend), n), want, 1e-5, 1e-5, "fixed widths")
    for key in keys:
        backend._capacity[key] = 1  # far too narrow: the step's lists are cut short...
        with pytest.raises(ValueError, match="overflowed"):  # ...and the next check says so
            with checks.deferred_finite_checks():
                call(backend)
        assert backend._capacity[key] > 1  # learnt from the device-side need at the read
        for _ in range(3):  # BatchTopK learns m by growing it (a full row does not say by how much)
            try:
                with checks.deferred_finite_checks():
                    got = _dense(call(backend), n)
                break
            except ValueError:
                continue
        close(got, want, 1e-5, 1e-5, f"after {key}")
