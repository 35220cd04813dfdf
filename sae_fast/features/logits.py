"""Logit effects: the tokens a feature's decoder direction promotes and suppresses when read straight through
a causal LM's unembedding (the direct path, as Neuronpedia's "top / bottom logits").

The direction is ``W_dec[i] / scale`` (one unit of activation in the model's own units). With
``final_norm=True`` (the default) it first goes through the final norm's per-channel part: LayerNorm's
centring and weight, RMSNorm's weight; the norm's division by the token's RMS is one positive number per
token, which changes no ranking, so it is left out, and so is LayerNorm's bias (the same for every feature).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_norm")


def _is_causal(model) -> bool:
    names = [type(model).__name__, *(getattr(model.config, "architectures", None) or [])]
    return any("CausalLM" in a or "LMHead" in a for a in names)


def unembedding(model) -> tuple[Tensor, nn.Module | None]:
    """(W_U (vocab, d), the final norm module or None) of a causal LM; a base model (AutoModel) works when
    its embeddings are tied to its head (GPT-2, SmolLM2). Other models raise ValueError."""
    if not _is_causal(model):
        raise ValueError(f"logit effects need a causal LM; {type(model).__name__} "
                         f"({getattr(model.config, 'architectures', None)}) is not one")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        if not getattr(model.config, "tie_word_embeddings", False):
            raise ValueError(f"{type(model).__name__} has no LM head and unties it from its embeddings: "
                             "load the model with its head (AutoModelForCausalLM)")
        head = model.get_input_embeddings()
    norms = [m for name, m in model.named_modules() if name.split(".")[-1] in _NORM_NAMES
             and not any(p.isdigit() for p in name.split("."))]  # the final one, not a block's own
    return head.weight.detach(), (norms[-1] if norms else None)


def _through_norm(x: Tensor, norm: nn.Module) -> Tensor:
    if isinstance(norm, nn.LayerNorm):
        x = x - x.mean(-1, keepdim=True)
    weight = getattr(norm, "weight", None)
    return x if weight is None else x * weight.detach().float()


@dataclass
class LogitEffects:
    latents: list[int]
    promoted: Tensor          # (L, k) vocabulary ids, most promoted first
    promoted_values: Tensor   # (L, k) their logit changes per unit of activation
    suppressed: Tensor        # (L, k) most suppressed first
    suppressed_values: Tensor
    final_norm: bool          # whether the final norm's weight (and LayerNorm's centring) was applied
    tokenizer: object = None

    def tokens(self, row: int, which: str = "promoted") -> list[tuple[str, float]]:
        ids, vals = (self.promoted, self.promoted_values) if which == "promoted" else (self.suppressed,
                                                                                        self.suppressed_values)
        dec = self.tokenizer.decode if self.tokenizer is not None else str
        return [(dec([i]) if self.tokenizer is not None else str(i), v) for i, v in zip(ids[row].tolist(),
                                                                                         vals[row].tolist())]

    def show(self, row: int) -> str:
        fmt = lambda pairs: "  ".join(f"{t!r} {v:+.2f}" for t, v in pairs)
        return (f"latent {self.latents[row]} (final norm {'applied' if self.final_norm else 'not applied'})\n"
                f"  promotes:   {fmt(self.tokens(row, 'promoted'))}\n  suppresses: {fmt(self.tokens(row, 'suppressed'))}")


def logit_effects(model, sae, latents: Iterable[int] | None = None, k: int = 10, scale: float = 1.0,
                  final_norm: bool = True, tokenizer=None, block: int = 256) -> LogitEffects:
    """The ``k`` tokens each latent (default: all, in blocks of ``block``) promotes and suppresses most."""
    n = sae.n_latents
    latents = list(range(n)) if latents is None else list(latents)
    bad = [i for i in latents if not (isinstance(i, int) and 0 <= i < n)]
    if bad:
        raise ValueError(f"latents must be integers in [0, {n}); got {bad[:5]}")
    W_U, norm = unembedding(model)
    if W_U.shape[1] != sae.d_in:
        raise ValueError(f"the model's unembedding reads width {W_U.shape[1]}, the SAE writes {sae.d_in}: "
                         "the SAE does not belong to this model")
    if not 1 <= k <= W_U.shape[0]:
        raise ValueError(f"k must be in [1, {W_U.shape[0]}]; got {k!r}")
    W_U = W_U.float()
    out = [[], [], [], []]
    for s in range(0, len(latents), block):
        with torch.no_grad():
            d = sae.W_dec.detach()[torch.tensor(latents[s:s + block], dtype=torch.long)].float().to(W_U.device) / scale
            if final_norm and norm is not None:
                d = _through_norm(d, norm)
            logits = d @ W_U.T
        hi, lo = torch.topk(logits, k, dim=1), torch.topk(logits, k, dim=1, largest=False)
        for lst, t in zip(out, (hi.indices, hi.values, lo.indices, lo.values)):
            lst.append(t.cpu())
    cat = [torch.cat(t) if t else torch.empty(0, k) for t in out]
    return LogitEffects(latents, cat[0].long(), cat[1], cat[2].long(), cat[3], final_norm and norm is not None,
                        tokenizer)
