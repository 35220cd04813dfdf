"""SAELens (``sae-lens``) on sae-fast's fused ops.

    import sae_fast.integrations.sae_lens as sf_sae_lens
    sf_sae_lens.patch()          # SAELens' TopK, BatchTopK, JumpReLU and standard SAEs run on sae-fast
    ...
    sf_sae_lens.unpatch()        # or: with sf_sae_lens.patched(): ...

Patched, on TopKTrainingSAE, TopKSAE, BatchTopKTrainingSAE, JumpReLUTrainingSAE, JumpReLUSAE,
StandardTrainingSAE and StandardSAE (exactly these classes; subclasses such as AbsTopK or Matryoshka keep
SAELens' code):
    training_forward_pass   encode, decode, MSE and the architecture's losses (AuxK, L0, L1) on sparse codes:
                            the dense (B, d_sae) pre-activations and the dense decoder matmul never happen
    encode                  the sparse encoder, scattered into SAELens' dense (B, d_sae) feature_acts
    forward                 encode + decode without the dense feature_acts
``rescale_acts_by_decoder_norm``, ``apply_b_dec_to_input``, the run-time activation normaliser and hook_z
reshaping are respected; saving and loading are untouched. A call falls back to SAELens' own code while a
hook is attached to the SAE's hook points (run_with_cache, say), with ``use_error_term``, and for what is not
accelerated: JumpReLU's quadratic loss, pre_act_loss and jumprelu_ste_to_input, a BatchTopK k that is not
a whole number, and AuxK under layer_norm/constant_norm_rescale (SAELens raises its own error there).

What ``training_forward_pass`` returns differs in one field, by design: ``hidden_pre`` holds only the active
latents' pre-activations, as a sparse COO (B, d_sae) tensor, since the dense ones are what is saved.
``feature_acts`` is SAELens' (dense, or COO with use_sparse_activations), differentiable as before.
"""
from __future__ import annotations

import torch

from .. import ops, reference
from ._patching import Patcher, Target, active_coo, compute_dtype, has_hooks, operand, pre_at

TESTED = ("6.54",)
_STEP = ("self", "step_input")
_X = ("self", "x")
_JUMPRELU_MODES = ("step", "tanh")


