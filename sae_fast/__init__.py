"""sae-fast: fused kernels for training, inspecting and steering sparse autoencoders.

    from sae_fast import SparseAutoencoder, ops
    sae = SparseAutoencoder(d_in=768, n_latents=32768, activation="topk", k=32)
    out = sae(x); out.loss.backward()
"""
import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    # OpenMP threads that spin while they wait make every step ~3-10x slower when another process shares
    # the cores (measured: 2 threads, one busy neighbour, a d=384 n=3072 TopK step 270 ms spinning vs 85 ms
    # passive; 30 vs 34 ms on idle cores). Read once when torch loads libgomp; set it yourself to override.
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# io registers the SAELens and sparsify folder formats, so SparseAutoencoder.load reads them too.
from . import io, ops, reference  # noqa: E402
from .dispatch import available_backends, get_backend, use_backend  # noqa: E402
from .sae import SAEConfig, SAEOutput, SparseAutoencoder  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ops", "reference", "io", "SparseAutoencoder", "SAEConfig", "SAEOutput", "use_backend",
           "available_backends", "get_backend", "__version__"]
