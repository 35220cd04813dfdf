"""Nearest features by decoder direction (cosine similarity): for one latent, or for every latent at once
through the fused top-k encoder, so memory stays O(n k), never n x n."""
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
    (n, k)), most similar first, on CPU. The search is the SAE's own top-k encoder run on its unit decoder
    rows (scores ``unit @ unit.T``, k + 1 kept per row, bias 0): the fused kernels never form a block of
    products, so memory is O(n k) and the cost is close to the n x n x d GEMM. ``block`` rows go per call;
    ``device`` runs it there (default: where the SAE is)."""
    from ..dispatch import get_backend

    n = sae.n_latents
    if not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(f"k must be an integer in [1, {n}); got {k!r}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer; got {block!r}")
    unit = (_unit(sae).to(device) if device is not None else _unit(sae)).contiguous()
    backend = get_backend(unit.device)
    zero_bias, zero_centre = unit.new_zeros(n), unit.new_zeros(unit.shape[1])
    sims_out = torch.empty(n, k)
    ids_out = torch.empty(n, k, dtype=torch.long)
    with torch.no_grad():
        for r0 in range(0, n, block):
            rows = unit[r0:r0 + block]
            s, i = backend.topk_select(rows, unit, zero_bias, zero_centre, k + 1)[:2]  # scores before any ReLU
            s, order = s.float().sort(dim=1, descending=True, stable=True)
            i = i.long().gather(1, order)
            # Drop each row's own latent; where k + 1 others tie at or above it (duplicate directions), the last.
            own = i == torch.arange(r0, r0 + rows.shape[0], device=i.device).unsqueeze(1)
            drop = torch.where(own.any(1), own.int().argmax(1), k)
            keep = torch.ones_like(own)
            keep[torch.arange(rows.shape[0], device=i.device), drop] = False
            sims_out[r0:r0 + rows.shape[0]] = s[keep].view(-1, k).cpu()
            ids_out[r0:r0 + rows.shape[0]] = i[keep].view(-1, k).cpu()
    return sims_out, ids_out