# ============================================================================ the sparse code
class _Code:
    """One encode: the processed input (2-D, compute dtype), the weights as the ops see them (W_enc as
    (d_sae, d_in); rescaled when SAELens rescales by decoder norm), and the sparse code and its reconstruction."""

    def __init__(self, sae, x):
        cfg = sae.cfg
        sae_in = sae.run_time_activation_norm_fn_in(sae.reshape_fn_in(x.to(sae.dtype)))
        self.lead = sae_in.shape[:-1]
        self.dtype = compute_dtype(sae_in, sae.dtype)
        self.x = sae_in.reshape(-1, cfg.d_in).to(self.dtype)
        W_enc, b_enc, W_dec = sae.W_enc.T, sae.b_enc, sae.W_dec
        if getattr(cfg, "rescale_acts_by_decoder_norm", False):
            # Pre-activations times ||W_dec_i||, decoded through W_dec_i / ||W_dec_i||: an SAE with rescaled weights.
            norm = W_dec.norm(dim=-1)
            W_enc, b_enc, W_dec = W_enc * norm[:, None], b_enc * norm, W_dec / norm[:, None]
        self.W_enc, self.b_enc = operand(W_enc.contiguous(), self.dtype), operand(b_enc, self.dtype)
        self.W_dec, self.b_dec = operand(W_dec, self.dtype), operand(sae.b_dec, self.dtype)
        # What the encoder subtracts: SAELens' own b_dec * apply_b_dec_to_input (zero, with a zero gradient, when
        # off); the decoder adds b_dec either way.
        self.centre = self.b_dec if cfg.apply_b_dec_to_input else self.b_dec * 0
        self.values = self.indices = self.x_hat = None
        self.aux_indices = self.l0 = None

    def encode(self, sae, decode: bool, dead_mask=None, k_aux: int = 0) -> _Code:
        family, args = _FAMILY[type(sae)], (self.x, self.W_enc, self.b_enc, self.centre)
        if family == "topk" and decode:  # one fused node: encode, decode and AuxK's dead top-k
            res = ops.topk_sae(self.x, self.W_enc, self.b_enc, self.W_dec, self.centre, sae.cfg.k, dead_mask, k_aux)
            self.values, self.indices, self.x_hat = res.values, res.indices, res.x_hat
            self.aux_indices = res.aux_indices
            if not sae.cfg.apply_b_dec_to_input:
                self.x_hat = self.x_hat + self.b_dec
            return self
        if family == "topk":
            self.values, self.indices = ops.topk_encode(*args, sae.cfg.k)
        elif family == "batchtopk":
            self.values, self.indices = ops.batch_topk_encode(*args, int(sae.cfg.k))
        elif family == "standard":
            self.values, self.indices = ops.relu_encode(*args)
        elif type(sae) in _TRAINING:  # JumpReLU training: straight-through gradients for the threshold
            theta = sae.threshold.to(self.dtype)
            self.values, self.indices, self.l0 = ops.jumprelu_encode(*args, theta, sae.bandwidth, return_l0=True)
        else:  # JumpReLU inference: relu(p) * (p > threshold), no gradient for the threshold
            theta = sae.threshold.detach().clamp_min(0).to(self.dtype)
            self.values, self.indices = ops.jumprelu_encode(*args, theta, 1e-6)
        if decode:
            self.x_hat = ops.sparse_decode(self.values, self.indices, self.W_dec, self.b_dec)
        return self

    def sae_out(self, sae):
        """The reconstruction as SAELens' decode returns it (normaliser undone, hook_z shape restored; under
        autocast in the dtype of its 16-bit matmul plus the fp32 b_dec, i.e. fp32)."""
        x_hat = self.x_hat.to(torch.promote_types(self.x_hat.dtype, sae.b_dec.dtype))
        out = sae.run_time_activation_norm_fn_out(x_hat.reshape(*self.lead, self.x.shape[1]))
        return sae.reshape_fn_out(out, sae.d_head)

    def feature_acts(self, sae):
        """SAELens' feature_acts: dense (..., d_sae), or COO for TopK with use_sparse_activations."""
        n = sae.cfg.d_sae
        if getattr(sae.cfg, "use_sparse_activations", False) and _FAMILY[type(sae)] == "topk":
            B, K = self.values.shape
            rows = torch.arange(B, device=self.values.device).repeat_interleave(K)
            return torch.sparse_coo_tensor(torch.stack([rows, self.indices.reshape(-1).long()]),
                                           self.values.reshape(-1), (B, n), check_invariants=False)
        # (zeros, scattered into in place: reference.sparse_to_dense's out-of-place scatter copies B*d_sae more)
        dense = self.values.new_zeros(self.values.shape[0], n).scatter_add_(-1, self.indices.long(), self.values)
        return dense.reshape(*self.lead, n)


# ============================================================================ losses
def _aux_loss(sae, code: _Code, step_input, sae_out):
    """TopK's AuxK (Gao et al.), as SAELens computes it: the top-k_aux dead latents' pre-activations (not
    ReLU'd) reconstruct the detached residual, without b_dec."""
    dead = step_input.dead_neuron_mask
    num_dead = int(dead.sum()) if dead is not None else 0
    if not num_dead:
        return sae_out.new_tensor(0.0)
    k_aux = step_input.sae_in.shape[-1] // 2
    scale = min(num_dead / k_aux, 1.0)
    k_aux = min(k_aux, num_dead)
    idx = code.aux_indices if code.aux_indices is not None else _dead_topk(code, dead, k_aux)
    pre = pre_at(code.x - code.centre, code.W_enc, code.b_enc, idx)
    recons = ops.sparse_decode(pre, idx, code.W_dec, None).reshape(*code.lead, -1)
    residual = (step_input.sae_in - sae_out).detach()
    loss = (sae.reshape_fn_out(recons, sae.d_head) - residual).pow(2).sum(dim=-1).mean()
    return sae.cfg.aux_loss_coefficient * scale * loss


