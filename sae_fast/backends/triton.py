"""The ``triton`` backend: the kernels of ``sae_fast.kernels`` for CUDA tensors.

CPU tensors are accepted only when the process started with ``TRITON_INTERPRET=1`` (Triton's
interpreter runs the same kernels in numpy; that is how they are tested without a GPU) and only when
forced: dispatch.py never picks this backend for CPU tensors by default. Triton and the kernels are imported
on first use, so importing this module is cheap and needs no GPU. Primitives fall back to the
plain-torch ``SparseBackend`` for float64 (no tensor cores) and for k above ``topk_encoder.MAX_K``; an
AuxK list the encoder pass does not take (``topk_encoder.fuses_aux``) comes from a GEMM over the dead rows.
How the encoders run is the backend's ``options`` (``EncoderOptions``).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch

from ..checks import check_indices
from .base import SparseBackend

if importlib.util.find_spec("triton") is None:  # dispatch.py then leaves the backend unregistered
    raise ImportError("triton is not installed (pip install 'sae-fast[triton]')")

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class EncoderOptions:
    """How the backend runs its encoders. Both choices were built without a GPU; benchmarks/encoder_ab.py
    times them (it sets ``TritonBackend.options`` for its SAE rows).

    scan_chunk: 0 = the GEMM runs in the encoder kernels' tiles (fused). A chunk width = for 16-bit x,
        cuBLAS multiplies that many latents at a time into one reused fp32 (B, chunk) buffer and the same
        selections scan it (kernels/scan_encoder.py).
    master_in_kernel: fp32 master W_enc beside 16-bit x. False = the tiles get a 16-bit copy made for the
        call; True = they load fp32 and convert (no copy, twice the weight bytes through the GEMM's main loop).
    """
    scan_chunk: int = 0
    master_in_kernel: bool = False


class TritonBackend(SparseBackend):
    name = "triton"

    def __init__(self, options: EncoderOptions = EncoderOptions()):
        self.options = options
        self._capacity: dict[tuple[int, int], int] = {}  # (B, n) -> threshold list capacity last needed

    def supports(self, device: torch.device) -> bool:
        device = torch.device(device)
        return device.type == "cuda" or (device.type == "cpu" and _interpreting())

    def runs_on(self) -> str:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        cpu = ("CPU tensors when forced (TRITON_INTERPRET=1 is set)" if _interpreting()
               else "CPU only under TRITON_INTERPRET=1")
        return f"installed; CUDA tensors ({f'{gpus} device(s)' if gpus else 'none here'}); {cpu}"

    @staticmethod
    def _kernels(family: str):
        return importlib.import_module(f"sae_fast.kernels.{family}")

    @staticmethod
    def _native(*tensors) -> bool:
        return all(t is None or t.dtype in _FUSED_DTYPES for t in tensors)

    # ------------------------------------------------------------------ encoders
    def _fold(self, W_enc, b_enc, b_dec):
        return self._kernels("encoder_common").fold_bias(W_enc, b_enc, b_dec)

    def _gemm_weights(self, x, W_enc):
        """W_enc as the encoder tiles read it: fp32 master weights beside 16-bit x are rounded to x's
        dtype for the tensor cores, by a copy that lives for this call only (``options.master_in_kernel``
        has the tiles convert them instead)."""
        if W_enc.dtype == x.dtype or self.options.master_in_kernel:
            return W_enc
        return W_enc.to(x.dtype)

    def _scan_chunk(self, x) -> int:
        """The GEMM + scan chunk width for x (``options.scan_chunk``, 16-bit x only), or 0: fused."""
        return self.options.scan_chunk if x.dtype.itemsize == 2 else 0

    def _topk_select(self, x, W, c, k, dead_mask=None, k_aux=0):
        chunk = self._scan_chunk(x)
        if chunk:
            return self._kernels("scan_encoder").topk_scan(x, W, c, k, dead_mask, k_aux, torch.float32, chunk)
        return self._kernels("topk_encoder").topk_select(x, W, c, k, dead_mask, k_aux, out_dtype=torch.float32)

    def _topk_acc(self, x, W_enc, b_enc, b_dec, k, dead_mask=None, k_aux=0):
        topk = self._kernels("topk_encoder")
        if not self._native(x) or k > topk.MAX_K:
            return super()._topk_acc(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux)
        c = self._fold(W_enc, b_enc, b_dec)
        W = self._gemm_weights(x, W_enc)
        if not k_aux or topk.fuses_aux(k_aux, x.dtype):
            return self._topk_select(x, W, c, k, dead_mask, k_aux)
        # A large AuxK list (the default is d_in / 2), or one beside fp32 tiles: a GEMM over the dead rows.
        pre, idx, _, _ = self._topk_select(x, W, c, k)
        del W
        dead = dead_mask.nonzero().squeeze(1)
        # Fewer dead latents than k_aux (a fixed-width AuxK list): the rest is padding (-inf, index 0).
        m = min(k_aux, dead.numel())
        aux_pre = pre.new_full((x.shape[0], k_aux), float("-inf"))
        aux_idx = idx.new_zeros((x.shape[0], k_aux))
        if m:
            sub_pre, aux_pos, _, _ = super()._topk_acc(x, W_enc[dead], b_enc[dead], b_dec, m)
            aux_pre[:, :m], aux_idx[:, :m] = sub_pre.to(pre.dtype), dead[aux_pos.long()].to(idx.dtype)
        return pre, idx, aux_pre, aux_idx

    def threshold_select(self, x, W_enc, b_enc, b_dec, cutoff):
        if not self._native(x):
            return super().threshold_select(x, W_enc, b_enc, b_dec, cutoff)
        key = (x.shape[0], W_enc.shape[0])
        capacity = self._capacity.get(key, 16)
        c = self._fold(W_enc, b_enc, b_dec)
        W, chunk = self._gemm_weights(x, W_enc), self._scan_chunk(x)
        if chunk:
            pre, idx, need = self._kernels("scan_encoder").threshold_scan(x, W, c, cutoff, capacity, chunk)
        else:
            pre, idx, need = self._kernels("threshold_encoder").threshold_select(x, W, c, cutoff, capacity)
        # Next call: room for this batch's need plus a quarter, so a similar batch needs no rerun.
        self._capacity[key] = max(16, need + need // 4)
        return pre, idx

    # ------------------------------------------------------------------ decoder
    def sparse_decode(self, values, idx, W, bias=None):
        if not self._native(W):
            return super().sparse_decode(values, idx, W, bias)
        check_indices(idx, W.shape[0])
        return self._kernels("decoder").sparse_decode(values, idx, W, bias)

    def gather_dot(self, g, idx, W):
        if not self._native(W):
            return super().gather_dot(g, idx, W)
        check_indices(idx, W.shape[0])
        return self._kernels("decoder").gather_dot(g.contiguous(), idx, W)

    # ------------------------------------------------------------------ backward
    def latent_backward(self, idx, n, dp=None, xc=None, v=None, g=None, grad_dtype=None):
        if not self._native(dp, xc, v, g):
            return super().latent_backward(idx, n, dp, xc, v, g, grad_dtype)
        check_indices(idx, n)
        return self._kernels("latent_backward").latent_backward(idx, n, dp, xc, v, g, grad_dtype=grad_dtype)

    # ------------------------------------------------------------------ fused training step
    def fused_step_supported(self, dtype: torch.dtype) -> bool:
        # Proven under the interpreter only: on a GPU it is opt-in (SAE_FAST_TRITON_FUSED_STEP=1, which
        # benchmarks/gpu_run.sh sets) until tests/test_triton_gpu.py's fused-step test has passed on one.
        if not _interpreting() and os.environ.get("SAE_FAST_TRITON_FUSED_STEP", "0") != "1":
            return False
        return dtype in _FUSED_DTYPES

    def fused_adam_step(self, idx, pre, k_main, dp, xc, v, g, d_norm, params, moments, adam, project, renorm):
        check_indices(idx, params[0].shape[0])
        self._kernels("fused_step").fused_adam_step(idx, pre, k_main, dp, xc, v, g, d_norm, params, moments, adam,
                                                    project, renorm)

    # ------------------------------------------------------------------ Matryoshka (kernels/matryoshka.py)
    def matryoshka_decode(self, values, idx, W, bias, widths):
        if not self._native(W):
            return super().matryoshka_decode(values, idx, W, bias, widths)
        check_indices(idx, W.shape[0])
        return self._kernels("matryoshka").matryoshka_decode(values, idx, W, bias, widths)

    def matryoshka_gather_dot(self, S, idx, W, widths):
        if not self._native(W):
            return super().matryoshka_gather_dot(S, idx, W, widths)
        check_indices(idx, W.shape[0])
        return self._kernels("matryoshka").matryoshka_gather_dot(S, idx, W, widths)

    def matryoshka_latent_backward(self, idx, n, dp, xc, v, S, widths, grad_dtype=None):
        if not self._native(dp, xc, v, S):
            return super().matryoshka_latent_backward(idx, n, dp, xc, v, S, widths, grad_dtype)
        check_indices(idx, n)
        return self._kernels("matryoshka").matryoshka_latent_backward(idx, n, dp, xc, v, S, widths, grad_dtype)
