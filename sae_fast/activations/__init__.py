"""Where activations come from: hooks on any nn.Module, text corpora, and a sharded store (memory or disk).

    from sae_fast.activations import load_model, collect_text, default_corpus
    model, tok = load_model()                                   # embedded all-MiniLM-L6-v2
    train, evals = collect_text(model, tok, "encoder.layer.3", default_corpus(), max_tokens=50_000)
    for batch in train.batches(1024, normalize=True):           # {layer: (1024, 384)}, times train.scales()
        ...
"""
from .collect import collect_text
from .corpus import default_corpus, read_corpus, window_batches
from .hooks import LayerCapture, capture, middle_layer, resolve_layers
from .model import DEFAULT_LAYER, default_model_path, load_model
from .normalization import read_normalization, save_normalization
from .store import ActivationStore, normalization_scale

__all__ = ["collect_text", "default_corpus", "read_corpus", "window_batches", "LayerCapture", "capture",
           "middle_layer", "resolve_layers", "DEFAULT_LAYER", "default_model_path", "load_model",
           "ActivationStore", "normalization_scale", "read_normalization", "save_normalization"]
