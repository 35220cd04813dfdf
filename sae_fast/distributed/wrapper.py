"""What the trainer reaches on any SAE-like module, for the wrappers that hold a SparseAutoencoder."""
from __future__ import annotations

from torch import Tensor, nn

from ..sae import SparseAutoencoder


class WrapsSAE(nn.Module):
    """Forwards the SAE attributes the trainer uses to ``self.inner``: the whole SAE (data parallel) or
    this rank's shard of it (latent sharded). ``d_in``, ``d_out`` and ``n_latents`` are the whole SAE's."""

    @property
    def inner(self) -> SparseAutoencoder:
        raise NotImplementedError

    @property
    def b_dec(self) -> Tensor:
        return self.inner.b_dec

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    @property
    def d_out(self) -> int:
        return self.cfg.d_out

    @property
    def unit_norm_decoder(self) -> bool:
        return self.inner.unit_norm_decoder

    def remove_parallel_grad_(self) -> None:
        self.inner.remove_parallel_grad_()  # per decoder row, linear in the gradient: local, and commutes with sums

    def normalize_decoder_(self) -> None:
        self.inner.normalize_decoder_()
