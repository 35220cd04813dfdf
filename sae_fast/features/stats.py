"""Feature statistics in one streaming pass, in memory bounded by the dictionary and the token budget (never
a tokens x n matrix): firing density, max and mean activation, a log-binned histogram, the top contexts, and
a uniform sample of firings from which quantile-bucket samples are drawn (typical firings, not only peaks).

    stats = features.top_examples(model, tok, layer, sae, texts, scale=scale)      # 100k tokens by default
    stats.density[i], stats.max_activation[i], stats.mean_activation[i], stats.hist[i]
    print(stats.show(i)); stats.quantile_samples(i); stats.choose(20, by="density")
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .scan import DEFAULT_TOKENS, scan
from .text import token_pieces, visible

# Histogram bins: log-spaced over [1e-3, 1e3) (below and above go to the end bins), the same for every feature.
HIST_EDGES = torch.logspace(-3, 3, 49)


def merge_top(best_score: Tensor, best: list[Tensor], lat: Tensor, score: Tensor, new: list[Tensor]) -> None:
    """Merge entries (latent, score, payloads) into each latent's running list of its ``top`` highest scores,
    in place. Only entries beating their latent's current last score and only the latents they touch are
    sorted; on equal scores the entry already kept stays ahead."""
    beats = score > best_score[lat, -1]
    if not beats.any():
        return
    lat, score, new = lat[beats], score[beats], [p[beats] for p in new]
    touched, row = torch.unique(lat, return_inverse=True)
    top = best_score.shape[1]
    rows = torch.cat([torch.arange(touched.numel()).repeat_interleave(top), row])
    scores = torch.cat([best_score[touched].reshape(-1), score])
    payload = [torch.cat([b[touched].reshape(-1), p]) for b, p in zip(best, new)]
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(rows[order], stable=True)]  # by latent, highest first within
    rows, scores, payload = rows[order], scores[order], [p[order] for p in payload]
    rank = torch.arange(rows.numel()) - torch.searchsorted(rows, torch.arange(touched.numel()))[rows]
    sel = rank < top
    r, k = touched[rows[sel]], rank[sel]
    best_score[r, k] = scores[sel]
    for b, p in zip(best, payload):
        b[r, k] = p[sel]


@dataclass
class FeatureStats:
    """Per latent statistics of one scan, and the scanned tokens (with their sparse codes) to show contexts."""
    n_tokens: int
    count: Tensor           # (n,) tokens on which the latent fired (activation > 0)
    total: Tensor           # (n,) float64 sum of its activations
    hist: Tensor            # (n, 48) firings per HIST_EDGES bin
    values: Tensor          # (n, top) strongest activations, -inf where fewer were seen
    tokens: Tensor          # (n, top) their global token numbers (into token_ids), -1 where none
    sample_values: Tensor   # (n, samples) a uniform sample of the latent's firings, -inf where fewer
    sample_tokens: Tensor   # (n, samples)
    token_ids: Tensor       # (m,) vocabulary id of each kept token
    doc: Tensor             # (m,) its window (a text longer than ctx_len spans several)
    position: Tensor        # (m,) its position in the window
    tokenizer: object
    code_values: Tensor | None = None    # (m, K) float16 sparse code of each token, to shade whole contexts
    code_indices: Tensor | None = None   # (m, K) int32
    _distinct: dict = field(default_factory=dict, repr=False)

    @property
    def n_latents(self) -> int:
        return self.count.numel()

    @property
    def density(self) -> Tensor:
        """(n,) fraction of scanned tokens on which each latent fired."""
        return self.count.double() / max(self.n_tokens, 1)

    @property
    def max_activation(self) -> Tensor:
        """(n,) each latent's largest activation seen (0 for latents that never fired)."""
        return self.values[:, 0].clamp_min(0.0)

    @property
    def mean_activation(self) -> Tensor:
        """(n,) mean activation over the tokens where the latent fired (0 where it never did)."""
        return (self.total / self.count.clamp_min(1)).float()

    def _check(self, latent) -> int:
        if not (isinstance(latent, int) and 0 <= latent < self.n_latents):
            raise ValueError(f"latent must be an integer in [0, {self.n_latents}); got {latent!r}")
        return latent

    def _window(self, t: int, before: int, after: int) -> range:
        doc = self.doc
        lo, hi = max(t - before, 0), min(t + after + 1, doc.numel())
        while doc[lo] != doc[t]:  # a window's tokens are contiguous in scan order
            lo += 1
        while doc[hi - 1] != doc[t]:
            hi -= 1
        return range(lo, hi)

    def activation_at(self, latent: int, tokens: range) -> list[float]:
        """The latent's activation on each of ``tokens`` (0 where inactive); needs the codes kept by the scan."""
        if self.code_values is None:
            raise ValueError("this scan kept no codes (keep_codes=False): only peak tokens can be shaded")
        v = self.code_values[tokens.start:tokens.stop].float()
        hit = self.code_indices[tokens.start:tokens.stop] == latent
        return (v * hit).sum(1).tolist()

    def context(self, latent: int, t: int, before: int = 12, after: int = 4) -> tuple[list[str], list[float], int]:
        """(token pieces, the latent's activation on each (0 without codes but the peak), index of token t)."""
        span = self._window(t, before, after)
        left = span.start - 1 if span.start > 0 and self.doc[span.start - 1] == self.doc[t] else None
        pieces = token_pieces(self.tokenizer, self.token_ids[span.start:span.stop].tolist(),
                              None if left is None else [int(self.token_ids[left])])
        acts = self.activation_at(latent, span) if self.code_values is not None else [0.0] * len(span)
        return pieces, acts, t - span.start

    def _key(self, t: int) -> tuple:
        # What makes a firing a repeat: the same token after the same few tokens (a causal LM's first
        # positions give identical activations for every window that starts alike: attention sinks).
        span = self._window(t, 4, 0)
        return tuple(self.token_ids[span.start:span.stop].tolist())

    def top_tokens(self, latent: int, dedup: bool = True) -> list[tuple[float, int]]:
        """(value, token number) of the latent's top firings, strongest first; repeats left out when ``dedup``."""
        out, keys = [], set()
        for value, t in zip(self.values[self._check(latent)].tolist(), self.tokens[latent].tolist()):
            if t < 0 or value <= 0:
                break
            if dedup:
                key = self._key(t)
                if key in keys:
                    continue
                keys.add(key)
            out.append((value, t))
        return out

    def distinct(self, latent: int) -> int:
        """How many of the latent's top contexts are not repeats of another."""
        if latent not in self._distinct:
            self._distinct[latent] = len(self.top_tokens(latent))
        return self._distinct[latent]

    def examples(self, latent: int, context: int = 8, dedup: bool = False) -> list[tuple[float, str]]:
        """(value, text with the activating token marked «like this») for each top example of ``latent``."""
        out = []
        for value, t in self.top_tokens(latent, dedup):
            pieces, _, at = self.context(latent, t, context, 2)
            # Newlines and tabs as ↵ ⇥ (one line per example); plain spaces stay spaces.
            flat = lambda ps: "".join(ps).replace("\r", "").replace("\n", "↵").replace("\t", "⇥")
            out.append((value, f"{flat(pieces[:at])}«{visible(pieces[at])}»{flat(pieces[at + 1:])}".strip()))
        return out

    def quantile_samples(self, latent: int, buckets: int = 4, per: int = 3) -> list[tuple[float, float, list]]:
        """The uniform sample of the latent's firings cut into ``buckets`` equal-count (quantile) buckets,
        lowest first: (low value, high value, [(value, token number), ...] up to ``per`` of them)."""
        v, t = self.sample_values[self._check(latent)], self.sample_tokens[latent]
        live = t >= 0
        order = torch.argsort(v[live], stable=True)
        v, t = v[live][order].tolist(), t[live][order].tolist()
        out = []
        for b in range(buckets):
            lo, hi = len(v) * b // buckets, len(v) * (b + 1) // buckets
            if hi > lo:
                picks = [lo + (hi - lo) * j // min(per, hi - lo) for j in range(min(per, hi - lo))]
                out.append((v[lo], v[hi - 1], [(v[j], t[j]) for j in picks]))
        return out

    def choose(self, count: int, by: str = "density", max_density: float = 0.01, min_distinct: int | None = None,
               latents: Iterable[int] | None = None) -> list[int]:
        """``count`` latents to show, sorted by ``by`` ("density" or "max"): latents that fired and whose top
        contexts hold at least ``min_distinct`` (default: half) non-repeats; those denser than ``max_density``
        (default 1% of tokens: denser ones are rarely specific) come only after all the others."""
        if by not in ("density", "max"):
            raise ValueError(f"by must be 'density' or 'max'; got {by!r}")
        key = self.density if by == "density" else self.max_activation.double()
        pool = torch.arange(self.n_latents) if latents is None else torch.tensor(list(latents), dtype=torch.long)
        pool = pool[self.count[pool] > 0]
        need = math.ceil(self.values.shape[1] / 2) if min_distinct is None else min_distinct
        rare, dense = [], []
        for i in pool[torch.argsort(key[pool], descending=True, stable=True)].tolist():
            if self.distinct(i) >= min(need, int(self.count[i])):
                (rare if self.density[i] <= max_density else dense).append(i)
                if len(rare) == count:
                    break
        return (rare + dense)[:count]

    def show(self, latent: int, context: int = 8) -> str:
        self._check(latent)
        lines = [f"latent {latent}: max activation {float(self.max_activation[latent]):.3f}, "
                 f"density {float(self.density[latent]):.4%}, mean {float(self.mean_activation[latent]):.3f}"]
        lines += [f"  {v:8.3f}  {text}" for v, text in self.examples(latent, context, dedup=True)]
        return "\n".join(lines)


TopExamples = FeatureStats  # the name before the statistics were added


def top_examples(model, tokenizer, layer: str, sae, texts: Iterable[str], top: int = 10, scale: float = 1.0,
                 ctx_len: int = 64, batch_size: int = 16, max_texts: int | None = None,
                 max_tokens: int | None = DEFAULT_TOKENS, exclude_special: bool = True, samples: int = 32,
                 keep_codes: bool = True, progress: bool = True, seed: int = 0) -> FeatureStats:
    """Scan ``texts`` through ``model`` (the SAE reads ``layer``'s output times ``scale``) and gather every
    latent's statistics: see FeatureStats. Texts are cut into windows of ``ctx_len`` tokens; special tokens
    and padding are skipped. Stops after ``max_texts`` texts or ``max_tokens`` kept tokens (default 100k;
    None scans everything). ``samples`` firings per latent are kept uniformly at random (random keys, seeded)
    for the quantile samples; ``keep_codes`` keeps each token's sparse code (6 bytes x K per token) to shade
    whole contexts. A progress bar goes to stderr when ``progress``."""
    for name, v in (("top", top), ("samples", samples)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}")
    n = sae.n_latents
    gen = torch.Generator().manual_seed(seed)
    count = torch.zeros(n, dtype=torch.long)
    total = torch.zeros(n, dtype=torch.float64)
    hist = torch.zeros(n * (HIST_EDGES.numel() - 1), dtype=torch.int32)
    best_v, best_t = torch.full((n, top), -float("inf")), torch.full((n, top), -1, dtype=torch.long)
    keys = torch.full((n, samples), -float("inf"))
    samp_v, samp_t = torch.full((n, samples), -float("inf")), torch.full((n, samples), -1, dtype=torch.long)
    ids, docs, pos, code_v, code_i = [], [], [], [], []
    n_tokens = 0
    for b in scan(model, tokenizer, layer, sae, texts, scale, ctx_len, batch_size, max_texts, max_tokens,
                  exclude_special, progress):
        m = b.token_ids.numel()
        if torch.isnan(b.values).any():  # never let NaN pass as "did not fire"
            raise ValueError(f"the SAE gave NaN activations on layer {layer!r} (NaN in the activations or the SAE weights)")
        ids.append(b.token_ids), docs.append(b.window), pos.append(b.position)
        if keep_codes:
            code_v.append(b.values.half()), code_i.append(b.indices.int())
        live = b.values > 0
        lat, val = b.indices[live], b.values[live]
        tok = (torch.arange(m) + b.first).unsqueeze(1).expand_as(b.indices)[live]
        count += torch.bincount(lat, minlength=n)
        total.index_add_(0, lat, val.double())
        bins = torch.bucketize(val, HIST_EDGES[1:-1])
        # Scatter the firings only: a bincount over all n x 48 bins per batch would cost O(n) each time.
        hist.index_add_(0, lat * (HIST_EDGES.numel() - 1) + bins, torch.ones_like(lat, dtype=torch.int32))
        merge_top(best_v, [best_t], lat, val, [tok])
        merge_top(keys, [samp_v, samp_t], lat, torch.rand(lat.numel(), generator=gen), [val, tok])
        n_tokens += m
    return FeatureStats(n_tokens, count, total, hist.view(n, -1), best_v, best_t, samp_v, samp_t,
                        torch.cat(ids), torch.cat(docs), torch.cat(pos), tokenizer,
                        torch.cat(code_v) if keep_codes else None, torch.cat(code_i) if keep_codes else None)
