"""Synthetic activations with a known sparse dictionary: a check that an SAE recovers real features."""
from __future__ import annotations

import torch
from torch import Tensor


class SparseDictionaryData:
    """x = sum of a few ground-truth unit directions with positive coefficients, plus a little noise."""

    def __init__(self, d: int, n_features: int, active: int = 4, noise: float = 0.01, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        feats = torch.randn(n_features, d, generator=self.gen)
        self.features = feats / feats.norm(dim=1, keepdim=True)
        self.active, self.noise = active, noise

    def sample(self, batch: int) -> Tensor:
        n = self.features.shape[0]
        # Zipf-like frequencies, as real features have: a few common, many rare.
        freq = 1.0 / torch.arange(1, n + 1).float() ** 0.5
        idx = torch.multinomial(freq.expand(batch, n), self.active, replacement=False, generator=self.gen)
        coef = torch.rand(batch, self.active, generator=self.gen) + 0.5
        x = torch.einsum("bk,bkd->bd", coef, self.features[idx])
        return x + self.noise * torch.randn(x.shape, generator=self.gen)


def best_cosines(W_dec: Tensor, features: Tensor) -> list[float]:
    """For each ground-truth feature (unit rows of ``features``), its best cosine similarity with any decoder row."""
    W = W_dec.detach().float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (features @ W.T).max(dim=1).values.tolist()


def recovery(W_dec: Tensor, features: Tensor) -> float:
    """Mean over ground-truth features of the best cosine similarity with any decoder row (1 = all found)."""
    cosines = best_cosines(W_dec, features)
    return sum(cosines) / len(cosines)
