"""The ``torch`` backend (backends/base.py) against reference.py across latent chunks, exactly.

The backend scores latents chunk by chunk and merges each chunk's candidates into a running top-k, so the
tie rule (lower latent index wins) is decided where chunks meet. Chunks are forced down to a few latents,
and inputs are small integers, so every pre-activation is exact in fp32 and equal scores are frequent."""
import pytest
import torch

from sae_fast import reference as R
from sae_fast.backends import base
from sae_fast.backends.base import SparseBackend

TORCH = SparseBackend()
SHAPES = [(1, 2, 12), (5, 3, 24), (16, 2, 37)]  # (B, d, n): d = 2 or 3 makes many latents score alike
SEEDS = range(6)


@pytest.fixture(params=[1, 4, 5], ids=lambda c: f"chunk{c}")
def chunk(request, monkeypatch):
    monkeypatch.setattr(base, "_latent_chunk", lambda B: request.param)
    return request.param


def tie_heavy(B, d, n, seed):
    """x, W_enc, b_enc, b_dec of integers in [-1, 1]; b_enc on a 1/2 grid. Returns them and reference.py's p."""
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, d), (n, d), (n,), (d,))
    x, W_enc, b_enc, b_dec = (torch.randint(-1, 2, shape, generator=g).float() for shape in shapes)
    b_enc = b_enc / 2
    p = R.pre_activations(x.double(), W_enc.double(), b_enc.double(), b_dec.double())
    return (x, W_enc, b_enc, b_dec), p


def _assert_has_ties(p):
    assert (p[:, :, None] == p[:, None, :]).sum() > p.numel(), "the inputs must produce equal scores"


@pytest.mark.parametrize("B,d,n", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_topk_ties_go_to_the_lower_latent_across_chunks(chunk, B, d, n, seed, k):
    args, p = tie_heavy(B, d, n, seed)
    _assert_has_ties(p)
    pre, idx, aux_pre, aux_idx = TORCH.topk_select(*args, k)
    want_idx = R.topk_indices(p, k)
    assert torch.equal(idx, want_idx.to(R.INDEX_DTYPE))
    assert torch.equal(pre.double(), p.gather(1, want_idx))
    assert aux_pre is None and aux_idx is None


@pytest.mark.parametrize("B,d,n", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_auxk_ties_go_to_the_lower_dead_latent_across_chunks(chunk, B, d, n, seed):
    args, p = tie_heavy(B, d, n, seed)
    dead = torch.rand(n, generator=torch.Generator().manual_seed(seed + 100)) < 0.6
    k, k_aux = 2, min(5, int(dead.sum()))
    pre, idx, aux_pre, aux_idx = TORCH.topk_select(*args, k, dead, k_aux)
    masked = p.masked_fill(~dead, float("-inf"))
    _assert_has_ties(masked[:, dead])
    want_aux = R.topk_indices(masked, k_aux)
    assert torch.equal(aux_idx, want_aux.to(R.INDEX_DTYPE))
    assert torch.equal(aux_pre.double(), masked.gather(1, want_aux))
    assert torch.equal(idx, R.topk_indices(p, k).to(R.INDEX_DTYPE))


@pytest.mark.parametrize("B,d,n", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 2, 5])
def test_batch_topk_ties_go_to_the_lower_latent_across_chunks(chunk, B, d, n, seed, k):
    args, p = tie_heavy(B, d, n, seed)
    pre, idx = TORCH.batch_topk_select(*args, k)
    rows, cols = R.batch_topk_mask(p, k).nonzero(as_tuple=True)  # row by row, latents ascending
    listed = torch.isfinite(pre)  # padding is (-inf, index 0)
    assert torch.equal(listed.nonzero(as_tuple=True)[0], rows)
    assert torch.equal(idx[listed].long(), cols)
    assert torch.equal(pre.double()[listed], p[rows, cols])
