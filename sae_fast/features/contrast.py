"""Concept search by contrast: the features that fire more on positive texts than on negative ones (how the
paper found "code error" and safety-relevant features), ranked by an effect size and filtered by specificity.

    found = features.contrast(model, tok, layer, sae, positives, negatives, scale=scale)
    print(found.show())                  # each feature's effect, firing rates, and its top positive contexts

Units are tokens (``level="token"``) or windows of ``ctx_len`` tokens (``level="text"``: a window's value is
the feature's maximum over it; a text longer than ``ctx_len`` counts as several windows).
"""
from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from .scan import DEFAULT_TOKENS, scan
from .stats import FeatureStats, top_examples


def _moments(batches, n: int, level: str) -> tuple[int, Tensor, Tensor, Tensor]:
    """(units, how many units each latent fired on, sum, sum of squares of its value per unit)."""
    units, fired = 0, torch.zeros(n, dtype=torch.long)
    s1, s2 = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for b in batches:
        live = b.values > 0
        lat, val = b.indices[live], b.values[live].double()
        if level == "text":  # one value per (window, latent): its maximum over the window
            win = (b.window.unsqueeze(1).expand_as(b.indices))[live]
            key, inv = torch.unique(win * n + lat, return_inverse=True)
            val = torch.zeros(key.numel(), dtype=torch.float64).scatter_reduce_(0, inv, val, "amax", include_self=False)
            lat = key % n
            units += int(torch.unique(b.window).numel())
        else:
            units += b.token_ids.numel()
        fired += torch.bincount(lat, minlength=n)
        s1.index_add_(0, lat, val)
        s2.index_add_(0, lat, val * val)
    return units, fired, s1, s2


@dataclass
class Contrast:
    latents: list[int]       # ranked, strongest effect first
    effect: Tensor           # (n,) Cohen's d of each latent's value per unit, positives vs negatives
    specificity: Tensor      # (n,) rate_pos / (rate_pos + rate_neg): 1 = fires on positives only
    rate_pos: Tensor         # (n,) fraction of positive units it fires on
    rate_neg: Tensor
    level: str
    positives: FeatureStats  # statistics of the positive set, for contexts

    def show(self, count: int = 10, examples: int = 3) -> str:
        lines = [f"features firing more on the positives ({self.level} level): effect size d, firing rates"]
        for i in self.latents[:count]:
            lines.append(f"latent {i}: d={float(self.effect[i]):.2f}  specificity {float(self.specificity[i]):.2f}  "
                         f"fires on {float(self.rate_pos[i]):.1%} of positive vs {float(self.rate_neg[i]):.1%} "
                         f"of negative {self.level}s")
            lines += [f"  {v:8.3f}  {t}" for v, t in self.positives.examples(i, dedup=True)[:examples]]
        return "\n".join(lines)


def contrast(model, tokenizer, layer: str, sae, positives: Iterable[str], negatives: Iterable[str],
             scale: float = 1.0, level: str = "token", min_specificity: float = 0.8, min_rate: float = 0.01,
             count: int = 50, ctx_len: int = 64, max_tokens: int | None = DEFAULT_TOKENS, progress: bool = True,
             **scan_kwargs) -> Contrast:
    """Rank latents by the effect size (Cohen's d, pooled variance) of their activation on ``positives``
    against ``negatives``; keep those firing on at least ``min_rate`` of positive units with specificity
    ``>= min_specificity``; return the ``count`` strongest, with the positives' statistics for contexts.
    ``max_tokens`` bounds each set."""
    if level not in ("token", "text"):
        raise ValueError(f"level must be 'token' or 'text'; got {level!r}")
    if not 0 <= min_specificity <= 1:
        raise ValueError(f"min_specificity must be in [0, 1]; got {min_specificity!r}")
    positives, negatives = list(positives), list(negatives)
    n = sae.n_latents
    sets = {}
    for name, texts in (("positives", positives), ("negatives", negatives)):
        try:
            sets[name] = _moments(scan(model, tokenizer, layer, sae, texts, scale, ctx_len, max_tokens=max_tokens,
                                       progress=progress, **scan_kwargs), n, level)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    (u_p, f_p, s_p, q_p), (u_n, f_n, s_n, q_n) = sets["positives"], sets["negatives"]
    mean_p, mean_n = s_p / u_p, s_n / u_n
    var = ((q_p / u_p - mean_p ** 2) + (q_n / u_n - mean_n ** 2)) / 2
    effect = ((mean_p - mean_n) / var.clamp_min(1e-12).sqrt()).float()
    rate_p, rate_n = (f_p.double() / u_p).float(), (f_n.double() / u_n).float()
    spec = rate_p / (rate_p + rate_n).clamp_min(1e-12)
    keep = (rate_p >= min_rate) & (spec >= min_specificity) & (effect > 0)
    order = torch.argsort(torch.where(keep, effect, torch.full_like(effect, -float("inf"))), descending=True)
    latents = order[: min(count, int(keep.sum()))].tolist()
    stats = top_examples(model, tokenizer, layer, sae, positives, scale=scale, ctx_len=ctx_len, max_tokens=max_tokens,
                         progress=False, **scan_kwargs)
    return Contrast(latents, effect, spec, rate_p, rate_n, level, stats)


_ERROR_MARKS = ("raise ", "Traceback", "Error", "assert", "except", "error", "warn", "fail", "Exception")


def error_code_sets(per_set: int = 300, lines: int = 8, seed: int = 0) -> tuple[list[str], list[str]]:
    """The demo's two sets from Python's own files: code that raises or shows an error (blocks of ``lines``
    lines of standard-library source with a ``raise`` statement, and the documentation's tracebacks) and
    ordinary code (blocks with none of raise/except/assert/error/warn/fail/Exception)."""
    from pydoc_data.topics import topics

    from ..activations.corpus import stdlib_sources

    pos, neg = [], []
    for text in topics.values():  # the docs' interactive examples: ">>> ..." followed by a traceback
        for part in text.split("\n\n"):
            if "Traceback (most recent call last)" in part:
                pos.append(part.strip())
    for path in stdlib_sources(seed):
        src = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for s in range(0, len(src) - lines, lines):
            block = "\n".join(src[s:s + lines])
            if not block.strip():
                continue
            if any(line.lstrip().startswith("raise ") for line in src[s:s + lines]):
                pos.append(block)
            elif not any(m in block for m in _ERROR_MARKS):
                neg.append(block)
        if len(pos) >= 2 * per_set and len(neg) >= 2 * per_set:
            break
    rng = random.Random(seed)
    rng.shuffle(pos), rng.shuffle(neg)
    return pos[:per_set], neg[:per_set]
