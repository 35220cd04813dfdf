"""features.top_patches: streamed over batches, it keeps exactly each latent's strongest (image, patch) firings."""
import pytest
import torch

from sae_fast import SparseAutoencoder, features


def test_top_patches_equals_brute_force_over_all_patches():
    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in=16, n_latents=40, activation="topk", k=4)
    acts = torch.randn(10, 12, 16)  # 10 images, a 3 x 4 patch grid
    found = features.top_patches(sae, acts.split(3), grid=(3, 4), top=5, scale=2.0)  # batches of 3, 3, 3, 1
    values, indices = sae.encode(acts.reshape(-1, 16) * 2.0)
    dense = torch.zeros(120, 40).scatter_(1, indices, values.clamp_min(0))  # (image * 12 + patch, latent)
    assert torch.equal(found.count, (dense > 0).sum(0)) and found.n_patches == 120
    for latent in range(40):
        fired = dense[:, latent].nonzero().flatten()
        want = sorted(((dense[f, latent].item(), int(f) // 12, int(f) % 12) for f in fired), reverse=True)[:5]
        got = [(v, i, r * 4 + c) for i, r, c, v in found.rows_cols(latent)]
        assert [g[0] for g in got] == pytest.approx([w[0] for w in want])
        assert {g[1:] for g in got} == {w[1:] for w in want}  # the same (image, patch) positions


def test_top_patches_refuses_a_batch_of_the_wrong_shape():
    sae = SparseAutoencoder(d_in=16, n_latents=40, activation="topk", k=4)
    with pytest.raises(ValueError, match=r"\(images, 12 patches, 16\)"):
        features.top_patches(sae, [torch.randn(2, 9, 16)], grid=(3, 4))
    with pytest.raises(ValueError, match="no images"):
        features.top_patches(sae, [], grid=(3, 4))
