"""The sparse kernel interface, implemented in plain torch.

``SparseBackend`` is both the contract every fused backend fills in and the ``torch`` backend: any
device, memory bounded by a chunk of latents (the (B, n) pre-activations are never materialised), but
unfused. ``cpu`` and ``triton`` subclass it and override the primitives they implement natively.

Primitives (shapes as in reference.py; ``pre`` are pre-activations of the selected entries):
    topk_select(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux) -> pre (B,k), idx, aux_pre (B,k_aux)|None, aux_idx|None
    threshold_select(x, W_enc, b_enc, b_dec, cutoff (n,)) -> pre (B,K), idx (B,K): every entry with p > cutoff
    batch_topk_select(x, W_enc, b_enc, b_dec, k) -> pre (B,K), idx (B,K): the batch's B*k largest p
    sparse_decode(values, idx, W, bias) -> (B, d)
    gather_dot(g, idx, W) -> (B, K): <g[b], W[idx[b, j]]>
    latent_backward(idx, n, dp, xc, v, g, grad_dtype) -> dW_enc, db_enc, dW_dec (each None when its inputs are None):
        dW_enc[i] = sum_{idx[b,j]=i} dp[b,j] * xc[b];  db_enc[i] = sum dp[b,j];  dW_dec[i] = sum v[b,j] * g[b]
        in ``grad_dtype`` (fp32 gradients of master weights from 16-bit xc and g), else xc's and g's dtypes
    Matryoshka (``widths`` = cumulative prefix widths m_1 < ... < m_G = n; latent i is in group
    g(i) = #{p: m_p <= i}; S (G, B, d) = suffix sums over prefixes of dL/dx_hat_p, S_g = sum_{p >= g}):
    matryoshka_decode(values, idx, W, bias, widths) -> (G, B, d): prefix p sums the entries below m_p
    matryoshka_gather_dot(S, idx, W, widths) -> (B, K): <S[g(idx[b,j]), b], W[idx[b, j]]>
    matryoshka_latent_backward(idx, n, dp, xc, v, S, widths, grad_dtype) -> latent_backward's three
        gradients with dW_dec[i] = sum v[b,j] * S[g(i), b] (one pass for every prefix's loss)
    fused_adam_step(idx, pre, k_main, dp, xc, v, g, d_norm, params, moments, adam, project, renorm) -> None | (d,):
        the training step's latent-row work in one pass (sae_fast.optim.FusedAdam): the gradient rows
        above, the L1 and parallel-component terms, Adam and the decoder renormalisation, in place.
        Only backends whose ``fused_step_supported`` says so; the torch backend keeps the unfused path.
        Backends with ``fused_step_sums_encoder`` also return sum_e dp[e] * W_enc[idx[e]] (W_enc before the
        update; b_dec's gradient through the encoder is minus it), summed while the rows are in cache.
Variable-length lists are padded with (pre = -inf, idx = 0), so every activation maps padding to 0.
bf16/fp16 inputs are computed in fp32 (scores, sums); results come back in the inputs' dtype; indices are int32.
Weights may be fp32 beside 16-bit activations (master weights): selections come back in x's dtype,
sparse_decode and gather_dot in W's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..checks import check_indices, check_select_k

INDEX_DTYPE = reference.INDEX_DTYPE


def acc(t: Tensor) -> Tensor:
    """Low-precision storage is computed in fp32 (kernels accumulate in fp32); fp32 and fp64 stay as they are."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def cast_or_none(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` in ``dtype``; an absent tensor (an unused half of a result) stays None."""
    return None if t is None else t.to(dtype)


