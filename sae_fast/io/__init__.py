"""Saving and loading SAEs: safetensors weights plus a ``cfg.json``; never pickle.

Three folder formats, told apart by their files (``detect_format``); ``load_sae`` reads any of them:

- sae-fast (own, defined in ``sae_fast.sae``): ``sae.safetensors`` with W_enc (n, d), b_enc (n),
  W_dec (n, d), b_dec (d) and the activation's extra tensors; ``cfg.json`` holds ``SAEConfig`` plus
  ``"format": "sae-fast"``.
- SAELens (``sae_fast.io.saelens``): ``sae_weights.safetensors`` with W_enc (d, n), b_enc, W_dec (n, d),
  b_dec (+ ``threshold`` for jumprelu, ``topk_threshold`` for batchtopk training checkpoints); ``cfg.json``
  with ``architecture``.
- sparsify (EleutherAI, ``sae_fast.io.sparsify``): ``sae.safetensors`` with encoder.weight (n, d),
  encoder.bias, W_dec (n, d), b_dec; ``cfg.json`` with k, num_latents / expansion_factor, d_in. A training
  run writes one such folder per hookpoint; loading the run folder gives ``{hookpoint: SAE}``.

Peer options with no counterpart in ``SparseAutoencoder`` are folded into the weights on load (in at least
float32, then cast; weights no fold touches are kept bit for bit): SAELens ``apply_b_dec_to_input=False``,
``rescale_acts_by_decoder_norm``, the activation scaler of a training checkpoint (``normalize_activations``
expected_average_only_in or covariance_whitening). So the loaded SAE maps raw activations to the same codes
and reconstructions as the peer does.

Imports point one way: ``sae_fast.folders`` (files, format registry, detection) <- ``sae_fast.sae`` (the
module and its own format) <- the peer formats here, which register themselves on import."""
from ..folders import CONFIG_FILE, FOLDER_FORMATS, atomic_dir_write, detect_format, load_sae
from ..sae import FORMAT, WEIGHTS_FILE, save_sae
from .fold import fold_activation_scale
from .saelens import (
    SAELENS_SCALER_FILE,
    SAELENS_SCHEMA_VERSION,
    SAELENS_WEIGHTS_FILE,
    SAELENS_WHITENING_FILE,
    load_saelens,
    save_saelens,
)
from .sparsify import load_sparsify, save_sparsify

FORMATS = tuple(FOLDER_FORMATS)  # ("sae-fast", "saelens", "sparsify")

__all__ = ["load_sae", "detect_format", "save_sae", "load_saelens", "save_saelens", "load_sparsify",
           "save_sparsify", "fold_activation_scale", "atomic_dir_write", "FORMAT", "FORMATS", "WEIGHTS_FILE",
           "CONFIG_FILE", "SAELENS_WEIGHTS_FILE", "SAELENS_SCALER_FILE", "SAELENS_WHITENING_FILE",
           "SAELENS_SCHEMA_VERSION"]
