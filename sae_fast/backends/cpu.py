"""The ``cpu`` backend: C++/OpenMP kernels from ``sae_fast._C`` over fp32 arithmetic.

Encoders multiply tile by tile into one reused buffer and fold each tile into per-row selections in C++
(running top-k with a threshold filter, threshold lists), so the (B, n) pre-activations never exist.
bf16/fp16 inputs are computed in fp32 (weights widened per tile) and cast back; fp64 goes to the torch
implementation to keep its precision.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (ImportError here unregisters the backend)
from ..checks import check_index_range, check_select_k
from .base import INDEX_DTYPE, SparseBackend, cast_or_none, pad_rows


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


def _i32(t: Tensor) -> Tensor:
    return t.to(INDEX_DTYPE).contiguous()


def _widths(widths) -> Tensor:
    return torch.tensor(list(widths), dtype=torch.int64)


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _threads(work: int = 1 << 30) -> int:
    # Small jobs run on one thread: waking the pool costs more than it saves, and on a loaded machine
    # a descheduled worker can hold every barrier for a whole time slice.
    return 1 if work < (1 << 18) else torch.get_num_threads()


def _storage(W: Tensor) -> Tensor:
    """Weights as the kernels read them: bf16 stays bf16 (widened in registers), the rest fp32."""
    return W.contiguous() if W.dtype == torch.bfloat16 else _f32(W)


def _centered(x: Tensor, b_dec: Tensor) -> Tensor:
    return (x.to(torch.float32) - b_dec.to(torch.float32)).contiguous()


def _global_winners(pre: Tensor, idx: Tensor, total: int, n: int) -> Tensor:
    """(B, M) mask of the ``total`` best candidates overall: value descending, then flat index
    row * n + latent ascending (reference.batch_topk_mask's order)."""
    B, M = pre.shape
    v = pre.reshape(-1)
    t = torch.kthvalue(v, v.numel() - total + 1).values  # the total-th largest value
    win = v > t
    need = total - int(win.sum())
    ties = (v == t).nonzero().squeeze(1)
    if need > 0 and ties.numel():
        keys = (torch.arange(B)[:, None] * n + idx.long()).reshape(-1)[ties]
        win[ties[torch.sort(keys).indices[:need]]] = True
    return win.view(B, M)


def _raise_if_bad(bad: int, idx: Tensor, n: int) -> None:
    # The kernels count indices outside [0, n) before reading any row and then do nothing: a bounds check
    # with no host read of a tensor. Only on that error path is the range read, for the message.
    if bad:
        check_index_range(idx, n)
        raise ValueError(f"indices must lie in [0, n_latents={n}); {bad} entries do not")


def _native(t: Tensor) -> bool:
    # fp64 keeps its precision through the torch implementation (gradcheck); the kernels compute in fp32.
    return t.dtype != torch.float64


# Score tiles: rows x cols fp32 (8 MiB) reused for every tile, whatever n is.
_TILE_ROWS, _TILE_COLS = 1024, 2048
# Threshold lists start with room for this many entries per row and then follow the last call's need.
_MIN_LIST_CAPACITY = 64


def _score_tiles(xc: Tensor, W: Tensor):
    """Yield (r0, r1, c0, c1, tile, ld): tile = xc[r0:r1] @ W[c0:c1].T in fp32, one reused buffer.

    torch.mm drives the multiply (MKL here): in one process it beat single-threaded BLAS tiles called from
    the C++ threads, see csrc/cpu/README.md. The tiling depends only on the shapes, never on the thread
    count. Low-precision weights are widened one tile at a time, so no fp32 copy of W is made."""
    B, n = xc.shape[0], W.shape[0]
    rows = min(B, _TILE_ROWS)
    cols = min(n, max(_TILE_COLS, (_TILE_ROWS * _TILE_COLS // rows) // 16 * 16))
    buf = torch.empty(rows, cols, dtype=torch.float32)
    for c0 in range(0, n, cols):
        c1 = min(n, c0 + cols)
        Wt = W[c0:c1] if W.dtype == torch.float32 else W[c0:c1].float()
        for r0 in range(0, B, rows):
            r1 = min(B, r0 + rows)
            tile = buf[: r1 - r0, : c1 - c0]
            torch.mm(xc[r0:r1], Wt.T, out=tile)
            yield r0, r1, c0, c1, tile, cols


class _RunningTopK:
    """Caller-owned state of _C.topk_scan for B rows."""

    def __init__(self, B: int, k: int):
        cap = _C.topk_capacity(k)
        self.k = k
        self.vals = torch.empty(B, cap, dtype=torch.float32)
        self.idx = torch.empty(B, cap, dtype=INDEX_DTYPE)
        self.count = torch.zeros(B, dtype=torch.int64)
        self.thr = torch.full((B,), float("-inf"))

    def ptrs(self, r0: int):
        return (self.vals[r0].data_ptr(), self.idx[r0].data_ptr(), self.count[r0:].data_ptr(),
                self.thr[r0:].data_ptr())

    def finish(self, threads: int):
        B = self.count.shape[0]
        pre = torch.empty(B, self.k, dtype=torch.float32)
        idx = torch.empty(B, self.k, dtype=INDEX_DTYPE)
        _C.topk_finish(B, self.k, self.vals.data_ptr(), self.idx.data_ptr(), self.count.data_ptr(),
                       pre.data_ptr(), idx.data_ptr(), threads)
        return pre, idx


class CpuBackend(SparseBackend):
    name = "cpu"

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def runs_on(self) -> str:
        return "CPU tensors (C++/OpenMP kernels in sae_fast._C)"

    # ------------------------------------------------------------------ encoders
    def __init__(self):
        self._list_capacity = _MIN_LIST_CAPACITY

    def topk_select(self, x, W_enc, b_enc, b_dec, k, dead_mask=None, k_aux=0):
        if not _native(x):
            return super().topk_select(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux)
        k_aux = k_aux if dead_mask is not None else 0
        check_select_k(k, W_enc.shape[0], k_aux)
        dead = dead_mask.to(torch.uint8).contiguous() if k_aux else None
        pre, idx, aux_pre, aux_idx = self._topk(_centered(x, b_dec), W_enc.contiguous(), _f32(b_enc), k, dead, k_aux)
        return cast_or_none(pre, x.dtype), idx, cast_or_none(aux_pre, x.dtype), aux_idx

    def _topk(self, xc, W, b, k, dead=None, k_aux=0):
        """Fused running top-k (and AuxK's top-k_aux over ``dead``) in fp32; never forms (B, n) scores."""
        B, n = xc.shape[0], W.shape[0]
        threads = _threads(B * n * xc.shape[1])
        top = _RunningTopK(B, k)
        aux = _RunningTopK(B, k_aux) if k_aux else None
        for r0, r1, c0, c1, tile, ld in _score_tiles(xc, W):
            aux_ptrs = aux.ptrs(r0) if aux else (0, 0, 0, 0)
            _C.topk_scan(tile.data_ptr(), ld, b.data_ptr(), r1 - r0, c0, c1 - c0, k, *top.ptrs(r0),
                         _ptr(dead), k_aux, *aux_ptrs, threads)
        pre, idx = top.finish(threads)
        aux_pre, aux_idx = aux.finish(threads) if aux else (None, None)
        return pre, idx, aux_pre, aux_idx

    def threshold_select(self, x, W_enc, b_enc, b_dec, cutoff):
        if not _native(x):
            return super().threshold_select(x, W_enc, b_enc, b_dec, cutoff)
        xc, W, b, cut = _centered(x, b_dec), W_enc.contiguous(), _f32(b_enc), _f32(cutoff)
        B = xc.shape[0]
        cap = self._list_capacity
        vals, idx, count = self._threshold_lists(xc, W, b, cut, cap)
        K = max(int(count.max()), 1)
        pre = torch.full((B, K), float("-inf"))
        out_idx = torch.zeros(B, K, dtype=INDEX_DTYPE)
        pre[:, : min(K, cap)] = vals[:, :K]
        out_idx[:, : min(K, cap)] = idx[:, :K]
        over = (count > cap).nonzero().squeeze(1)
        if over.numel():  # rows with more hits than room: recompute just them, now that their counts are known
            sub_vals, sub_idx, _ = self._threshold_lists(xc[over], W, b, cut, K)
            pre[over], out_idx[over] = sub_vals, sub_idx
        pad = torch.arange(K)[None, :] >= count[:, None]
        pre.masked_fill_(pad, float("-inf"))
        out_idx.masked_fill_(pad, 0)
        self._list_capacity = max(_MIN_LIST_CAPACITY, (K + K // 4 + 15) // 16 * 16)
        return pre.to(x.dtype), out_idx

    @staticmethod
    def _threshold_lists(xc, W, b, cutoff, cap):
        B, n = xc.shape[0], W.shape[0]
        threads = _threads(B * n * xc.shape[1])
        vals = torch.empty(B, cap, dtype=torch.float32)
        idx = torch.empty(B, cap, dtype=INDEX_DTYPE)
        count = torch.zeros(B, dtype=torch.int64)
        for r0, r1, c0, c1, tile, ld in _score_tiles(xc, W):
            _C.threshold_scan(tile.data_ptr(), ld, b.data_ptr(), cutoff.data_ptr(), r1 - r0, c0, c1 - c0, cap,
                              vals[r0].data_ptr(), idx[r0].data_ptr(), count[r0:].data_ptr(), threads)
        return vals, idx, count

    def batch_topk_select(self, x, W_enc, b_enc, b_dec, k):
        """Exact global top B*k from per-row candidates (see the torch backend's proof): rows whose
        candidates all win might hold more winners, so only those rows are recomputed with more."""
        if not _native(x):
            return super().batch_topk_select(x, W_enc, b_enc, b_dec, k)
        xc, W, b = _centered(x, b_dec), W_enc.contiguous(), _f32(b_enc)
        B, n = xc.shape[0], W.shape[0]
        total = min(B * k, B * n)
        m = min(n, 2 * k)
        pre, idx, _, _ = self._topk(xc, W, b, m)
        per_row = torch.full((B,), m)
        while True:
            win = _global_winners(pre, idx, total, n)
            grow = ((win.sum(1) == per_row) & (per_row < n)).nonzero().squeeze(1)
            if not grow.numel():
                break
            m = min(n, 4 * int(per_row[grow].max()))
            sub_pre, sub_idx, _, _ = self._topk(xc[grow], W, b, m)
            if m > pre.shape[1]:  # widen; padding (-inf) never wins, there are >= B*k real candidates
                pad = m - pre.shape[1]
                pre = torch.cat([pre, pre.new_full((B, pad), float("-inf"))], 1)
                idx = torch.cat([idx, idx.new_zeros(B, pad)], 1)
            pre[grow], idx[grow] = sub_pre, sub_idx
            per_row[grow] = m
        rows, slots = win.nonzero(as_tuple=True)
        cols = idx[rows, slots].long()
        order = torch.sort(rows * n + cols).indices  # each row's winners in ascending latent order
        return pad_rows(rows[order], cols[order], pre[rows, slots][order].to(x.dtype), B)

    # ------------------------------------------------------------------ decoder
    def sparse_decode(self, values, idx, W, bias=None):
        if not _native(W):
            return super().sparse_decode(values, idx, W, bias)
        B, K = idx.shape
        n, d = W.shape
        values, idx, Ws = _f32(values), _i32(idx), _storage(W)
        bias_f = None if bias is None else _f32(bias)
        out = torch.empty(B, d, dtype=torch.float32)
        _raise_if_bad(_C.sparse_decode(values.data_ptr(), idx.data_ptr(), Ws.data_ptr(), Ws.dtype == torch.bfloat16,
                                       _ptr(bias_f), out.data_ptr(), B, K, n, d, _threads(B * K * d)), idx, n)
        return out.to(W.dtype)

    def gather_dot(self, g, idx, W):
        if not _native(W):
            return super().gather_dot(g, idx, W)
        B, K = idx.shape
        n, d = W.shape
        g, idx, Ws = _f32(g), _i32(idx), _storage(W)
        out = torch.empty(B, K, dtype=torch.float32)
        _raise_if_bad(_C.gather_dot(g.data_ptr(), idx.data_ptr(), Ws.data_ptr(), Ws.dtype == torch.bfloat16,
                                    out.data_ptr(), B, K, n, d, _threads(B * K * d)), idx, n)
        return out.to(W.dtype)

    def latent_backward(self, idx, n, dp=None, xc=None, v=None, g=None, grad_dtype=None):
        B, K = idx.shape
        ref = xc if xc is not None else g
        if not _native(ref):
            return super().latent_backward(idx, n, dp, xc, v, g, grad_dtype)
        d = ref.shape[1]
        idx = _i32(idx)
        # Gradients of bf16 weights are written in bf16 by the kernel (one rounding of the fp32 sums);
        # other dtypes get fp32 and a cast.
        want = grad_dtype or ref.dtype
        out = torch.bfloat16 if want == torch.bfloat16 else torch.float32
        dW_enc = db_enc = dW_dec = None
        if dp is not None:
            dp, xc = _f32(dp), _f32(xc)
            dW_enc = torch.empty(n, d, dtype=out)
            db_enc = torch.empty(n, dtype=out)
        if v is not None:
            v, g = _f32(v), _f32(g)
            dW_dec = torch.empty(n, d, dtype=out)
        _raise_if_bad(_C.latent_backward(idx.data_ptr(), B, K, n, d, _ptr(dp), _ptr(xc), _ptr(v), _ptr(g),
                                         _ptr(dW_enc), _ptr(db_enc), _ptr(dW_dec), out == torch.bfloat16,
                                         _threads(n * d + B * K * d)), idx, n)
        return tuple(cast_or_none(t, want) for t in (dW_enc, db_enc, dW_dec))

    # ------------------------------------------------------------------ fused training step
    fused_step_sums_encoder = True

    def fused_step_supported(self, dtype: torch.dtype) -> bool:
        return dtype == torch.float32

    def fused_adam_step(self, idx, pre, k_main, dp, xc, v, g, d_norm, params, moments, adam, project, renorm):
        W_enc, b_enc, W_dec = params
        B, K = idx.shape
        n, d = W_enc.shape
        for name, t in zip(("W_enc", "b_enc", "W_dec"), params):
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise TypeError(f"{name} must be a contiguous float32 tensor for the fused step; got {t.dtype}")
        for t in moments:
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise TypeError("Adam moments must be contiguous float32 tensors for the fused step")
        idx, pre, dp, v, xc, g = _i32(idx), _f32(pre), _f32(dp), _f32(v), _f32(xc), _f32(g)
        d_norm = None if d_norm is None else _f32(d_norm)
        step_size, bc2_sqrt, beta1, beta2, eps = adam
        enc_sum = torch.empty(d, dtype=torch.float32)
        # Bounds are checked inside the kernel's sort (no host read of a tensor); nothing is updated if bad.
        bad = _C.fused_adam_step(idx.data_ptr(), pre.data_ptr(), B, K, k_main, n, d, dp.data_ptr(), xc.data_ptr(),
                                 v.data_ptr(), g.data_ptr(), _ptr(d_norm), *(t.data_ptr() for t in params),
                                 *(t.data_ptr() for t in moments), step_size, bc2_sqrt, beta1, beta2, eps,
                                 bool(project), bool(renorm), enc_sum.data_ptr(), _threads(n * d + B * K * d))
        _raise_if_bad(bad, idx, n)
        return enc_sum


    # ------------------------------------------------------------------ Matryoshka (csrc/cpu/matryoshka.h)
    def matryoshka_decode(self, values, idx, W, bias, widths):
        if not _native(W):
            return super().matryoshka_decode(values, idx, W, bias, widths)
        B, K = idx.shape
        n, d = W.shape
        values, idx, Ws, w = _f32(values), _i32(idx), _storage(W), _widths(widths)
        bias_f = None if bias is None else _f32(bias)
        out = torch.empty(len(widths), B, d, dtype=torch.float32)
        _raise_if_bad(_C.matryoshka_decode(values.data_ptr(), idx.data_ptr(), Ws.data_ptr(), Ws.dtype == torch.bfloat16,
                                           _ptr(bias_f), w.data_ptr(), len(widths), out.data_ptr(), B, K, n, d,
                                           _threads(B * K * d)), idx, n)
        return out.to(W.dtype)

    def matryoshka_gather_dot(self, S, idx, W, widths):
        if not _native(W):
            return super().matryoshka_gather_dot(S, idx, W, widths)
        B, K = idx.shape
        n, d = W.shape
        S, idx, Ws, w = _f32(S), _i32(idx), _storage(W), _widths(widths)
        out = torch.empty(B, K, dtype=torch.float32)
        _raise_if_bad(_C.matryoshka_gather_dot(S.data_ptr(), idx.data_ptr(), Ws.data_ptr(), Ws.dtype == torch.bfloat16,
                                               w.data_ptr(), len(widths), out.data_ptr(), B, K, n, d,
                                               _threads(B * K * d)), idx, n)
        return out.to(W.dtype)

    def matryoshka_latent_backward(self, idx, n, dp, xc, v, S, widths, grad_dtype=None):
        ref = xc if xc is not None else S
        if not _native(ref):
            return super().matryoshka_latent_backward(idx, n, dp, xc, v, S, widths, grad_dtype)
        B, K = idx.shape
        d = ref.shape[-1]
        idx, w = _i32(idx), _widths(widths)
        want = grad_dtype or ref.dtype
        out = torch.bfloat16 if want == torch.bfloat16 else torch.float32
        dW_enc = db_enc = dW_dec = None
        if dp is not None:
            dp, xc = _f32(dp), _f32(xc)
            dW_enc, db_enc = torch.empty(n, d, dtype=out), torch.empty(n, dtype=out)
        if v is not None:
            v, S = _f32(v), _f32(S)
            dW_dec = torch.empty(n, d, dtype=out)
        _raise_if_bad(_C.matryoshka_latent_backward(idx.data_ptr(), B, K, n, d, _ptr(dp), _ptr(xc), _ptr(v), _ptr(S),
                                                    w.data_ptr(), len(widths), _ptr(dW_enc), _ptr(db_enc),
                                                    _ptr(dW_dec), out == torch.bfloat16,
                                                    _threads(n * d + B * K * d)), idx, n)
        return tuple(cast_or_none(t, want) for t in (dW_enc, db_enc, dW_dec))
