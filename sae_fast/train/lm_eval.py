"""The end of a run on a causal LM: each SAE spliced into the model on the run's held-out text
(``sae_fast.evaluate``: CE loss recovered, delta LM loss, KL, FVU, L0, ...)."""
from __future__ import annotations

from ..activations import default_corpus, load_model, read_corpus


def has_lm_head(name) -> bool:
    """Whether the model ``name`` (as ``load_model`` takes it) was saved as a causal LM (its config's
    architectures), so an LM head with trained weights is there to load."""
    from ..activations.model import _transformers, default_model_path
    if name == "smollm2":
        return True
    tf = _transformers()
    try:
        cfg = tf.AutoConfig.from_pretrained(str(default_model_path() if name in (None, "minilm") else name),
                                            local_files_only=True)
    except (OSError, ValueError):
        return False
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (cfg.architectures or []))


def splice_eval(cfg, saes: dict, scales: dict, device, log=print, target_scales: dict | None = None) -> dict | None:
    """{layer: evaluate(...) numbers} over the first ``cfg.eval_tokens`` tokens of the corpus (the windows
    the held-out activations came from), or None when the model has no LM head or eval_tokens is 0. A
    transcoder's prediction replaces its module's output (``target_scales``: each one's target scale)."""
    from ..evaluate import evaluate

    if not cfg.eval_tokens or not has_lm_head(cfg.model):
        return None
    log("splicing the SAEs into the model on the held-out text (sae_fast.evaluate)")
    model, tok = load_model(cfg.model, device=device, auto_class="AutoModelForCausalLM")
    out = {}
    for layer, sae in saes.items():
        texts = default_corpus() if cfg.corpus is None else read_corpus(cfg.corpus)
        sae.eval()
        out[layer] = evaluate(model, tok, layer, sae, texts, scale=scales[layer], ctx_len=cfg.ctx_len,
                              target_scale=(target_scales or {}).get(layer),
                              batch_size=min(cfg.model_batch, 8), max_tokens=cfg.eval_tokens,
                              sink_factor=cfg.sink_factor, exclude_special=cfg.exclude_special_tokens,
                              progress=cfg.progress)
    return out
