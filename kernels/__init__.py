"""Triton kernels, installed as ``sae_fast.kernels``: one module per kernel family (jit kernels first,
then their configs and host launchers). Only ``sae_fast.backends.triton`` and the static checks
(``sae_fast.kernels.resources``) import them.

    encoder          GEMM tiles with a running top-k (or a threshold list) in the epilogue; or the same
                     running top-k scanning chunks of cuBLAS scores (topk_scan)
    decoder          sparse decode (gather-accumulate) and gather-dot
    latent_backward  latent-sorted, atomic-free dW_enc / db_enc / dW_dec

Triton fixes per process, when it is imported, whether ``@triton.jit`` functions (its own library's
included) are compiled for the GPU or run by its CPU interpreter (``TRITON_INTERPRET=1``). So a process
either runs these kernels on CPU tensors through the interpreter or compiles them; the static checks
run in a subprocess with the interpreter off.
"""
