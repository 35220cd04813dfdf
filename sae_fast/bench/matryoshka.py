"""The Matryoshka workload's rows (``sae-fast bench --activation matryoshka``): sae-fast's Matryoshka TopK
and BatchTopK SAEs beside the plain ones at the same n and k, on every backend, the trainer's fused step
(FusedAdam, AuxK on) of Matryoshka and plain TopK where the backend has one, and SAELens'
``MatryoshkaBatchTopKTrainingSAE`` (rescale_acts_by_decoder_norm True and False); and the table of
Matryoshka over plain times. Every row but the trainer steps: the same x and initial weights, no AuxK
(dead_neuron_mask None for SAELens), widths ``workloads.matryoshka_widths(n)``."""
from __future__ import annotations

from .measure import PHASE_TITLE, PHASES, Result
from .peers import (
    DEAD_EVERY,
    Contestant,
    Harness,
    NotApplicable,
    _copy_params,
    _renorm_rows,
    has_fused_step,
    sae_fast_harness,
    trainer_step_harness,
)
from .workloads import Setup, matryoshka_widths

KINDS = (("TopK", "topk", False), ("Matryoshka TopK", "topk", True), ("BatchTopK", "batchtopk", False),
         ("Matryoshka BatchTopK", "batchtopk", True))


def label(kind: str, backend: str) -> str:
    return f"sae-fast {kind} [{backend}]"


def saelens_harness(setup: Setup, rescale: bool) -> Harness:
    from sae_lens import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput
    w = setup.workload
    sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=w.d, d_sae=w.n, k=w.k, matryoshka_widths=matryoshka_widths(w.n), rescale_acts_by_decoder_norm=rescale,
        dtype="float32", device=str(setup.device)))
    _copy_params([(sae.W_enc, setup.W_enc.T), (sae.b_enc, setup.b_enc), (sae.W_dec, setup.W_dec),
                  (sae.b_dec, setup.b_dec)])

    def forward(x):
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                                       n_training_steps=0, is_logging_step=False))
        return out.sae_out, out.loss

    return Harness(forward, list(sae.parameters()), None, _renorm_rows(sae.W_dec))


def batch_topk_reference(setup: Setup):
    """reference.py's BatchTopK x_hat of the workload's batch (the BatchTopK rows' check)."""
    from .. import reference
    pre = reference.pre_activations(setup.x, setup.W_enc, setup.b_enc, setup.b_dec)
    return reference.sparse_decode(*reference.batch_topk(pre, setup.workload.k), setup.W_dec, setup.b_dec)


def _checked(build, batch_topk: bool):
    def build_checked(setup: Setup) -> Harness:
        h = build(setup)
        if batch_topk:
            h.x_hat_ref = batch_topk_reference(setup)
        return h
    return build_checked


def contestants(setup: Setup, backends: list[str], peers: list[str]) -> list[Contestant]:
    w = setup.workload
    widths = matryoshka_widths(w.n)
    out = []
    for name in backends:
        for kind, act, nested in KINDS:
            m = widths if nested else None
            what = f"SparseAutoencoder({act!r}, k={w.k}, k_aux=0{f', matryoshka={widths}' if nested else ''})"
            out.append(Contestant(label(kind, name), "sae-fast",
                                  f"{what}; step: remove_parallel_grad_, Adam, normalize_decoder_; "
                                  f"use_backend({name!r})",
                                  _checked(lambda s, name=name, act=act, m=m: sae_fast_harness(s, name, act, m),
                                           act == "batchtopk")))
    for name in backends:
        if not has_fused_step(name, setup):
            continue
        for kind, m in (("TopK", None), ("Matryoshka TopK", widths)):
            out.append(Contestant(f"sae-fast trainer step {kind} [{name}]", "sae-fast",
                                  f"what sae-fast train runs: FusedAdam.step_fused, SparseAutoencoder('topk', k={w.k}"
                                  f"{f', matryoshka={widths}' if m else ''}), AuxK on (k_aux = d/2, every "
                                  f"{DEAD_EVERY}th latent dead); use_backend({name!r}); fwd: its forward with AuxK",
                                  lambda s, name=name, m=m: trainer_step_harness(s, name, True, "topk", m)))
    if "sparsify" in peers:
        def none(_):
            raise NotApplicable("sparsify has no Matryoshka SAE")
        out.append(Contestant("sparsify", "peer", "no Matryoshka SAE", none, "sparsify"))
    if "saelens" in peers:
        for rescale in (True, False):
            out.append(Contestant(f"SAELens Matryoshka BatchTopK rescale={rescale}", "peer",
                                  f"MatryoshkaBatchTopKTrainingSAE(k={w.k}, matryoshka_widths={widths}, "
                                  f"rescale_acts_by_decoder_norm={rescale}), training_forward_pass (the outer loss "
                                  "plus every inner prefix's MSE); step: Adam, decoder rows renormalised by the bench",
                                  _checked(lambda s, r=rescale: saelens_harness(s, r), True), "sae_lens"))
    return out


def ratio_rows(res: Result) -> tuple[list[str], list[list[str]]]:
    """Each sae-fast Matryoshka row's time over the plain row of the same activation and backend (the issue's
    target: fwd+bwd within 1.2x), per phase."""
    head = ["Matryoshka / plain (time)"] + [PHASE_TITLE[p] for p in PHASES]
    body = []
    if res.workload.activation != "matryoshka":
        return head, body
    by_label = {r.label: r for r in res.rows}
    for r in res.rows:
        if r.kind != "sae-fast" or "Matryoshka " not in r.label:
            continue
        base = by_label.get(r.label.replace("Matryoshka ", ""))
        if base is not None and base.status == "ok" and r.status == "ok":
            cells = [f"{r.label} / {base.label}"]
            for p in PHASES:
                a, b = r.median(p), base.median(p)
                cells.append("-" if not a or not b else f"{a / b:.2f}x")
            body.append(cells)
    return head, body
