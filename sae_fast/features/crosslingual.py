"""Features shared across languages: which latents fire on the same concept in every language of a parallel
set, counted against a control where each language's concepts are shuffled (so a latent that fires on
everything, or by chance, counts in both).

    found = features.cross_lingual(model, tok, layer, sae, scale=scale)   # the packaged en/fr/de/zh set
    print(found.show())

A (latent, concept) pair counts when the latent fires (activation > 0 on some token) on the concept's sentence
in every language and on at most ``max_other`` of the other sentences.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import torch
from torch import Tensor

from .scan import encode_inputs
from .text import token_pieces


def parallel_sentences() -> tuple[list[str], list[dict]]:
    """(languages, concepts) of the packaged set: 36 hand-written concepts in English, French, German and
    Chinese, each concept a dict with "concept" and one sentence per language."""
    data = json.loads(resources.files(__package__).joinpath("data/parallel.json").read_text(encoding="utf-8"))
    return data["languages"], data["concepts"]


def _sentence_codes(model, tokenizer, layer, sae, sentences, scale, batch_size=16):
    """Per sentence: its latents' maximum activations (n,) dense, and the piece of the token where each peaks."""
    special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", []) or [])), dtype=torch.long)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    peak, where = [], []
    for s in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[s:s + batch_size], padding=True, return_tensors="pt")
        enc = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        values, indices = encode_inputs(model, layer, sae, enc, scale)
        if torch.isnan(values).any():
            raise ValueError(f"the SAE gave NaN activations on layer {layer!r}")
        B, T = enc["input_ids"].shape
        keep = enc["attention_mask"].bool() & ~torch.isin(enc["input_ids"], special)
        for r in range(B):
            rows = keep[r].nonzero().squeeze(1)
            if rows.numel() == 0:
                raise ValueError(f"sentence {sentences[s + r]!r} has no tokens")
            v, i = values[r * T + rows], indices[r * T + rows]
            dense = torch.zeros(rows.numel(), sae.n_latents).scatter_(1, i, v.clamp_min(0))  # one short sentence
            m, at = dense.max(0)
            peak.append(m)
            pieces = token_pieces(tokenizer, enc["input_ids"][r, rows].tolist())
            where.append((pieces, at))
    return torch.stack(peak), where


@dataclass
class CrossLingual:
    languages: list[str]
    concepts: list[str]
    count: int                 # (latent, concept) pairs firing in every language, specific
    shuffled: list[int]        # the same count for each shuffled control
    per_concept: list[int]     # how many latents each concept has
    best: list[dict]           # the most specific pairs: latent, concept, per language (token, value)

    def show(self, examples: int = 10) -> str:
        mean = sum(self.shuffled) / max(len(self.shuffled), 1)
        lines = [f"{len(self.concepts)} concepts in {', '.join(self.languages)}: {self.count} (latent, concept) pairs "
                 f"fire in every language; shuffled control: mean {mean:.1f}, max {max(self.shuffled, default=0)} "
                 f"over {len(self.shuffled)} shuffles",
                 "concepts with a shared latent: "
                 + ", ".join(f"{c} ({k})" for c, k in zip(self.concepts, self.per_concept) if k)]
        for b in self.best[:examples]:
            lines.append(f"  latent {b['latent']} on {b['concept']!r} (fires on {b['fires_on']} sentences): "
                         + "  ".join(f"{lang}:{tok!r} {v:.2f}" for lang, (tok, v) in b["tokens"].items()))
        return "\n".join(lines)


def cross_lingual(model, tokenizer, layer: str, sae, scale: float = 1.0, concepts: list[dict] | None = None,
                  languages: list[str] | None = None, max_other: float = 0.1, shuffles: int = 20,
                  seed: int = 0) -> CrossLingual:
    """Count the latents shared by every language of each concept (default: the packaged set), against
    ``shuffles`` controls with each language's concepts permuted; see the module docstring."""
    default_langs, default_concepts = parallel_sentences()
    concepts = default_concepts if concepts is None else concepts
    languages = default_langs if languages is None else languages
    if len(concepts) < 2 or len(languages) < 2:
        raise ValueError(f"need at least 2 concepts and 2 languages; got {len(concepts)} and {len(languages)}")
    missing = [(c.get("concept"), lang) for c in concepts for lang in languages if not c.get(lang)]
    if missing:
        raise ValueError(f"concepts lack a sentence in some language: {missing[:5]}")
    C, L = len(concepts), len(languages)
    peak, where = _sentence_codes(model, tokenizer, layer, sae, [c[lang] for c in concepts for lang in languages], scale)
    fired = (peak > 0).view(C, L, -1)
    total = fired.sum((0, 1))                               # (n,) sentences each latent fires on
    specific = (total - L) <= max_other * (C * L - L)

    def shared(perm: Tensor) -> Tensor:  # perm (L, C): the concept row each language contributes to group c
        return torch.stack([fired[perm[lang], lang] for lang in range(L)]).all(0) & specific  # (C, n)

    real = shared(torch.arange(C).expand(L, C))
    gen = torch.Generator().manual_seed(seed)
    controls = []
    for _ in range(shuffles):
        perm = torch.stack([torch.arange(C)] + [torch.randperm(C, generator=gen) for _ in range(L - 1)])
        controls.append(int(shared(perm).sum()))
    pairs = real.nonzero().tolist()
    strength = peak.view(C, L, -1)
    pairs.sort(key=lambda p: (int(total[p[1]]), -float(strength[p[0], :, p[1]].min())))
    best = []
    for c, i in pairs:
        toks = {}
        for lang in range(L):
            pieces, at = where[c * L + lang]
            j = int(at[i])  # a token holding part of a character shows the character its successor completes
            piece = next((p for p in pieces[j:] if p), pieces[j])
            toks[languages[lang]] = (piece.strip(), float(strength[c, lang, i]))
        best.append({"latent": i, "concept": concepts[c]["concept"], "fires_on": int(total[i]), "tokens": toks})
    return CrossLingual(languages, [c["concept"] for c in concepts], int(real.sum()), controls,
                        real.sum(1).tolist(), best)
