"""What a feature means, read the way Scaling Monosemanticity and Neuronpedia read it.

    from sae_fast import features
    stats = features.top_examples(model, tok, "encoder.layer.3", sae, texts, scale=act_scale)  # one pass
    print(stats.show(123))                       # density, max, mean, the top contexts with «token» marked
    stats.quantile_samples(123)                  # typical firings from each activation quantile bucket
    sims, ids = features.decoder_neighbours(sae, 123)
    sims, ids = features.all_neighbours(sae, k=10)                # every latent at once, blocked
    effects = features.logit_effects(lm, sae, [123], tokenizer=tok)  # causal LMs: promoted/suppressed tokens
    ranked = features.contrast(model, tok, layer, sae, positives, negatives, scale=act_scale)
    shared = features.cross_lingual(model, tok, layer, sae, scale=act_scale)
    features.dashboard(stats, sae, "out/")       # a static site: index + one page per feature

``scale`` is the activation scale the SAE was trained with (``sae-fast train`` writes it to
normalization.json beside the SAE); activations are multiplied by it before encoding.
Modules: scan (the streaming pass), stats, text (detokenising), neighbours, logits, prompt, contrast,
crosslingual, dashboard (and its page templates in pages).
"""
from .contrast import Contrast, contrast
from .crosslingual import CrossLingual, cross_lingual, parallel_sentences
from .dashboard import dashboard
from .logits import LogitEffects, logit_effects, unembedding
from .neighbours import all_neighbours, decoder_neighbours
from .prompt import on_prompt
from .scan import DEFAULT_TOKENS, scan
from .stats import HIST_EDGES, FeatureStats, TopExamples, top_examples
from .text import token_pieces, visible

__all__ = ["Contrast", "contrast", "CrossLingual", "cross_lingual", "parallel_sentences", "dashboard",
           "LogitEffects", "logit_effects", "unembedding", "all_neighbours", "decoder_neighbours", "on_prompt",
           "DEFAULT_TOKENS", "scan", "HIST_EDGES", "FeatureStats", "TopExamples", "top_examples", "token_pieces",
           "visible"]
