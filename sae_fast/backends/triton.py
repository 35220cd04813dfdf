"""The ``triton`` backend: the kernels of ``sae_fast.kernels`` for CUDA tensors.

CPU tensors are accepted only when the process started with ``TRITON_INTERPRET=1`` (Triton's
interpreter runs the same kernels in numpy; that is how they are tested without a GPU) and only when
forced: ops.py never picks this backend for CPU tensors by default. Triton and the kernels are imported
on first use, so importing this module is cheap and needs no GPU. Primitives fall back to the
plain-torch ``SparseBackend`` for float64 (no tensor cores) and for k above ``encoder.MAX_K``; an
AuxK list the encoder pass does not take (``encoder.fuses_aux``) comes from a GEMM over the dead rows.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from .base import SparseBackend

if importlib.util.find_spec("triton") is None:  # ops.py then leaves the backend unregistered
    raise ImportError("triton is not installed (pip install 'sae-fast[triton]')")

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(SparseBackend):
    name = "triton"

    def __init__(self):
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
        return self._kernels("encoder").fold_bias(W_enc, b_enc, b_dec)

    def _gemm_weights(self, x, W_enc):
        """W_enc as the encoder tiles read it: fp32 master weights beside 16-bit x are rounded to x's
        dtype for the tensor cores, by a copy that lives for this call only (``encoder.MASTER_IN_KERNEL``
        has the tiles convert them instead)."""
        if W_enc.dtype == x.dtype or self._kernels("encoder").MASTER_IN_KERNEL:
            return W_enc
        return W_enc.to(x.dtype)

    def _topk_acc(self, x, W_enc, b_enc, b_dec, k, dead_mask=None, k_aux=0):
        enc = self._kernels("encoder")
        if not self._native(x) or k > enc.MAX_K:
            return super()._topk_acc(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux)
        c = self._fold(W_enc, b_enc, b_dec)
        W = self._gemm_weights(x, W_enc)
        if not k_aux or enc.fuses_aux(k_aux, x.dtype):
            return enc.topk_select(x, W, c, k, dead_mask, k_aux, out_dtype=torch.float32)
        # A large AuxK list (the default is d_in / 2), or one beside fp32 tiles: a GEMM over the dead rows.
        pre, idx, _, _ = enc.topk_select(x, W, c, k, out_dtype=torch.float32)
        del W
        dead = dead_mask.nonzero().squeeze(1)
        aux_pre, aux_pos, _, _ = super()._topk_acc(x, W_enc[dead], b_enc[dead], b_dec, k_aux)
        return pre, idx, aux_pre, dead[aux_pos.long()].to(idx.dtype)

    def threshold_select(self, x, W_enc, b_enc, b_dec, cutoff):
        if not self._native(x):
            return super().threshold_select(x, W_enc, b_enc, b_dec, cutoff)
        enc = self._kernels("encoder")
        key = (x.shape[0], W_enc.shape[0])
        capacity = self._capacity.get(key, 16)
        c = self._fold(W_enc, b_enc, b_dec)
        pre, idx, need = enc.threshold_select(x, self._gemm_weights(x, W_enc), c, cutoff, capacity)
        # Next call: room for this batch's need plus a quarter, so a similar batch needs no rerun.
        self._capacity[key] = max(16, need + need // 4)
        return pre, idx

    # ------------------------------------------------------------------ decoder
    def sparse_decode(self, values, idx, W, bias=None):
        if not self._native(W):
            return super().sparse_decode(values, idx, W, bias)
        return self._kernels("decoder").sparse_decode(values, idx, W, bias)

    def gather_dot(self, g, idx, W):
        if not self._native(W):
            return super().gather_dot(g, idx, W)
        return self._kernels("decoder").gather_dot(g.contiguous(), idx, W)

    # ------------------------------------------------------------------ backward
    def latent_backward(self, idx, n, dp=None, xc=None, v=None, g=None, grad_dtype=None):
        if not self._native(dp, xc, v, g):
            return super().latent_backward(idx, n, dp, xc, v, g, grad_dtype)
        return self._kernels("latent_backward").latent_backward(idx, n, dp, xc, v, g, grad_dtype=grad_dtype)