@torch.no_grad()
def _dead_topk(code: _Code, dead, k_aux: int):
    """Per-row top-k_aux among the dead latents (BatchTopK's AuxK): a top-k encode over the dead rows alone."""
    ids = dead.nonzero().squeeze(1)
    _, local = ops.topk_encode(code.x, code.W_enc[ids], code.b_enc[ids], code.centre, k_aux)
    return ids[local.long()].to(reference.INDEX_DTYPE)


def _sparsity_loss(sae, code: _Code, step_input) -> dict:
    family, cfg, coeffs = _FAMILY[type(sae)], sae.cfg, step_input.coefficients
    if family == "standard":
        weighted = code.values * ops.gather_latents(sae.W_dec.norm(dim=1), code.indices)
        return {"l1_loss": (coeffs["l1"] * weighted.norm(p=cfg.lp_norm, dim=-1)).mean()}
    if cfg.jumprelu_sparsity_loss_mode == "step":
        return {"l0_loss": coeffs["l0"] * code.l0}
    norms = ops.gather_latents(sae.W_dec.norm(dim=1), code.indices)
    per_item = torch.tanh(cfg.jumprelu_tanh_scale * code.values * norms).sum(dim=-1)
    return {"l0_loss": (coeffs["l0"] * per_item).mean()}


def _training_forward_pass(sae, step_input):
    from sae_lens.saes.sae import TrainStepOutput

    family = _FAMILY[type(sae)]
    if family == "jumprelu":
        with torch.no_grad():  # as SAELens: keep the threshold non-negative, projected on .data
            sae.threshold.data.clamp_(min=0.0)
    code = _Code(sae, step_input.sae_in)
    dead = step_input.dead_neuron_mask
    k_aux = step_input.sae_in.shape[-1] // 2 if family == "topk" and dead is not None and dead.any() else 0
    code.encode(sae, decode=True, dead_mask=dead if k_aux else None, k_aux=k_aux)
    sae_out = code.sae_out(sae)
    mse_loss = sae.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()
    if family in ("topk", "batchtopk"):
        aux = {"auxiliary_reconstruction_loss": _aux_loss(sae, code, step_input, sae_out)}
    else:
        aux = _sparsity_loss(sae, code, step_input)
    loss = mse_loss
    for value in aux.values():
        loss = loss + value
    out = TrainStepOutput(sae_in=step_input.sae_in, sae_out=sae_out, feature_acts=code.feature_acts(sae),
                          hidden_pre=active_coo(code.values, code.indices, sae.cfg.d_sae), loss=loss,
                          losses={"mse_loss": mse_loss, **aux})
    if family == "batchtopk":
        sae.update_topk_threshold(code.values)
        out.metrics["topk_threshold"] = sae.topk_threshold
    return out


# ============================================================================ when a call is accelerated
def _accelerated(sae, x, training: bool = False, dead=None) -> bool:
    family = _FAMILY.get(type(sae))
    if family is None or not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        return False
    if has_hooks(sae.hook_dict.values()):
        return False
    cfg = sae.cfg
    if family == "batchtopk" and not float(cfg.k).is_integer():
        return False
    if family == "topk" and getattr(cfg, "use_sparse_activations", False) and x.dim() != 2:
        return False
    if family == "jumprelu" and type(sae) in _TRAINING:
        if (cfg.jumprelu_sparsity_loss_mode not in _JUMPRELU_MODES or cfg.pre_act_loss_coefficient is not None
                or cfg.jumprelu_ste_to_input):
            return False
    if (training and family in ("topk", "batchtopk") and dead is not None and bool(dead.any())
            and cfg.normalize_activations in ("constant_norm_rescale", "layer_norm")):
        return False  # SAELens' aux loss raises its error about this
    return True


