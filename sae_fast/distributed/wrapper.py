"""What the trainer reaches on any SAE-like module, for the wrappers that hold a SparseAutoencoder."""
from __future__ import annotations

from torch import Tensor, nn

from ..sae import SparseAutoencoder
from ..sae_config import ConfigShape


class WrapsSAE(ConfigShape, nn.Module):
    """Forwards the SAE attributes the trainer uses to ``self.inner``: the whole SAE (data parallel) or
    this rank's shard of it (latent sharded); the shape (ConfigShape, from ``self.cfg``) is the whole SAE's."""

    @property
    def inner(self) -> SparseAutoencoder:
        raise NotImplementedError

    @property
    def b_dec(self) -> Tensor:
        return self.inner.b_dec

    def remove_parallel_grad_(self) -> None:
        self.inner.remove_parallel_grad_()  # per decoder row, linear in the gradient: local, and commutes with sums

    def normalize_decoder_(self) -> None:
        self.inner.normalize_decoder_()
