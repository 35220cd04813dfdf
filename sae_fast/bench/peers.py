"""The rows' adapters: what each contestant runs (a Harness), for sae-fast's SparseAutoencoder under a backend,
EleutherAI sparsify's SparseCoder and SAELens's training SAEs, and the list of contestants of a run. Also the
benchmark-only SAE subclass that runs as sae-fast did before master weights (for A/Bs)."""
from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .workloads import ADAM_LR, L1_COEFF, Setup


@dataclass
class Harness:
    """What a row runs. ``forward(x) -> (x_hat, loss)`` is the library's training forward."""

    forward: Callable[[Tensor], tuple[Tensor, Tensor]]
    params: list
    project_grad: Callable[[], None] | None  # the library's decoder-gradient projection, if it has one
    renormalize: Callable[[], None]
    backend: str | None = None               # sae-fast rows: run under use_backend(backend)
    optimizer: torch.optim.Optimizer | None = None
    step: Callable[[Tensor], Tensor] | None = None   # a whole training step in one call (FusedAdam.step_fused)
    phases: tuple = ("fwd", "fwd_bwd", "step")       # the phases this row measures
    x_hat_ref: Tensor | None = None                  # reference.py's x_hat when not the workload's (BatchTopK)


def _copy_params(pairs) -> None:
    with torch.no_grad():
        for dst, src in pairs:
            dst.copy_(src)


