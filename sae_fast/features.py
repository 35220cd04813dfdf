"""What a feature means: its top-activating tokens over a corpus, its nearest neighbours by decoder
direction, and the features that fire on a prompt.

    from sae_fast import features
    top = features.top_examples(model, tok, "encoder.layer.3", sae, texts, scale=act_scale)
    print(top.show(123))                         # the 10 strongest contexts of latent 123, «token» marked
    sims, ids = features.decoder_neighbours(sae, 123)
    for token, active in features.on_prompt(model, tok, "encoder.layer.3", sae, "def f(x):", scale=act_scale):
        ...

``scale`` is the activation scale the SAE was trained with (``sae-fast train`` writes it to
normalization.json beside the SAE); activations are multiplied by it before encoding.
"""
from __future__ import annotations

import html
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .activations.corpus import encode_prompt, window_batches
from .activations.hooks import LayerCapture


def decoder_neighbours(sae, latent: int, k: int = 10) -> tuple[Tensor, Tensor]:
    """The ``k`` latents whose decoder directions are closest to ``latent``'s by cosine similarity
    (itself excluded): (similarities, latent ids), most similar first."""
    n = sae.n_latents
    if not (isinstance(latent, int) and 0 <= latent < n):
        raise ValueError(f"latent must be an integer in [0, {n}); got {latent!r}")
    k = min(k, n - 1)
    W = sae.W_dec.detach().float()
    unit = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sims = unit @ unit[latent]
    sims[latent] = -float("inf")
    best = torch.topk(sims, k)
    return best.values, best.indices


def _encode_inputs(model, layer: str, sae, enc: dict, scale: float) -> tuple[Tensor, Tensor]:
    """The SAE code of every position of a tokenized batch: (values (B*T, K), indices (B*T, K)) on CPU."""
    device = next(model.parameters()).device
    with LayerCapture(model, layer) as cap:
        if len(cap.names) != 1:
            raise ValueError(f"name one layer; {layer!r} matches {cap.names}")
        acts = cap.run(**{k: v.to(device) for k, v in enc.items()})[cap.names[0]]
    if acts.shape[-1] != sae.d_in:
        raise ValueError(f"layer {layer!r} outputs width {acts.shape[-1]}, the SAE reads {sae.d_in}")
    with torch.no_grad():
        values, indices = sae.encode(acts.reshape(-1, acts.shape[-1]).to(sae.W_dec) * scale)
    return values.float().cpu(), indices.long().cpu()


@dataclass
class TopExamples:
    """Per latent, its strongest activations over the scanned tokens, strongest first."""
    values: Tensor            # (n, top) activation values, -inf where fewer were seen
    tokens: Tensor            # (n, top) global token ids (into ``token_ids``), -1 where none
    token_ids: Tensor         # (all kept tokens,) vocabulary ids
    doc: Tensor               # (all kept tokens,) which text each token came from
    position: Tensor          # (all kept tokens,) its position in that text
    tokenizer: object

    @property
    def max_activation(self) -> Tensor:
        """(n,) each latent's largest activation seen (0 for latents that never fired)."""
        return self.values[:, 0].clamp_min(0.0)

    def examples(self, latent: int, context: int = 8) -> list[tuple[float, str]]:
        """(value, text with the activating token marked «like this») for each top example of ``latent``."""
        out, dec = [], self.tokenizer.decode
        for value, t in zip(self.values[latent].tolist(), self.tokens[latent].tolist()):
            if t < 0 or value <= 0:
                break
            # A text's tokens are contiguous in the scan's order, so its neighbours are t-context .. t+2.
            near = [j for j in range(max(t - context, 0), min(t + 3, self.doc.numel())) if self.doc[j] == self.doc[t]]
            before = [int(self.token_ids[j]) for j in near if j < t]
            after = [int(self.token_ids[j]) for j in near if j > t]
            out.append((value, f"{dec(before)} «{dec([int(self.token_ids[t])])}» {dec(after)}".strip()))
        return out

    def show(self, latent: int, context: int = 8) -> str:
        lines = [f"latent {latent}: max activation {float(self.max_activation[latent]):.3f}"]
        lines += [f"  {v:8.3f}  {text}" for v, text in self.examples(latent, context)]
        return "\n".join(lines)


