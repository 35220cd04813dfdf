"""Triton kernels, installed as ``sae_fast.kernels``: one module per algorithm (jit kernels first, then their
configs and host launchers). Only ``sae_fast.backends.triton`` imports them at run time; the static checks
(benchmarks/triton_resources.py) and the tuning scripts in benchmarks/ launch them too.

    encoder_common     what the encoders share: the score tile x @ W_enc.T + c, the folded bias, tile configs
    topk_encoder       GEMM tiles with a running top-k in the epilogue (and an AuxK list), then a merge
    threshold_encoder  GEMM tiles that list every entry above a per-latent cutoff, then a compaction
    scan_encoder       the same selections over chunks of cuBLAS scores (GEMM + scan), for 16-bit inputs
    decoder            sparse decode (gather-accumulate) and gather-dot
    latent_backward    latent-sorted, atomic-free dW_enc / db_enc / dW_dec

Triton fixes per process, when it is imported, whether ``@triton.jit`` functions (its own library's
included) are compiled for the GPU or run by its CPU interpreter (``TRITON_INTERPRET=1``). So a process
either runs these kernels on CPU tensors through the interpreter or compiles them; the static checks
run in a subprocess with the interpreter off.
"""