def _renorm_rows(W: Tensor) -> Callable[[], None]:
    @torch.no_grad()
    def fn():
        W.div_(W.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return fn


def autocast_copies_sae():
    """SparseAutoencoder as it ran before master weights, for A/Bs: under autocast every parameter is cast to
    the compute dtype inside autograd (16-bit weight copies, 16-bit gradients cast back)."""
    from ..sae import SparseAutoencoder

    class AutocastCopiesSAE(SparseAutoencoder):
        @staticmethod
        def _as(param, dtype):
            return param.to(dtype)

    return AutocastCopiesSAE


def sae_fast_harness(setup: Setup, backend: str, activation: str | None = None,
                     matryoshka: list[int] | None = None) -> Harness:
    """``SparseAutoencoder`` of the workload (or of ``activation``, with Matryoshka prefix widths)."""
    from ..sae import SparseAutoencoder
    w = setup.workload
    sae = SparseAutoencoder(w.d, w.n, activation or w.activation, k=w.k, k_aux=0, l1_coeff=L1_COEFF,
                            device=setup.device, matryoshka=matryoshka)
    _copy_params([(sae.W_enc, setup.W_enc), (sae.b_enc, setup.b_enc),
                         (sae.W_dec, setup.W_dec), (sae.b_dec, setup.b_dec)])

    def forward(x):
        out = sae(x)
        return out.x_hat, out.loss

    return Harness(forward, list(sae.parameters()), sae.remove_parallel_grad_, sae.normalize_decoder_, backend)


DEAD_EVERY = 10  # the trainer-step row: every 10th latent dead, so AuxK has work


def trainer_step_harness(setup: Setup, backend: str, fused: bool = True, activation: str | None = None,
                         matryoshka: list[int] | None = None) -> Harness:
    """What ``sae-fast train`` runs per step: FusedAdam.step_fused with the trainer's defaults (AuxK on with
    k_aux = d / 2), every DEAD_EVERY-th latent kept dead; ``fused=False``: the same SAE and dead set stepped
    as ``--no-fused-step`` does (backward, the trainer's Adam, the decoder constraints)."""
    from ..checks import deferred_finite_checks
    from ..optim import FusedAdam
    from ..sae import SparseAutoencoder
    w = setup.workload
    sae = SparseAutoencoder(w.d, w.n, activation or w.activation, k=w.k, l1_coeff=L1_COEFF, device=setup.device,
                            matryoshka=matryoshka)
    _copy_params([(sae.W_enc, setup.W_enc), (sae.b_enc, setup.b_enc),
                  (sae.W_dec, setup.W_dec), (sae.b_dec, setup.b_dec)])
    opt = FusedAdam(sae, lr=ADAM_LR) if fused else None

    def keep_dead():
        with torch.no_grad():  # a steady dead set (latents that fire leave it): same AuxK work every call
            sae.tokens_since_fired[::DEAD_EVERY] = sae.cfg.dead_tokens

    # As the trainer runs its steps: device-side checks, read once per call here (the bench synchronises
    # after each call anyway), so the triton backend's lists are sized with no read inside the step.
    def forward(x):
        keep_dead()
        with deferred_finite_checks():
            out = sae(x)
        return out.x_hat, out.loss

    def step(x):
        keep_dead()
        with deferred_finite_checks():
            return opt.step_fused(x).x_hat

    return Harness(forward, list(sae.parameters()), sae.remove_parallel_grad_, sae.normalize_decoder_, backend,
                   optimizer=opt, step=step if fused else None,
                   phases=("fwd", "step") if fused else ("fwd", "fwd_bwd", "step"))


def has_fused_step(backend: str, setup: Setup) -> bool:
    from ..dispatch import lookup_backend
    try:
        b = lookup_backend(backend)
    except (KeyError, ValueError):
        return False
    dtype = torch.bfloat16 if setup.dtype == "bf16" else torch.float32
    supported = getattr(b, "fused_step_supported", None)
    return supported is not None and supported(dtype)


def sparsify_harness(setup: Setup) -> Harness:
    w = setup.workload
    if w.activation != "topk":
        raise NotApplicable("sparsify's SparseCoder has no ReLU+L1 activation (topk | groupmax only)")
    if setup.device.type == "cpu":
        # Otherwise sparsify sends CPU tensors to its Triton decoder and fails.
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    with contextlib.redirect_stdout(io.StringIO()):  # sparsify prints its decoder choice at import
        from sparsify import SparseCoder, SparseCoderConfig
    cfg = SparseCoderConfig(activation="topk", num_latents=w.n, k=w.k, normalize_decoder=True)
    sc = SparseCoder(w.d, cfg, device=setup.device, dtype=torch.float32)
    _copy_params([(sc.encoder.weight, setup.W_enc), (sc.encoder.bias, setup.b_enc),
                         (sc.W_dec, setup.W_dec), (sc.b_dec, setup.b_dec)])

    def forward(x):
        out = sc(x)
        return out.sae_out, out.fvu

    return Harness(forward, list(sc.parameters()), sc.remove_gradient_parallel_to_decoder_directions,
                   sc.set_decoder_norm_to_unit_norm)


def saelens_harness(setup: Setup, rescale: bool | None) -> Harness:
    w = setup.workload
    from sae_lens.saes.sae import TrainStepInput
    common = dict(d_in=w.d, d_sae=w.n, dtype="float32", device=str(setup.device))
    if w.activation == "topk":
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=w.k, rescale_acts_by_decoder_norm=rescale, **common))
        coefficients = {}
    else:
        from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=L1_COEFF, **common))
        coefficients = {"l1": L1_COEFF}
    _copy_params([(sae.W_enc, setup.W_enc.T), (sae.b_enc, setup.b_enc),
                         (sae.W_dec, setup.W_dec), (sae.b_dec, setup.b_dec)])

    def forward(x):
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefficients, dead_neuron_mask=None,
                                                       n_training_steps=0, is_logging_step=False))
        return out.sae_out, out.loss

    return Harness(forward, list(sae.parameters()), None, _renorm_rows(sae.W_dec))


PATCHED = " (patched)"  # label suffix of a peer row run under sae_fast.integrations' patch


def patched_harness(build: Callable[[Setup], Harness], library: str) -> Callable[[Setup], Harness]:
    """The peer's own harness with its forward run under ``sae_fast.integrations.<library>.patched()``: only
    during its calls, so the unpatched rows timed round-robin beside it stay unpatched (the backward needs no
    patch: autograd recorded sae-fast's ops in the forward)."""
    def build_patched(setup: Setup) -> Harness:
        from .. import integrations
        integration = getattr(integrations, library)
        h = build(setup)
        forward = h.forward

        def patched_forward(x):
            with integration.patched():
                return forward(x)

        h.forward = patched_forward
        return h
    return build_patched


