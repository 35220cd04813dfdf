"""Nearest features by decoder direction (cosine similarity): for one latent, or for every latent at once in
blocks, with a running top-k per row so memory stays O(n k + block^2), never n x n."""
from __future__ import annotations

import torch
from torch import Tensor


def _unit(sae) -> Tensor:
    W = sae.W_dec.detach().float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def decoder_neighbours(sae, latent: int, k: int = 10) -> tuple[Tensor, Tensor]:
    """The ``k`` latents whose decoder directions are closest to ``latent``'s by cosine similarity
    (itself excluded): (similarities, latent ids), most similar first."""
    n = sae.n_latents
    if not (isinstance(latent, int) and 0 <= latent < n):
        raise ValueError(f"latent must be an integer in [0, {n}); got {latent!r}")
    k = min(k, n - 1)
    unit = _unit(sae)
    sims = unit @ unit[latent]
    sims[latent] = -float("inf")
    best = torch.topk(sims, k)
    return best.values, best.indices


def all_neighbours(sae, k: int = 10, block: int = 4096, device=None) -> tuple[Tensor, Tensor]:
    """Every latent's ``k`` nearest latents by decoder cosine (itself excluded): (similarities (n, k), ids
    (n, k)), most similar first, on CPU. Rows and columns go in blocks of ``block``; each row block keeps a
    running top-k that every column block's products are merged into. ``device`` runs the products there
    (default: where the SAE is)."""
    n = sae.n_latents
    if not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(f"k must be an integer in [1, {n}); got {k!r}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer; got {block!r}")
    unit = _unit(sae).to(device) if device is not None else _unit(sae)
    sims_out = torch.empty(n, k)
    ids_out = torch.empty(n, k, dtype=torch.long)
    for r0 in range(0, n, block):
        rows = unit[r0:r0 + block]
        best_s = torch.full((rows.shape[0], k), -float("inf"), device=unit.device)
        best_i = torch.full((rows.shape[0], k), -1, dtype=torch.long, device=unit.device)
        for c0 in range(0, n, block):
            s = rows @ unit[c0:c0 + block].T
            if c0 == r0:  # the diagonal block holds each row's own latent
                s.fill_diagonal_(-float("inf"))
            cand_s = torch.cat([best_s, s], 1)
            cand_i = torch.cat([best_i, torch.arange(c0, c0 + s.shape[1], device=unit.device).expand_as(s)], 1)
            best_s, at = torch.topk(cand_s, k, dim=1)
            best_i = cand_i.gather(1, at)
        sims_out[r0:r0 + rows.shape[0]] = best_s.cpu()
        ids_out[r0:r0 + rows.shape[0]] = best_i.cpu()
    return sims_out, ids_out
