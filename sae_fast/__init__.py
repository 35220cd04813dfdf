"""sae-fast: fused kernels for training, inspecting and steering sparse autoencoders.

    from sae_fast import SparseAutoencoder, ops
    sae = SparseAutoencoder(d_in=768, n_latents=32768, activation="topk", k=32)
    out = sae(x); out.loss.backward()
"""
from . import ops, reference
from .ops import available_backends, get_backend, use_backend
from .sae import SAEConfig, SAEOutput, SparseAutoencoder

__version__ = "0.1.0"
__all__ = ["ops", "reference", "SparseAutoencoder", "SAEConfig", "SAEOutput", "use_backend",
           "available_backends", "get_backend", "__version__"]
