"""The ``triton`` backend: the kernels of ``sae_fast.kernels`` for CUDA tensors.

CPU tensors are accepted only when the process started with ``TRITON_INTERPRET=1`` (Triton's
interpreter runs the same kernels in numpy; that is how they are tested without a GPU) and only when
forced: dispatch.py never picks this backend for CPU tensors by default. Triton and the kernels are imported
on first use, so importing this module is cheap and needs no GPU. Primitives fall back to the
plain-torch ``SparseBackend`` for float64 (no tensor cores) and for k above ``topk_encoder.MAX_K``; an
AuxK list the encoder pass does not take (``topk_encoder.fuses_aux``) comes from a GEMM over a block of
dead rows (fixed_lists.dead_rows_topk). How the encoders run is the backend's ``options`` (``EncoderOptions``).

No host reads inside ``checks.deferred_finite_checks()`` (the trainer's steps): lists of a data-dependent
length (ReLU/JumpReLU entries, BatchTopK's candidates, AuxK's dead rows) get widths fixed on the host -
from the last read's needs with room to spare, or from ``SparseAutoencoder.dead_bound`` - and the device
checks that they held; the next read (the trainer's logging step) raises if one did not and learns the
new widths. The first call of a shape sizes its lists with one read. Outside that block every call is
sized exactly (a read per call, as before).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch

from .. import checks
from ..checks import check_indices
from . import fixed_lists
from .base import SparseBackend

if importlib.util.find_spec("triton") is None:  # dispatch.py then leaves the backend unregistered
    raise ImportError("triton is not installed (pip install 'sae-fast[triton]')")

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OVERFLOW = ("the triton backend's fixed-width {} list overflowed in a step since the last check, so that step's "
             "selection was cut short (the width has grown to fit from now on); resume from the last checkpoint")


def _room(need: int, limit: int) -> int:
    """A list width for a need read at a check: half as much again to spare, at most ``limit``."""
    return max(1, min(limit, need + need // 2 + 16))


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
        self._capacity: dict[tuple, int] = {}  # (list kind, shape...) -> the width the next call uses
        self._pending: list = []  # (key, need (0-d device tensor), new width from a need): read at the next check

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

    # ------------------------------------------------------------------ fixed-width lists
    def _fixed(self, key, need, width: int, grow, what: str) -> None:
        """Deferred: the check that ``need`` fitted ``width``, and the width to learn from it at the read."""
        checks.defer_check(need <= width, _OVERFLOW.format(what), self._learn)
        self._pending.append((key, need, grow))

    def _learn(self) -> None:
        pending, self._pending = self._pending, []
        needs: dict = {}
        for key, need, grow in pending:
            needs[key] = (max(needs[key][0], int(need)) if key in needs else int(need)), grow
        for key, (need, grow) in needs.items():
            self._capacity[key] = grow(need)

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
        # A large AuxK list (the default is d_in / 2), or one beside fp32 tiles: a GEMM over a block of dead
        # rows (see docs/design.md: cheaper than a fused list that wide while the dead set is small).
        pre, idx, _, _ = self._topk_select(x, W, c, k)
        bound = checks.current_dead_bound()
        if bound is None:
            bound = int(dead_mask.sum())  # no bound given (a caller other than SparseAutoencoder): read the count
        mm = self._kernels("scan_encoder").mm_fp32
        aux_pre, aux_idx, dead = fixed_lists.dead_rows_topk(x, W, c, dead_mask, k_aux, bound, mm)
        if checks.deferring():
            checks.defer_check(dead <= bound, _OVERFLOW.format("AuxK dead-row (SparseAutoencoder.dead_bound)"))
        elif int(dead) > bound:  # a stale bound (counters written from outside): size it exactly
            aux_pre, aux_idx, _ = fixed_lists.dead_rows_topk(x, W, c, dead_mask, k_aux, int(dead), mm)
        return pre, idx, aux_pre.to(pre.dtype), aux_idx

    def threshold_select(self, x, W_enc, b_enc, b_dec, cutoff):
        if not self._native(x):
            return super().threshold_select(x, W_enc, b_enc, b_dec, cutoff)
        B, n = x.shape[0], W_enc.shape[0]
        key, rows_key = ("threshold", B, n), ("threshold rows", B, n)
        capacity = self._capacity.get(key, 16)
        width = self._capacity.get(rows_key) if checks.deferring() else None
        c = self._fold(W_enc, b_enc, b_dec)
        W, chunk = self._gemm_weights(x, W_enc), self._scan_chunk(x)
        if chunk:
            out = self._kernels("scan_encoder").threshold_scan(x, W, c, cutoff, capacity, chunk, width=width)
        else:
            out = self._kernels("threshold_encoder").threshold_select(x, W, c, cutoff, capacity, width=width)
        if width is not None:
            pre, idx, need, row_need = out
            self._fixed(key, need, capacity, lambda v: _room(v, n), "ReLU/JumpReLU (per split)")
            self._fixed(rows_key, row_need, width, lambda v: _room(v, n), "ReLU/JumpReLU (per row)")
            return pre, idx
        pre, idx, need = out
        # Next call: room for this batch's need and more, so a similar batch needs no rerun.
        self._capacity[key], self._capacity[rows_key] = _room(need, n), _room(pre.shape[1], n)
        return pre, idx

    def batch_topk_select(self, x, W_enc, b_enc, b_dec, k):
        """The batch's B k best from each row's m best (fused top-k), m grown while some row has all of its
        m among the winners (then it might hold more); deferred: m from the last read, checked on the device."""
        if not self._native(x):
            return super().batch_topk_select(x, W_enc, b_enc, b_dec, k)
        B, n = x.shape[0], W_enc.shape[0]
        key = ("batchtopk", B, n, k)
        fixed = checks.deferring() and key in self._capacity  # a first call sizes m exactly, with reads
        m = self._capacity.get(key, min(n, 2 * k))
        while True:
            pre, idx, _, _ = self._topk_acc(x, W_enc, b_enc, b_dec, m)
            win = fixed_lists.batch_winners(pre, idx, n, min(B * k, B * n))
            if m == n:
                break
            full = win[:, -1].any()
            if fixed:  # a full row does not say how many more it holds: four times as many next time
                self._fixed(key, torch.where(full, min(n, 4 * m), m), m, lambda v: v, "BatchTopK candidate")
                break
            if not bool(full):
                break
            m = min(n, 2 * m)
        self._capacity[key] = m
        return fixed_lists.pack_winners(pre, idx, win, n, x.dtype)

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