def _fast_training_forward_pass(original):
    def training_forward_pass(self, step_input):
        if not _accelerated(self, step_input.sae_in, True, step_input.dead_neuron_mask):
            return original(self, step_input)
        return _training_forward_pass(self, step_input)
    return training_forward_pass


def _fast_encode(original):
    def encode(self, x):
        if not _accelerated(self, x):
            return original(self, x)
        return _Code(self, x).encode(self, decode=False).feature_acts(self)
    return encode


def _fast_forward(original):
    def forward(self, x):
        if self.use_error_term or not _accelerated(self, x):
            return original(self, x)
        return _Code(self, x).encode(self, decode=True).sae_out(self)
    return forward


# ============================================================================ targets
_FAMILY: dict = {}   # accelerated class -> "topk" | "batchtopk" | "jumprelu" | "standard"
_TRAINING: set = set()  # those of them that are training classes
# Config fields the replacements read, checked before patching (an unknown SAELens version may rename them).
_FIELDS = {"topk": {"k", "rescale_acts_by_decoder_norm"}, "batchtopk": {"k", "rescale_acts_by_decoder_norm"},
           "jumprelu": set(), "standard": set()}
_TRAINING_FIELDS = {
    "topk": {"aux_loss_coefficient", "use_sparse_activations"},
    "batchtopk": {"aux_loss_coefficient", "topk_threshold_lr"},
    "jumprelu": {"jumprelu_bandwidth", "jumprelu_sparsity_loss_mode", "jumprelu_tanh_scale",
                 "pre_act_loss_coefficient", "jumprelu_ste_to_input"},
    "standard": {"lp_norm"},
}
_COMMON_FIELDS = {"d_in", "d_sae", "apply_b_dec_to_input", "normalize_activations"}


def _classes():
    from sae_lens import saes
    return [  # (class, its config class, family, training?)
        (saes.TopKTrainingSAE, saes.TopKTrainingSAEConfig, "topk", True),
        (saes.TopKSAE, saes.TopKSAEConfig, "topk", False),
        (saes.BatchTopKTrainingSAE, saes.BatchTopKTrainingSAEConfig, "batchtopk", True),
        (saes.JumpReLUTrainingSAE, saes.JumpReLUTrainingSAEConfig, "jumprelu", True),
        (saes.JumpReLUSAE, saes.JumpReLUSAEConfig, "jumprelu", False),
        (saes.StandardTrainingSAE, saes.StandardTrainingSAEConfig, "standard", True),
        (saes.StandardSAE, saes.StandardSAEConfig, "standard", False),
    ]


def _targets():
    targets, left = [], [
        ("decode(feature_acts)", "takes SAELens' dense feature_acts, whose gradient reaches every latent"),
        ("encode_with_hidden_pre", "returns the dense pre-activations, the GEMM the patch avoids"),
        ("other architectures (gated, AbsTopK, Matryoshka, matching pursuit, temporal, transcoders)",
         "run SAELens' code"),
        ("JumpReLU quadratic loss, pre_act_loss, jumprelu_ste_to_input; BatchTopK with fractional k",
         "run SAELens' code"),
    ]
    _FAMILY.clear()
    _TRAINING.clear()
    for cls, cfg_cls, family, training in _classes():
        fields = _COMMON_FIELDS | _FIELDS[family] | (_TRAINING_FIELDS[family] if training else set())
        missing = fields - set(getattr(cfg_cls, "__dataclass_fields__", ()))
        if missing:
            left.append((cls.__name__, f"{cfg_cls.__name__} lacks {sorted(missing)}"))
            continue
        _FAMILY[cls] = family
        if training:
            _TRAINING.add(cls)
            targets.append(Target(cls, "training_forward_pass", _fast_training_forward_pass, _STEP))
        targets += [Target(cls, "encode", _fast_encode, _X), Target(cls, "forward", _fast_forward, _X)]
    return targets, left


_patcher = Patcher("sae_lens", "sae-lens", TESTED, _targets)
patch = _patcher.patch
unpatch = _patcher.unpatch
patched = _patcher.patched


def is_patched() -> bool:
    return _patcher.is_patched
