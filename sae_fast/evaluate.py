"""Is the SAE good for the model? Its reconstruction spliced into the forward pass, on held-out text.

    from sae_fast.evaluate import evaluate
    m = evaluate(model, tok, "layers.15", sae, texts, scale=scale, max_tokens=8192)
    m["ce_recovered_zero"], m["kl"], m["fvu"], m["l0"]

Per batch of token windows the causal LM runs four times: clean; with the hooked layer's output replaced
by the SAE's reconstruction ``x_hat / scale`` (spliced); replaced by 0 (zero-ablated); replaced by the
layer's mean output over the evaluation set (mean-ablated, found in a first, cheaper pass). Replacement
happens only at the evaluated positions: not padding, not special tokens or the prepended BOS, not
attention sinks (``sinks.py``; the SAE was not trained on them), so those keep their clean activations.
Next-token cross-entropy is averaged over every predicted token of the windows, and

    CE recovered = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)   (zero and mean ablation)
    delta LM loss = CE_spliced - CE_clean,   KL = mean over tokens of KL(p_clean || p_spliced)

Reconstruction numbers are over the evaluated positions, in the SAE's units (``x * scale``): FVU is one
ratio over the whole set, sum |x - x_hat|^2 / sum |x - mean(x)|^2 (not a mean of per-batch ratios), L0 the
mean count of active latents, dead the fraction of latents that never fired, cosine the mean cosine of
x and x_hat, shrinkage the mean of |x_hat| / |x|. For a model without an LM head only these apply.

A transcoder (``sae.cfg.transcode``) reads the module's input (times ``scale``) and predicts its output (times
``target_scale``): spliced means the module's output replaced by that prediction / target_scale, the
reconstruction numbers compare the prediction with the output, and the sinks are found on both ends (as in
training). The ablations are the module's output zeroed or replaced by its mean, as for an SAE.
Memory is bounded by one batch's logits (batch x ctx_len x vocabulary floats, a few of them).
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from .activations.corpus import window_batches
from .activations.hooks import first_tensor, module_input, resolve_layers
from .activations.sinks import DEFAULT_SINK_FACTOR, sink_mask
from .steer import _replace_first


def is_causal_lm(model) -> bool:
    """Whether ``model`` predicts next tokens (a ...ForCausalLM with an LM head)."""
    can = getattr(model, "can_generate", None)
    return bool(callable(can) and can())


class _Splice:
    """Forward hook on one module: records its output (``replacement`` None) or returns ``replacement``;
    with ``inputs`` it records the module's input too (a transcoder's)."""

    def __init__(self, module, name, inputs: bool = False):
        self.name, self.captured, self.captured_in, self.replacement = name, None, None, None
        self.inputs = inputs
        self.handle = module.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output):
        x = first_tensor(output, self.name)
        if self.replacement is None:
            self.captured = x.detach()
            if self.inputs:
                self.captured_in = module_input(args, kwargs, self.name).detach()
            return None
        return _replace_first(output, self.replacement.to(x.dtype))


def _limit(mask: Tensor, remaining: int) -> Tensor:
    """``mask`` with its positions past the first ``remaining`` (row-major order) dropped."""
    if remaining >= int(mask.sum()):
        return mask
    order = mask.reshape(-1).cumsum(0).reshape(mask.shape)
    return mask & (order <= remaining)


def _batches(tokenizer, texts, ctx_len, batch_size, exclude_special):
    return window_batches(tokenizer, texts, ctx_len, batch_size, seed=0, exclude_special=exclude_special)


@torch.no_grad()
def layer_mean(model, tokenizer, layer: str, texts: Iterable[str], *, ctx_len: int = 128, batch_size: int = 8,
               max_tokens: int = 8192, sink_factor: float = DEFAULT_SINK_FACTOR, exclude_special: bool = True) -> Tensor:
    """Mean output of ``layer`` over the positions ``evaluate`` edits (float64, model units)."""
    from .activations.hooks import LayerCapture

    device = next(model.parameters()).device
    total, count = None, 0
    with LayerCapture(model, layer) as cap:
        for inputs, keep in _batches(tokenizer, texts, ctx_len, batch_size, exclude_special):
            x = cap.run(**{k: v.to(device) for k, v in inputs.items()})[cap.names[0]]
            edit = _limit(keep & ~sink_mask(x, keep, sink_factor), max_tokens - count)
            rows = x[edit.to(x.device)].double()
            total = rows.sum(0) if total is None else total + rows.sum(0)
            count += rows.shape[0]
            if count >= max_tokens:
                break
    if not count:
        raise ValueError("the evaluation texts gave no tokens to evaluate on")
    return total / count


def _nll_and_logp(logits: Tensor, ids: Tensor, valid: Tensor) -> tuple[float, Tensor]:
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return float(nll[valid].double().sum()), logp


@torch.no_grad()
def evaluate(model, tokenizer, layer: str, sae, texts: Iterable[str], *, scale: float = 1.0, ctx_len: int = 128,
             batch_size: int = 8, max_tokens: int = 8192, sink_factor: float = DEFAULT_SINK_FACTOR,
             exclude_special: bool = True, lm: bool | None = None, progress: bool = True,
             target_scale: float | None = None) -> dict:
    """The module docstring's numbers for ``sae`` at ``layer`` over the first ``max_tokens`` evaluated
    positions of ``texts``. ``lm``: compute the cross-entropy numbers (None: when the model is a causal
    LM; True on a model without an LM head is an error). ``target_scale``: a transcoder's output scale
    (default ``scale``)."""
    transcode = bool(getattr(sae.cfg, "transcode", False))
    t_scale = scale if target_scale is None else target_scale
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1; got {max_tokens}")
    causal = is_causal_lm(model)
    if lm and not causal:
        raise ValueError(f"{type(model).__name__} is not a causal LM (no LM head to predict tokens): CE loss, "
                         "KL and CE recovered do not apply; load it with auto_class='AutoModelForCausalLM', or "
                         "evaluate the reconstruction only (lm=False)")
    lm = causal if lm is None else lm
    names = resolve_layers(model, layer)
    if len(names) != 1:
        raise ValueError(f"evaluate one layer at a time; {layer!r} matches {names}")
    # read twice (the mean pass, then the main one); tee keeps only what the first pass read ahead
    first, texts = itertools.tee(texts)
    device = next(model.parameters()).device
    mean_raw = layer_mean(model, tokenizer, names[0], first, ctx_len=ctx_len, batch_size=batch_size,
                          max_tokens=max_tokens, sink_factor=sink_factor, exclude_special=exclude_special)
    mean_sae = (mean_raw * t_scale).to(device)
    hook = _Splice(dict(model.named_modules())[names[0]], names[0], inputs=transcode)
    acc = {k: 0.0 for k in ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "kl", "err", "var", "l0", "cos", "shrink")}
    fired = torch.zeros(sae.n_latents, dtype=torch.bool, device=device)
    count = predicted = special = sinks = 0
    errors: list[Tensor] = []
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="eval", disable=not progress)
    try:
        for inputs, keep in _batches(tokenizer, texts, ctx_len, batch_size, exclude_special):
            inputs = {k: v.to(device) for k, v in inputs.items()}
            keep = keep.to(device)
            hook.replacement = None
            if lm:
                clean_logits = model(**inputs).logits
            else:
                model(**inputs)
            x = hook.captured  # the module's output: what is replaced
            x_in = hook.captured_in if transcode else x  # what the SAE reads
            if x_in.shape[-1] != sae.d_in or x.shape[-1] != getattr(sae, "d_out", sae.d_in):
                what = "reads" if transcode else "outputs"
                raise ValueError(f"layer {names[0]!r} {what} width {x_in.shape[-1]}"
                                 + (f" and outputs {x.shape[-1]}" if transcode else "")
                                 + f", the SAE reads {sae.d_in}" + (f" and predicts {sae.d_out}" if transcode else "")
                                 + "; pass the layer and model the SAE was trained on")
            sink = sink_mask({"in": x_in, "out": x} if transcode else x, keep, sink_factor)
            edit = _limit(keep & ~sink, max_tokens - count)
            special += int(inputs["attention_mask"].sum()) - int(keep.sum())
            sinks += int(sink.sum())
            xs = x[edit].float() * t_scale
            sae_in = (x_in[edit].float() * scale if transcode else xs).to(sae.W_dec.dtype)
            values, indices = sae.encode(sae_in)
            x_hat = sae.decode(values, indices).float()
            if getattr(sae.cfg, "skip_connection", False):  # as SparseAutoencoder.predict
                x_hat = x_hat + (sae_in @ sae.W_skip.T).float()
            n = xs.shape[0]
            tok_err = (x_hat - xs).double().pow(2).sum(-1)
            errors.append(tok_err.float().cpu())  # 4 bytes a token: which tokens carry the error
            acc["err"] += float(tok_err.sum())
            acc["var"] += float((xs.double() - mean_sae).pow(2).sum())
            acc["l0"] += float((values > 0).sum())
            acc["cos"] += float(torch.nn.functional.cosine_similarity(xs, x_hat, dim=-1).double().sum())
            acc["shrink"] += float((x_hat.norm(dim=-1) / xs.norm(dim=-1).clamp_min(1e-12)).double().sum())
            fired[indices[values > 0].long()] = True
            if lm:
                ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
                rows = edit.any(1, keepdim=True)  # windows past the token budget are not scored
                valid = mask[:, 1:] & mask[:, :-1] & rows
                nll, logp_clean = _nll_and_logp(clean_logits, ids, valid)
                acc["ce_clean"] += nll
                del clean_logits
                for key, fill in (("ce_spliced", x_hat / t_scale), ("ce_zero", 0.0), ("ce_mean", mean_raw)):
                    new = x.clone()
                    new[edit] = fill.to(x.dtype) if isinstance(fill, Tensor) else torch.tensor(fill, dtype=x.dtype)
                    hook.replacement = new
                    nll, logp = _nll_and_logp(model(**inputs).logits, ids, valid)
                    acc[key] += nll
                    if key == "ce_spliced":
                        kl = (logp_clean.exp() * (logp_clean - logp)).sum(-1)
                        acc["kl"] += float(kl[valid].double().sum())
                    del logp
                predicted += int(valid.sum())
            count += n
            bar.update(n)
            if count >= max_tokens:
                break
    finally:
        hook.handle.remove()
        bar.close()
    if not count:
        raise ValueError("the evaluation texts gave no tokens to evaluate on")
    out = {"tokens": count, "fvu": acc["err"] / max(acc["var"], 1e-30), "l0": acc["l0"] / count,
           "dead_frac": 1.0 - float(fired.float().mean()), "cosine": acc["cos"] / count,
           "shrinkage": acc["shrink"] / count, "special_excluded": special, "sinks_excluded": sinks,
           "sink_factor": sink_factor}
    out["explained_variance"] = 1.0 - out["fvu"]
    if transcode:
        out["transcoder"] = True  # the numbers compare its prediction with the module's output
    err = torch.cat(errors).double()
    top = max(1, err.numel() // 100)
    out["top1pct_error_share"] = float(torch.topk(err, top).values.sum() / err.sum().clamp_min(1e-30))
    if lm:
        ce = {k: acc[k] / max(predicted, 1) for k in ("ce_clean", "ce_spliced", "ce_zero", "ce_mean")}
        out.update(ce, predicted_tokens=predicted, kl=acc["kl"] / max(predicted, 1),
                   delta_lm_loss=ce["ce_spliced"] - ce["ce_clean"])
        for kind in ("zero", "mean"):
            gap = ce[f"ce_{kind}"] - ce["ce_clean"]
            out[f"ce_recovered_{kind}"] = (ce[f"ce_{kind}"] - ce["ce_spliced"]) / gap if gap else float("nan")
    return out


def describe(m: dict) -> str:
    """A few lines a newcomer can read."""
    lines = [f"on {m['tokens']:,} held-out tokens ({m['special_excluded']:,} special/BOS and {m['sinks_excluded']:,} "
             f"attention-sink tokens left out): the "
             + ("transcoder's prediction explains" if m.get("transcoder") else "SAE explains")
             + f" {100 * m['explained_variance']:.1f}% of the "
             + ("module output's " if m.get("transcoder") else "")
             + f"variance (FVU {m['fvu']:.4f}) with {m['l0']:.1f} active latents per token; {100 * m['dead_frac']:.1f}% "
             f"of latents never fired; cosine(x, x_hat) {m['cosine']:.3f}, shrinkage |x_hat|/|x| {m['shrinkage']:.3f}"]
    if "ce_clean" in m:
        lines.append(f"spliced into the model it recovers {100 * m['ce_recovered_zero']:.1f}% of the next-token loss "
                     f"that zero-ablating the layer costs ({100 * m['ce_recovered_mean']:.1f}% of what mean-ablating "
                     f"costs): CE "
                     f"{m['ce_clean']:.4f} clean, {m['ce_spliced']:.4f} spliced (+{m['delta_lm_loss']:.4f} nats), "
                     f"{m['ce_zero']:.4f} zero-ablated, {m['ce_mean']:.4f} mean-ablated; KL(clean||spliced) "
                     f"{m['kl']:.4f} nats/token over {m['predicted_tokens']:,} predicted tokens")
    if m["dead_frac"] > 0.5:
        lines.append(f"warning: {100 * m['dead_frac']:.0f}% of the latents never fired on these tokens: train longer, "
                     "on more tokens, or with fewer latents")
    if m["top1pct_error_share"] > 0.5:
        lines.append(f"warning: 1% of the tokens carry {100 * m['top1pct_error_share']:.0f}% of the squared error; "
                     "outlier tokens (attention sinks?) dominate the FVU: lower --sink-factor")
    return "\n".join(lines)
