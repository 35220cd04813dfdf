"""Matryoshka SAEs: nested dictionaries whose every prefix reconstructs the input (math in reference.py).

The prefix reconstructions come out of the code the SAE already has, with no per-prefix re-decoding: each
inner group's entries are decoded once (values masked to the group of their latent; the cpu decoder skips
zero entries, so there all groups together cost one decode; torch's and triton's read every entry), and
a cumulative sum over groups gives every inner prefix. The outer prefix is the plain reconstruction (the
fused TopK op's, with its one-pass backward).
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import ops


def check_widths(widths, n_latents: int, activation: str) -> list[int]:
    """``matryoshka`` as a list of ints: cumulative prefix widths, strictly increasing, the last = n_latents."""
    if activation not in ("topk", "batchtopk"):
        raise ValueError(f"matryoshka needs activation 'topk' or 'batchtopk'; got {activation!r}")
    if isinstance(widths, (str, bytes)) or not hasattr(widths, "__iter__"):
        raise TypeError(f"matryoshka must be a list of prefix widths; got {type(widths).__name__} {widths!r}")
    widths = list(widths)
    if not widths or any(isinstance(m, bool) or not isinstance(m, numbers.Integral) for m in widths):
        raise TypeError(f"matryoshka must be a non-empty list of ints (prefix widths); got {widths!r}")
    widths = [int(m) for m in widths]
    if widths[0] < 1 or any(b <= a for a, b in zip(widths, widths[1:])):
        raise ValueError(f"matryoshka prefix widths must be positive and strictly increasing; got {widths}")
    if widths[-1] != n_latents:
        raise ValueError(f"matryoshka's last prefix width must be n_latents={n_latents} (cumulative widths, "
                         f"SAELens' convention); got {widths}")
    return widths


def prefix_reconstructions(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, widths: list[int],
                           x_hat: Tensor) -> Tensor:
    """(G, B, d): x_hat_i for every prefix i (reference.matryoshka_decode); the last is ``x_hat``, the full
    reconstruction the caller decoded already."""
    if len(widths) == 1:
        return x_hat[None]
    bounds = torch.tensor(widths[:-1], dtype=indices.dtype, device=indices.device)
    group = torch.bucketize(indices, bounds, right=True)  # group i: m_{i-1} <= latent < m_i
    parts = torch.stack([ops.sparse_decode(torch.where(group == i, values, 0.0), indices, W_dec, None)
                         for i in range(len(widths) - 1)])
    inner = parts.cumsum(0) + b_dec.to(parts.dtype)
    return torch.cat([inner, x_hat[None].to(inner.dtype)])
