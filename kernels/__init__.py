"""Triton kernels, installed as ``sae_fast.kernels``: one module per kernel family (jit kernels first,
then their host launchers). Only ``sae_fast.backends.triton`` imports them."""