def top_examples(model, tokenizer, layer: str, sae, texts: Iterable[str], top: int = 10, scale: float = 1.0,
                 ctx_len: int = 64, batch_size: int = 16, max_texts: int | None = None,
                 max_tokens: int | None = None, exclude_special: bool = True) -> TopExamples:
    """Scan ``texts`` through ``model`` and keep, for every latent, its ``top`` strongest tokens. Texts are
    cut into windows of ``ctx_len`` tokens; special tokens and padding are skipped. The scan stops after
    ``max_texts`` texts or once ``max_tokens`` tokens were kept, whichever comes first."""
    n = sae.n_latents
    best_v = torch.full((n, top), -float("inf"))
    best_t = torch.full((n, top), -1, dtype=torch.long)
    ids_all, doc_all, pos_all = [], [], []
    seen = 0
    texts = iter(texts) if max_texts is None else itertools.islice(texts, max_texts)
    # Long texts are cut into ctx_len windows (each scanned whole); a window is a "doc" below.
    for enc, keep in window_batches(tokenizer, texts, ctx_len, batch_size, exclude_special=exclude_special):
        input_ids = enc["input_ids"]
        values, indices = _encode_inputs(model, layer, sae, enc, scale)
        B, T = input_ids.shape
        keep_flat = keep.reshape(-1)
        rows = keep_flat.nonzero().squeeze(1)
        base = sum(t.numel() for t in ids_all)
        ids_all.append(input_ids.reshape(-1)[rows])
        doc_all.append((torch.arange(B).repeat_interleave(T) + seen)[rows])
        pos_all.append(torch.arange(T).repeat(B)[rows])
        v, i = values[rows], indices[rows]
        token = (torch.arange(rows.numel()) + base).unsqueeze(1).expand_as(i)
        live = v > 0
        # Merge the batch's (latent, value, token) entries into each latent's running top list (the
        # running entries first, so on equal values the earlier token stays ahead).
        lat = torch.cat([torch.arange(n).repeat_interleave(top), i[live]])
        val = torch.cat([best_v.reshape(-1), v[live]])
        tok = torch.cat([best_t.reshape(-1), token[live]])
        order = torch.argsort(val, descending=True, stable=True)
        order = order[torch.argsort(lat[order], stable=True)]  # by latent, strongest first within
        lat, val, tok = lat[order], val[order], tok[order]
        start = torch.searchsorted(lat, torch.arange(n))
        rank = torch.arange(lat.numel()) - start[lat]
        sel = rank < top
        best_v[lat[sel], rank[sel]] = val[sel]
        best_t[lat[sel], rank[sel]] = tok[sel]
        seen += B
        if max_tokens is not None and base + rows.numel() >= max_tokens:
            break
    if not ids_all:
        raise ValueError("no texts to scan")
    return TopExamples(best_v, best_t, torch.cat(ids_all), torch.cat(doc_all), torch.cat(pos_all), tokenizer)


def on_prompt(model, tokenizer, layer: str, sae, prompt: str, scale: float = 1.0, top: int = 5,
              ctx_len: int = 512, exclude_special: bool = True) -> list[tuple[str, list[tuple[int, float]]]]:
    """For each token of ``prompt``: (token text, its ``top`` strongest (latent, activation) pairs)."""
    if tokenizer.pad_token is None:  # GPT-2 style tokenizers have none; one prompt needs no padding anyway
        tokenizer.pad_token = tokenizer.eos_token
    # Wrapped as in training (a BOS where the tokenizer adds none: a causal LM's first token is otherwise its
    # attention sink); only ids and mask, as GPT-2 would add token_type_ids through its embedding.
    enc = {k: v[:, :ctx_len] for k, v in encode_prompt(tokenizer, prompt).items()}
    input_ids, keep = enc["input_ids"], enc["attention_mask"].bool()
    values, indices = _encode_inputs(model, layer, sae, enc, scale)
    if exclude_special and getattr(tokenizer, "all_special_ids", None):
        keep &= ~torch.isin(input_ids, torch.tensor(sorted(set(tokenizer.all_special_ids))))
    out = []
    for t in range(input_ids.shape[1]):
        if not keep[0, t]:
            continue
        v, i = values[t], indices[t]
        order = torch.argsort(v, descending=True, stable=True)[:top]
        pairs = [(int(i[j]), float(v[j])) for j in order if v[j] > 0]
        out.append((tokenizer.decode([int(input_ids[0, t])]), pairs))
    return out


def dashboard(top: TopExamples, sae, latents: Iterable[int], path, neighbours: int = 5, context: int = 10) -> Path:
    """Write one static HTML page with, per latent, its maximum activation, its top contexts (the
    activating token highlighted, shaded by strength) and its nearest features by decoder cosine."""
    parts = ["<!doctype html><meta charset='utf-8'><title>sae-fast features</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:auto}mark{padding:0 2px}"
             "td{padding:2px 8px;font-family:monospace;white-space:pre-wrap}</style>",
             f"<h1>{sae.n_latents} latents, d={sae.d_in}</h1>"]
    for latent in latents:
        peak = float(top.max_activation[latent])
        sims, ids = decoder_neighbours(sae, latent, neighbours)
        near = ", ".join(f"{i} ({s:.2f})" for s, i in zip(sims.tolist(), ids.tolist()))
        parts.append(f"<h2 id='f{latent}'>latent {latent}</h2><p>max activation {peak:.3f}; neighbours: {near}</p><table>")
        for value, text in top.examples(latent, context):
            shade = 0.15 + 0.85 * value / peak if peak > 0 else 0.15
            body = html.escape(text).replace("«", f"<mark style='background:rgba(255,140,0,{shade:.2f})'>")
            parts.append(f"<tr><td>{value:.3f}</td><td>{body.replace('»', '</mark>')}</td></tr>")
        parts.append("</table>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path
