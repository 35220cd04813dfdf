"""Steer a running model through an SAE's features: clamp, add or ablate latents at a hooked module.

    from sae_fast.steer import steer
    with steer(model, "transformer.h.6", sae, clamp={1234: 5 * max_act}, scale=act_scale):
        model.generate(**inputs)        # every forward pass in the block is steered

The hooked module's output ``x`` (any leading shape, width d) becomes

    x + sum_i (target_i - f_i) * W_dec[i] / scale

where ``f_i`` is latent i's activation on ``x * scale`` (the SAE's input units; ``scale`` is the activation
scale it was trained with, 1 if none). That is exactly "decode the edited code, add back the SAE's own
reconstruction error": the error is kept, so an intervention that leaves every value as it is changes
nothing, and only the named latents move. Clamping a feature to 5x its maximum activation over a corpus
(``features.top_examples(...).max_activation``) is the Scaling Monosemanticity experiment.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from .activations.hooks import first_tensor, resolve_layers


def _replace_first(output, new: Tensor):
    """``output`` with its activation tensor (what ``first_tensor`` finds) replaced by ``new``."""
    if isinstance(output, Tensor):
        return new
    if isinstance(output, (tuple, list)):
        items = list(output)
        items[0] = _replace_first(items[0], new)
        return type(output)(items) if isinstance(output, list) else tuple(items)
    if isinstance(output, dict):  # ModelOutput: its first field is the hidden state
        key = next(iter(output))
        output[key] = _replace_first(output[key], new)
        return output
    raise TypeError(f"cannot replace the activation in a {type(output).__name__}")


class Steering:
    """Context manager that edits a module's output through SAE latents (see the module docstring).

    ``clamp``: {latent: value} sets the latent's activation to value (SAE units); ``add``: {latent: amount}
    adds amount to it; ``ablate``: latents set to 0. ``positions`` (a slice or index over the sequence
    axis, the second-to-last one) limits the edit to some tokens; default all. ``positions="prompt"`` or
    ``"generated"`` with ``prompt_len`` counts absolute positions over the forward passes made inside the
    ``with`` block (``generate`` with a KV cache feeds the prompt, then one token per pass): the edit
    reaches only the first ``prompt_len`` positions, or only those after them."""

    def __init__(self, model: nn.Module, layer: str, sae, clamp: Mapping[int, float] | None = None,
                 add: Mapping[int, float] | None = None, ablate: Iterable[int] = (), scale: float = 1.0,
                 positions=None, prompt_len: int | None = None):
        if isinstance(positions, str) and (positions not in ("prompt", "generated", "all") or prompt_len is None):
            raise ValueError(f"positions={positions!r}: 'prompt' and 'generated' need prompt_len=; 'all', a slice "
                             "or an index otherwise")
        names = resolve_layers(model, layer)
        if len(names) != 1:
            raise ValueError(f"steer one layer at a time; {layer!r} matches {names}")
        self.module = dict(model.named_modules())[names[0]]
        self.layer, self.sae = names[0], sae
        clamp, add, ablate = dict(clamp or {}), dict(add or {}), list(ablate)
        n = sae.n_latents
        for i in [*clamp, *add, *ablate]:
            if not (isinstance(i, int) and 0 <= i < n):
                raise ValueError(f"latent {i!r} is not an integer in [0, {n})")
        overlap = (set(clamp) & set(add)) | (set(clamp) & set(ablate)) | (set(add) & set(ablate))
        if overlap:
            raise ValueError(f"latents {sorted(overlap)} are named twice (clamp, add and ablate exclude each other)")
        if not (scale > 0):
            raise ValueError(f"scale must be > 0; got {scale!r}")
        self.clamp = {**clamp, **{i: 0.0 for i in ablate}}
        self.add = add
        self.scale = float(scale)
        self.positions = None if positions == "all" else positions
        self.prompt_len = prompt_len
        self._offset = 0  # absolute position of the next token, for "prompt" / "generated"
        self._handle = None

    def edit(self, x: Tensor) -> Tensor:
        """The steered version of an activation tensor ``x`` (..., d)."""
        sae, d = self.sae, self.sae.d_in
        if x.shape[-1] != d:
            raise ValueError(f"layer {self.layer!r} outputs width {x.shape[-1]}, the SAE reads {d}")
        latents = list(self.clamp) + list(self.add)
        if not latents:
            return x
        W = sae.W_dec.detach()
        flat = x.reshape(-1, d).to(W.dtype) * self.scale
        delta = torch.zeros(flat.shape[0], len(latents), dtype=W.dtype, device=x.device)
        if self.clamp:
            with torch.no_grad():
                values, indices = sae.encode(flat)
            ids = torch.tensor(list(self.clamp), device=x.device)
            hit = indices.long().unsqueeze(-1) == ids  # (rows, K, clamped)
            current = (values.unsqueeze(-1).to(W.dtype) * hit).sum(1)
            target = torch.tensor(list(self.clamp.values()), dtype=W.dtype, device=x.device)
            delta[:, :len(ids)] = target - current
        if self.add:
            delta[:, len(self.clamp):] = torch.tensor(list(self.add.values()), dtype=W.dtype, device=x.device)
        change = (delta @ W[torch.tensor(latents, device=W.device)] / self.scale).reshape(x.shape)
        if isinstance(self.positions, str):
            T = x.shape[-2] if x.dim() > 1 else 1
            at = torch.arange(self._offset, self._offset + T, device=x.device)
            self._offset += T
            mask = (at < self.prompt_len) if self.positions == "prompt" else (at >= self.prompt_len)
            change = change * mask.reshape(*([1] * (x.dim() - 2)), T, 1).to(change.dtype)
        elif self.positions is not None:
            mask = torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
            mask[..., self.positions] = True
            change = change * mask.unsqueeze(-1)
        return x + change.to(x.dtype)

    def _hook(self, module, args, output):
        return _replace_first(output, self.edit(first_tensor(output, self.layer)))

    def __enter__(self) -> Steering:
        self._offset = 0
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> bool:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return False


def steer(model: nn.Module, layer: str, sae, clamp: Mapping[int, float] | None = None,
          add: Mapping[int, float] | None = None, ablate: Iterable[int] = (), scale: float = 1.0,
          positions=None, prompt_len: int | None = None) -> Steering:
    """``with steer(model, layer, sae, clamp={i: v}):`` every forward pass of ``layer`` is steered."""
    return Steering(model, layer, sae, clamp, add, ablate, scale, positions, prompt_len)
