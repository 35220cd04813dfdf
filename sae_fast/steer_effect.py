"""Steering a causal LM and measuring what it did, instead of eyeballing the text.

- ``latent_max``: each latent's largest activation over a corpus (special tokens, BOS and attention sinks
  left out, as in training); ``cached_latent_max`` keeps it beside the SAE (``max_activation.safetensors``,
  reused while corpus, token count and sink factor match), so a clamp can be given in units of it.
- ``generate``: greedy or sampled continuation of a prompt, with a ``steer(...)`` edit or none.
- ``latent_on_text``: a latent re-measured on generated text with steering off (mean activation over the
  generated tokens and how many it fires on): did the continuation become about the feature?
- ``promoted_tokens`` / ``promoted_logprob_change``: the tokens a latent's decoder direction promotes
  through the unembedding, and how much steering raises their log-probability (teacher-forced on the
  baseline continuation, mean over its positions).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .activations.corpus import window_batches
from .activations.hooks import LayerCapture
from .activations.sinks import DEFAULT_SINK_FACTOR, sink_mask
from .evaluate import is_causal_lm
from .steer import steer

MAX_FILE = "max_activation.safetensors"


def require_causal_lm(model) -> None:
    if not is_causal_lm(model):
        raise ValueError(f"{type(model).__name__} is not a causal LM: steering generation needs one (a "
                         "...ForCausalLM, loaded with auto_class='AutoModelForCausalLM'); encoder-only models "
                         "such as the embedded MiniLM cannot generate")


def _codes(model, layer, sae, inputs: dict, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(values (B, T, K), indices (B, T, K), activations (B, T, d)) at ``layer`` with no steering."""
    device = next(model.parameters()).device
    with LayerCapture(model, layer) as cap:
        x = cap.run(**{k: v.to(device) for k, v in inputs.items()})[cap.names[0]]
    if x.shape[-1] != sae.d_in:
        raise ValueError(f"layer {layer!r} outputs width {x.shape[-1]}, the SAE reads {sae.d_in}")
    with torch.no_grad():
        v, i = sae.encode(x.reshape(-1, x.shape[-1]).to(sae.W_dec.dtype) * scale)
    return v.reshape(*x.shape[:2], -1).float(), i.reshape(*x.shape[:2], -1).long(), x


def latent_max(model, tokenizer, layer, sae, texts, scale: float = 1.0, max_tokens: int = 50_000, ctx_len: int = 64,
               batch_size: int = 16, sink_factor: float = DEFAULT_SINK_FACTOR) -> tuple[Tensor, int]:
    """((n,) each latent's largest activation over the scanned tokens, tokens scanned)."""
    best = torch.zeros(sae.n_latents)
    seen = 0
    for inputs, keep in window_batches(tokenizer, texts, ctx_len, batch_size):
        v, i, x = _codes(model, layer, sae, inputs, scale)
        keep = (keep & ~sink_mask(x, keep, sink_factor).cpu()).to(v.device)
        v, i = v[keep].cpu(), i[keep].cpu()
        best = best.scatter_reduce(0, i.reshape(-1), v.reshape(-1), "amax")
        seen += int(keep.sum())
        if seen >= max_tokens:
            break
    if not seen:
        raise ValueError("the corpus gave no tokens to find the latents' maxima on")
    return best.clamp_min(0), seen


def cached_latent_max(folder, model, tokenizer, layer, sae, texts_fn, corpus_name: str, scale: float = 1.0,
                      max_tokens: int = 50_000, sink_factor: float = DEFAULT_SINK_FACTOR, log=print) -> Tensor:
    """``latent_max`` read from (or written to) ``folder/max_activation.safetensors``; ``texts_fn()`` gives
    the corpus only when it has to be scanned."""
    path = Path(folder) / MAX_FILE
    key = {"corpus": corpus_name, "max_tokens": str(max_tokens), "sink_factor": str(sink_factor),
           "n_latents": str(sae.n_latents)}
    if path.is_file():
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            if {k: v for k, v in (f.metadata() or {}).items() if k in key} == key:
                return load_file(str(path))["max_activation"]
    best, seen = latent_max(model, tokenizer, layer, sae, texts_fn(), scale, max_tokens, sink_factor=sink_factor)
    try:
        tmp = path.with_suffix(".tmp")
        save_file({"max_activation": best.contiguous()}, str(tmp), metadata={**key, "tokens_seen": str(seen)})
        tmp.replace(path)
        if log:
            log(f"latent maxima over {seen:,} corpus tokens ({corpus_name}) cached in {path}")
    except OSError:  # a read-only SAE folder: use the maxima without caching them
        pass
    return best


@torch.no_grad()
def generate(model, tokenizer, inputs: dict, edit: dict | None, max_new_tokens: int = 30, sample: bool = False,
             temperature: float = 1.0, seed: int = 0) -> Tensor:
    """The generated token ids (1, new) after ``inputs``; ``edit``: keyword arguments of ``steer`` or None."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen = dict(max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=pad)
    if sample:
        gen.update(temperature=temperature, top_k=0, top_p=1.0)
        torch.manual_seed(seed)
    else:
        gen.update(temperature=None, top_k=None, top_p=None)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    n = inputs["input_ids"].shape[1]
    if edit is None:
        return model.generate(**inputs, **gen)[:, n:]
    with steer(model, **edit, prompt_len=n):
        return model.generate(**inputs, **gen)[:, n:]


def _joined(inputs: dict, new: Tensor) -> dict:
    ids = torch.cat([inputs["input_ids"], new.to(inputs["input_ids"].device)], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def latent_on_text(model, layer, sae, inputs: dict, new: Tensor, latent: int, scale: float = 1.0) -> dict:
    """Latent ``latent`` on the generated tokens ``new`` (after the prompt ``inputs``), steering off."""
    if new.shape[1] == 0:
        return {"mean": 0.0, "fires": 0, "tokens": 0}
    v, i, _ = _codes(model, layer, sae, _joined(inputs, new), scale)
    n = inputs["input_ids"].shape[1]
    act = (v[0, n:] * (i[0, n:] == latent)).sum(-1)
    return {"mean": float(act.mean()), "fires": int((act > 0).sum()), "tokens": int(act.numel())}


def promoted_tokens(model, sae, latent: int, k: int = 10) -> Tensor:
    """The ``k`` token ids whose unembedding rows align best with the latent's decoder direction."""
    W_U = model.get_output_embeddings().weight.detach().float()
    return torch.topk(W_U @ sae.W_dec[latent].detach().float().to(W_U.device), k).indices


@torch.no_grad()
def promoted_logprob_change(model, inputs: dict, new: Tensor, edit: dict, tokens: Tensor) -> float:
    """Mean over the positions that predict ``new`` of log P(any of ``tokens``), steered minus not."""
    if new.shape[1] == 0:
        return 0.0
    device = next(model.parameters()).device
    joined = {k: v.to(device) for k, v in _joined(inputs, new).items()}
    n = inputs["input_ids"].shape[1]
    tokens = tokens.to(device)

    def logp():
        logits = model(**joined).logits[0, n - 1:-1].float()
        return torch.logsumexp(torch.log_softmax(logits, -1)[:, tokens], -1)

    base = logp()
    with steer(model, **edit, prompt_len=n):
        steered = logp()
    return float((steered - base).mean())
