"""features.all_neighbours: blocked all-pairs decoder cosine with a running top-k equals brute force."""
import pytest
import torch

from sae_fast import SparseAutoencoder, features


@pytest.mark.parametrize("n,block", [(300, 64), (97, 97), (50, 7)])
def test_all_neighbours_equal_brute_force(n, block):
    sae = SparseAutoencoder(16, n, "topk", k=2, seed=1)
    with torch.no_grad():
        sae.W_dec[5] = sae.W_dec[3] * 4  # same direction, other norm: each other's nearest
        sae.W_dec[7] = -sae.W_dec[3]
    sims, ids = features.all_neighbours(sae, k=6, block=block)
    unit = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    full = unit @ unit.T
    full.fill_diagonal_(-float("inf"))
    want = torch.topk(full, 6, dim=1)
    torch.testing.assert_close(sims, want.values)
    # The ids point at those similarities (3 and 5 tie for every other row, so compare values, not order).
    torch.testing.assert_close(full.gather(1, ids), want.values)
    assert all(len(set(r)) == 6 for r in ids.tolist())
    assert ids[3, 0] == 5 and ids[5, 0] == 3 and not (ids == torch.arange(n).unsqueeze(1)).any()
    one_s, one_i = features.decoder_neighbours(sae, 3, k=6)
    torch.testing.assert_close(one_s, sims[3])
    assert torch.equal(one_i, ids[3])


def test_all_neighbours_rejects_bad_arguments():
    sae = SparseAutoencoder(8, 10, "topk", k=2, seed=0)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 10\)"):
        features.all_neighbours(sae, k=10)
    with pytest.raises(ValueError, match="block must be a positive integer"):
        features.all_neighbours(sae, k=2, block=0)