def _latent_chunk(B: int) -> int:
    # About 16 MiB of fp32 scores per chunk: large enough for an efficient matmul, small enough to bound memory.
    return max(256, (1 << 22) // max(B, 1))


def _merge_topk(best_v: Tensor | None, best_i: Tensor | None, v: Tensor, i: Tensor, k: int):
    """Running top-k merge. Earlier (lower-index) candidates come first, so position order is index order
    among equal scores and ``reference.topk_indices``'s lower-position tie rule gives lower-index ties."""
    if best_v is not None:
        v = torch.cat([best_v, v], dim=1)
        i = torch.cat([best_i, i], dim=1)
    keep = reference.topk_indices(v, min(k, v.shape[1]))
    return v.gather(1, keep), i.gather(1, keep)


def pad_rows(rows: Tensor, cols: Tensor, vals: Tensor, B: int) -> tuple[Tensor, Tensor]:
    """Turn (row, col, value) triples sorted by row then col into padded (B, K) lists (-inf, 0 padding)."""
    counts = torch.bincount(rows, minlength=B)
    K = max(int(counts.max()) if rows.numel() else 0, 1)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    pre = torch.full((B, K), float("-inf"), dtype=vals.dtype, device=vals.device)
    idx = torch.zeros((B, K), dtype=INDEX_DTYPE, device=vals.device)
    pre[rows, slot] = vals
    idx[rows, slot] = cols.to(INDEX_DTYPE)
    return pre, idx


class SparseBackend:
    """The ``torch`` backend: chunked, memory-bounded, unfused. Subclasses override what they do natively."""

    name = "torch"

    def supports(self, device: torch.device) -> bool:
        return True

    def runs_on(self) -> str:
        """Which tensors this backend runs on this machine, in words (``sae-fast info``)."""
        return "any device (plain torch, chunked over latents)"

    def _chunks(self, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor):
        xc = acc(x) - acc(b_dec)
        n, step = W_enc.shape[0], _latent_chunk(x.shape[0])
        for c0 in range(0, n, step):
            c1 = min(c0 + step, n)
            yield c0, c1, torch.addmm(acc(b_enc[c0:c1]), xc, acc(W_enc[c0:c1]).T)

    # ------------------------------------------------------------------ encoders
    def topk_select(self, x, W_enc, b_enc, b_dec, k, dead_mask=None, k_aux=0):
        check_select_k(k, W_enc.shape[0], k_aux if dead_mask is not None else 0)
        bv, bi, av, ai = self._topk_acc(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux)
        return cast_or_none(bv, x.dtype), bi, cast_or_none(av, x.dtype), ai

    def _topk_acc(self, x, W_enc, b_enc, b_dec, k, dead_mask=None, k_aux=0):
        """topk_select with scores left in the accumulation dtype."""
        B = x.shape[0]
        bv = bi = av = ai = None
        for c0, c1, p in self._chunks(x, W_enc, b_enc, b_dec):
            ids = torch.arange(c0, c1, device=x.device, dtype=INDEX_DTYPE).expand(B, -1)
            bv, bi = _merge_topk(bv, bi, p, ids, k)
            if k_aux:
                p_dead = p.masked_fill(~dead_mask[c0:c1], float("-inf"))
                av, ai = _merge_topk(av, ai, p_dead, ids, k_aux)
        return bv, bi, av, ai

    def threshold_select(self, x, W_enc, b_enc, b_dec, cutoff):
        parts = []
        for c0, c1, p in self._chunks(x, W_enc, b_enc, b_dec):
            rows, cols = (p > cutoff[c0:c1]).nonzero(as_tuple=True)
            parts.append((rows, cols + c0, p[rows, cols].to(x.dtype)))
        rows, cols, vals = (torch.cat(t) for t in zip(*parts))
        order = torch.sort(rows, stable=True).indices  # by row; chunks already ascend in latent order
        return pad_rows(rows[order], cols[order], vals[order], x.shape[0])

    def batch_topk_select(self, x, W_enc, b_enc, b_dec, k):
        # Exact global top B*k from per-row candidates: if some row has all m of its candidates among the
        # winners, it might hold more, so grow m and retry. Otherwise every entry left out of the
        # candidates ranks below a candidate that lost, so the winners among candidates are the true ones.
        B, n = x.shape[0], W_enc.shape[0]
        total = min(B * k, B * n)
        m = min(n, 2 * k)
        while True:
            pre, idx, _, _ = self._topk_acc(x, W_enc, b_enc, b_dec, m)
            # Global order: value descending, then flat index (row * n + latent) ascending.
            flat = torch.arange(B, device=x.device)[:, None] * n + idx.long()
            order = torch.sort(flat.reshape(-1)).indices  # candidates by flat index
            vals_sorted = pre.reshape(-1)[order]
            win_sorted = reference.topk_indices(vals_sorted[None], total)[0]
            win = torch.zeros(B * m, dtype=torch.bool, device=x.device)
            win[order[win_sorted]] = True
            win = win.view(B, m)
            if m == n or not win[:, -1].any():
                break
            m = min(n, 2 * m)
        rows, slots = win.nonzero(as_tuple=True)
        cols = idx[rows, slots].long()
        order = torch.sort(rows * n + cols).indices
        return pad_rows(rows[order], cols[order], pre[rows, slots][order].to(x.dtype), B)

    # ------------------------------------------------------------------ decoder
    def sparse_decode(self, values, idx, W, bias=None):
        check_indices(idx, W.shape[0])
        Wa = acc(W)
        if idx.shape[1] == 0:  # no active latent: embedding_bag cannot take empty bags of width 0
            out = Wa.new_zeros(idx.shape[0], W.shape[1])
            return (out if bias is None else out + acc(bias)).to(W.dtype)
        out = F.embedding_bag(idx, Wa, per_sample_weights=values.to(Wa.dtype), mode="sum")
        out = out if bias is None else out + acc(bias)
        return out.to(W.dtype)

    def gather_dot(self, g, idx, W):
        check_indices(idx, W.shape[0])
        Wa = acc(W)
        return torch.bmm(Wa[idx.long()], g.to(Wa.dtype).unsqueeze(-1)).squeeze(-1).to(W.dtype)

    # ------------------------------------------------------------------ backward
    def latent_backward(self, idx, n, dp=None, xc=None, v=None, g=None, grad_dtype=None):
        check_indices(idx, n)
        B, K = idx.shape
        flat = idx.reshape(-1).long()
        rows = torch.arange(B, device=idx.device).repeat_interleave(K)
        dW_enc = db_enc = dW_dec = None
        if dp is not None:
            dpf, xa = acc(dp).reshape(-1), acc(xc)
            db_enc = torch.zeros(n, dtype=xa.dtype, device=xa.device).index_add_(0, flat, dpf.to(xa.dtype))
            dW_enc = torch.zeros(n, xa.shape[1], dtype=xa.dtype, device=xa.device)
            dW_enc.index_add_(0, flat, dpf[:, None] * xa[rows])
            dW_enc, db_enc = dW_enc.to(grad_dtype or xc.dtype), db_enc.to(grad_dtype or xc.dtype)
        if v is not None:
            ga = acc(g)
            dW_dec = torch.zeros(n, ga.shape[1], dtype=ga.dtype, device=ga.device)
            dW_dec.index_add_(0, flat, acc(v).reshape(-1, 1) * ga[rows])
            dW_dec = dW_dec.to(grad_dtype or g.dtype)
        return dW_enc, db_enc, dW_dec

    # ------------------------------------------------------------------ fused training step
    fused_step_sums_encoder = False  # see fused_adam_step

    def fused_step_supported(self, dtype: torch.dtype) -> bool:
        """Whether ``fused_adam_step`` runs beside activations of ``dtype`` (fp32 weights and moments)."""
        return False

    def fused_adam_step(self, idx, pre, k_main, dp, xc, v, g, d_norm, params, moments, adam, project, renorm):
        """Apply one fused Adam step to W_enc, b_enc, W_dec in place (see the module docstring).

        idx, pre, dp, v (B, K): the step's entries; columns >= k_main are AuxK's, whose decoder rows are
        g[B:] (g has 2B rows then). pre == -inf marks padding (skipped). xc (B, d) = x - b_dec. d_norm (n,)
        or None: dL/d||W_dec_i||. params (W_enc, b_enc, W_dec); moments (m, s) pairs in the same order;
        adam (step_size, sqrt(1 - beta2^t), beta1, beta2, eps). Raises ValueError on an index outside [0, n)."""
        raise NotImplementedError(f"the {self.name} backend has no fused training step")

    # ------------------------------------------------------------------ Matryoshka (see the module docstring)
    @staticmethod
    def _groups(idx: Tensor, widths: list[int]) -> Tensor:
        """g(idx) (B, K) int64: the group of each entry's latent."""
        bounds = torch.tensor(widths[:-1], dtype=torch.int64, device=idx.device)
        return torch.bucketize(idx.long(), bounds, right=True)

    def matryoshka_decode(self, values, idx, W, bias, widths):
        check_indices(idx, W.shape[0])
        group = self._groups(idx, widths)
        parts = torch.stack([self.sparse_decode(torch.where(group == p, values, 0), idx, W, None).to(acc(W).dtype)
                             for p in range(len(widths))])
        out = parts.cumsum(0)
        return (out if bias is None else out + acc(bias)).to(W.dtype)

    def matryoshka_gather_dot(self, S, idx, W, widths):
        check_indices(idx, W.shape[0])
        Wa = acc(W)
        rows = torch.arange(idx.shape[0], device=idx.device)[:, None]
        s = acc(S)[self._groups(idx, widths), rows]  # (B, K, d): each entry's row of its group's S
        return (s.to(Wa.dtype) * Wa[idx.long()]).sum(-1).to(W.dtype)

    def matryoshka_latent_backward(self, idx, n, dp, xc, v, S, widths, grad_dtype=None):
        dW_enc = db_enc = dW_dec = None
        if dp is not None:
            dW_enc, db_enc, _ = self.latent_backward(idx, n, dp, xc, None, None, grad_dtype)
        if v is not None:
            check_indices(idx, n)
            B, K = idx.shape
            Sa = acc(S)
            rows = torch.arange(B, device=idx.device).repeat_interleave(K)
            s = Sa[self._groups(idx, widths).reshape(-1), rows]
            dW_dec = torch.zeros(n, Sa.shape[-1], dtype=Sa.dtype, device=Sa.device)
            dW_dec.index_add_(0, idx.reshape(-1).long(), acc(v).reshape(-1, 1).to(Sa.dtype) * s)
            dW_dec = dW_dec.to(grad_dtype or S.dtype)
        return dW_enc, db_enc, dW_dec
