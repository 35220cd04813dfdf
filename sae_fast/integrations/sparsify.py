"""EleutherAI sparsify (``eai-sparsify``) on sae-fast's fused ops.

    import sae_fast.integrations.sparsify as sf_sparsify
    sf_sparsify.patch()          # every SparseCoder, its Trainer included, now runs on sae-fast
    ...
    sf_sparsify.unpatch()        # or: with sf_sparsify.patched(): ...

Patched:
    SparseCoder.forward   encode (linear, ReLU, top-k), decode, AuxK's dead-latent top-k and Multi-TopK in
                          sae-fast's ops: one fused TopK node (``ops.topk_sae``) whose backward makes one
                          latent-sorted pass; the dense (N, num_latents) pre-activations are never formed.
                          Transcoder mode, the skip connection, ``total_variance`` and the outputs' meaning
                          are sparsify's; latent_indices come back in descending-activation order.
    SparseCoder.decode    sae-fast's sparse decode (sparsify's embedding_bag or Triton decoder otherwise).
Left alone: ``SparseCoder.encode`` (it promises the dense pre-activations, the very GEMM the patch avoids)
and the ``groupmax`` activation (its forward runs sparsify's code). Saving, loading and the trainer are
untouched; CPU tensors run on the C++ kernels, never on sparsify's Triton decoder.

One difference, by design: in a row with fewer than k positive pre-activations sparsify picks arbitrary
zeros and sends them encoder gradient through an inactive ReLU; here they get none (ReLU's gradient at 0).
"""
from __future__ import annotations

import torch

from .. import ops
from ._patching import Patcher, Target, compute_dtype, operand

TESTED = ("1.3.3",)
_CONFIG_FIELDS = {"activation", "k", "multi_topk", "skip_connection", "transcode"}


def _fast_forward(original):
    def forward(self, x, y=None, *, dead_mask=None, total_variance=None):
        if not _accelerated(self, x):
            return original(self, x, y, dead_mask=dead_mask, total_variance=total_variance)
        return _forward(self, x, y, dead_mask, total_variance)

    # sparsify's forward autocasts to bf16 on CUDA by itself; the replacement keeps that.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_bf16_supported())(forward)


def _accelerated(sc, x) -> bool:
    return (sc.cfg.activation == "topk" and sc.W_dec is not None and isinstance(x, torch.Tensor)
            and x.dim() == 2 and x.shape[0] > 0 and x.is_floating_point())


def _forward(sc, x, y, dead_mask, total_variance):
    from sparsify.sparse_coder import ForwardOutput

    dtype = compute_dtype(x, sc.dtype)
    W_enc, b_enc = operand(sc.encoder.weight, dtype), operand(sc.encoder.bias, dtype)
    W_dec = operand(sc.W_dec, dtype)
    # A transcoder encodes x as it is; an autoencoder subtracts b_dec first (the fused op does both ways).
    centre = torch.zeros_like(sc.b_dec) if sc.cfg.transcode else sc.b_dec
    xin = x.to(dtype)
    y = x if y is None else y

    num_dead = int(dead_mask.sum()) if dead_mask is not None else 0
    k_aux = y.shape[-1] // 2  # sparsify's heuristic (Appendix B.1 of Gao et al.)
    res = ops.topk_sae(xin, W_enc, b_enc, W_dec, operand(centre, dtype), sc.cfg.k,
                       dead_mask if num_dead else None, k_aux if num_dead else 0)
    sae_out = res.x_hat.to(sc.dtype)
    if sc.cfg.transcode:
        sae_out = sae_out + sc.b_dec
    if sc.W_skip is not None:
        sae_out = sae_out + x.to(sc.dtype) @ sc.W_skip.mT

    e = y - sae_out
    if total_variance is None:
        total_variance = (y - y.mean(0)).pow(2).sum()
    if num_dead:
        scale = min(num_dead / k_aux, 1.0)
        # sparsify's AuxK gradient reaches the decoder only (its encoder backward ignores pre_acts).
        e_hat = ops.sparse_decode(res.aux_values.detach().to(sc.dtype), res.aux_indices, sc.W_dec, None)
        auxk_loss = scale * (e_hat - e.detach()).pow(2).sum() / total_variance
    else:
        auxk_loss = sae_out.new_tensor(0.0)
    fvu = e.pow(2).sum() / total_variance

    top_acts, top_indices = res.values, res.indices.long()
    if sc.cfg.multi_topk:
        # As in sparsify: the 4k-latent reconstruction trains the decoder only, and replaces the outputs.
        with torch.no_grad():
            top_acts, top_indices = ops.topk_encode(xin, W_enc, b_enc, operand(centre, dtype), 4 * sc.cfg.k)
        top_indices = top_indices.long()
        sae_out = _decode(sc, top_acts, top_indices)
        multi_topk_fvu = (sae_out - y).pow(2).sum() / total_variance
    else:
        multi_topk_fvu = sae_out.new_tensor(0.0)
    return ForwardOutput(sae_out, top_acts, top_indices, fvu, auxk_loss, multi_topk_fvu)


def _decode(sc, top_acts, top_indices):
    return ops.sparse_decode(top_acts.to(sc.dtype), top_indices, sc.W_dec, sc.b_dec)


def _fast_decode(original):
    def decode(self, top_acts, top_indices):
        if self.W_dec is None or top_acts.dim() != 2 or top_acts.shape[0] == 0:
            return original(self, top_acts, top_indices)
        return _decode(self, top_acts, top_indices)
    return decode


def _targets():
    from sparsify.config import SparseCoderConfig
    from sparsify.sparse_coder import SparseCoder

    left = [("SparseCoder.encode", "returns the dense pre-activations, the GEMM the patch avoids"),
            ("activation='groupmax'", "runs sparsify's own forward")]
    missing = _CONFIG_FIELDS - set(SparseCoderConfig.__dataclass_fields__)
    if missing:
        return [], left + [("SparseCoder", f"SparseCoderConfig lacks {sorted(missing)}")]
    return [Target(SparseCoder, "forward", _fast_forward, ("self", "x", "y", "dead_mask", "total_variance")),
            Target(SparseCoder, "decode", _fast_decode, ("self", "top_acts", "top_indices"))], left


_patcher = Patcher("sparsify", "eai-sparsify", TESTED, _targets)
patch = _patcher.patch
unpatch = _patcher.unpatch
patched = _patcher.patched


def is_patched() -> bool:
    return _patcher.is_patched