def _with_patched(c: Contestant, library: str) -> list[Contestant]:
    """The peer's row and the same row patched."""
    return [c, Contestant(c.label + PATCHED, c.kind, f"{c.settings}; forward under sae_fast.integrations."
                          f"{library}.patched()", patched_harness(c.build, library), c.package)]


class NotApplicable(Exception):
    """A peer that has no equivalent of this workload's math."""


@dataclass
class Contestant:
    label: str
    kind: str
    settings: str
    build: Callable[[Setup], Harness]
    package: str | None = None      # import name of a peer, for "not installed"


def contestants(setup: Setup, backends: list[str], peers: list[str]) -> list[Contestant]:
    w, dev = setup.workload, setup.device
    act = "TopK" if w.activation == "topk" else "ReLU+L1"
    l1 = f", l1_coeff={L1_COEFF:g}" if w.activation == "relu" else ""
    ours = (f"SparseAutoencoder(activation={w.activation!r}, k_aux=0{l1}); "
            "step: remove_parallel_grad_, Adam, normalize_decoder_")
    out = []
    for name in backends:
        out.append(Contestant(f"sae-fast [{name}]", "sae-fast", f"{ours}; use_backend({name!r})",
                              lambda s, name=name: sae_fast_harness(s, name)))
    trainer = (f"SparseAutoencoder({w.activation!r}{l1}), AuxK on (k_aux = d/2, every {DEAD_EVERY}th latent dead)")
    for name in backends:
        if has_fused_step(name, setup):
            out.append(Contestant(f"sae-fast trainer step [{name}]", "sae-fast",
                                  f"what sae-fast train runs: FusedAdam.step_fused (encoder, latent-sorted backward, "
                                  f"Adam, decoder constraints in one pass), {trainer}; use_backend({name!r}); "
                                  "fwd: its forward with AuxK",
                                  lambda s, name=name: trainer_step_harness(s, name)))
            out.append(Contestant(f"sae-fast trainer step, unfused [{name}]", "sae-fast",
                                  f"the same SAE and dead set as sae-fast train --no-fused-step steps it: {trainer}; "
                                  f"backward, remove_parallel_grad_, the trainer's Adam, normalize_decoder_; "
                                  f"use_backend({name!r})",
                                  lambda s, name=name: trainer_step_harness(s, name, fused=False)))
    if "sparsify" in peers:
        decoder = "eager embedding_bag (SPARSIFY_DISABLE_TRITON=1)" if dev.type == "cpu" else "Triton embedding_bag"
        if os.environ.get("SPARSIFY_DISABLE_TRITON") == "1" and dev.type != "cpu":
            decoder = "eager embedding_bag (SPARSIFY_DISABLE_TRITON=1 from the environment)"
        autocast = "; its forward autocasts to bf16 on CUDA by itself" if dev.type == "cuda" else ""
        out += _with_patched(Contestant("sparsify", "peer", f"SparseCoder(topk, k={w.k}), decoder: {decoder}"
                                        f"{autocast}; step: remove_gradient_parallel_to_decoder_directions, Adam, "
                                        "set_decoder_norm_to_unit_norm", sparsify_harness, "sparsify"), "sparsify")
    if "saelens" in peers:
        renorm = ("Adam, decoder rows renormalised by the bench (as ours; SAELens's trainer does not, and clips grad "
                  "norm, not done here)")
        if w.activation == "topk":
            for rescale in (True, False):
                out += _with_patched(Contestant(f"SAELens rescale={rescale}", "peer",
                                                f"TopKTrainingSAE(k={w.k}, rescale_acts_by_decoder_norm={rescale}), "
                                                f"training_forward_pass; step: {renorm}",
                                                lambda s, r=rescale: saelens_harness(s, r), "sae_lens"), "sae_lens")
        else:
            out += _with_patched(Contestant("SAELens", "peer", f"StandardTrainingSAE(l1_coefficient={L1_COEFF}) "
                                            f"({act}), training_forward_pass; step: {renorm}",
                                            lambda s: saelens_harness(s, None), "sae_lens"), "sae_lens")
    return out
