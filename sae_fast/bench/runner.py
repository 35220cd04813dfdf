"""`sae-fast bench`: SAE training throughput, side by side, in one process.

Every row runs the same workload (shapes, dtype, initial weights, input batch) warm and synchronised,
and reports the median of repeated calls:
    floor        the encoder GEMM alone, ``xc @ W_enc.T`` in the compute dtype (what any SAE must pay)
    sae-fast     ``SparseAutoencoder`` under ``sae_fast.use_backend(name)``: ``reference`` and every
                 fused backend that runs on the device
    peers        EleutherAI sparsify (``SparseCoder``) and SAELens (``TopKTrainingSAE`` with
                 rescale_acts_by_decoder_norm True and False; ``StandardTrainingSAE`` for ReLU+L1),
                 when installed; a peer that is missing or fails is a row saying so, never dropped.
                 Each also as "<peer> (patched)": its forward under ``sae_fast.integrations``' patch.
    trainer step ``sae-fast train``'s step: ``FusedAdam.step_fused`` with the trainer's defaults (AuxK on),
                 on every backend with a fused step (phases fwd and step only)
Phases: ``fwd`` (the training forward: autograd on, loss computed), ``fwd+bwd`` (plus ``loss.backward()``),
``step`` (plus the library's decoder-gradient projection if it has one, Adam, and decoder-row
renormalisation; the trainer-step row: one ``step_fused`` call). Peak memory is measured in a separate call
of each phase. On CPU the rows are timed round-robin, call by call (``--order interleaved``), so a shared
machine's changing load hits all alike.
All rows: the same x and initial weights, the trainer's Adam (``optim.make_adam``: torch's fused Adam where
this build has it; FusedAdam for the trainer-step row), lr=1e-4; no AuxK but in the trainer-step row.

Ratios in one run are the headline; absolute times are only meaningful on a quiet machine or a GPU.
(`sae-fast bench --model` is roofline_report.main, dispatched by the CLI.)
"""
from __future__ import annotations

import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..optim import make_adam
from . import matryoshka
from .measure import MEMORY_METHOD, PHASE_TITLE, PHASES, Result, Row, error_text, measure_phase
from .peers import Contestant, Harness, NotApplicable, contestants
from .provenance import device_info, device_slug, git_commit, load_average, versions
from .report import render_text, save_results
from .workloads import ADAM_LR, DEFAULT_WORKLOADS, L1_COEFF, Setup, Workload, make_setup, parse_list, resolve_workloads


def phase_call(h: Harness, phase: str, x: Tensor, setup: Setup) -> Callable[[], Tensor]:
    """A call that runs one phase; returns x_hat (from the forward)."""

    def zero_grads():
        for p in h.params:
            p.grad = None

    def call():
        with setup.autocast():
            if phase == "step" and h.step is not None:
                return h.step(x)
            if phase == "fwd":
                return h.forward(x)[0]
            zero_grads()
            x_hat, loss = h.forward(x)
        loss.backward()
        if phase == "step":
            if h.project_grad is not None:
                h.project_grad()
            h.optimizer.step()
            h.renormalize()
        return x_hat

    if h.backend is None:
        return call

    import sae_fast

    def call_with_backend():
        with sae_fast.use_backend(h.backend):
            return call()
    return call_with_backend


def build_row(c: Contestant, setup: Setup) -> tuple[Row, Harness | None]:
    """The row and its harness (None when the contestant is missing, not applicable or fails to build). Runs
    one forward first and records how far its x_hat is from reference.py's."""
    row = Row(c.label, c.kind, c.settings)
    try:
        h = c.build(setup)
        h.optimizer = h.optimizer or make_adam(h.params, ADAM_LR)
        with torch.no_grad():
            x_hat = phase_call(h, "fwd", setup.x, setup)().float()
        ref = (setup.x_hat_ref if h.x_hat_ref is None else h.x_hat_ref).float()
        row.xhat_rel_err = float((x_hat - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        return row, h
    except NotApplicable as exc:
        row.status, row.error = "not applicable", str(exc)
    except ImportError as exc:
        missing = c.package and getattr(exc, "name", None) and exc.name.split(".")[0] == c.package
        row.status, row.error = ("not installed" if missing else "failed"), error_text(exc)
    except Exception as exc:  # a peer that breaks on this device/version is a row saying so
        row.status, row.error = "failed", error_text(exc)
    return row, None


def floor_entry(setup: Setup) -> tuple[Row, Callable[[], Tensor]]:
    """The floor: the encoder GEMM alone, in the compute dtype, its (B, n) output written."""
    dt = torch.bfloat16 if setup.dtype == "bf16" else torch.float32
    xc = (setup.x - setup.b_dec).to(dt)
    W = setup.W_enc.to(dt)
    w = setup.workload
    row = Row("encoder GEMM (floor)", "floor",
              f"torch.matmul(xc, W_enc.T) in {dt}: ({w.batch}x{w.d}) @ ({w.d}x{w.n}), output written")
    return row, lambda: torch.matmul(xc, W.T)


def fused_backends(device: torch.device, requested: list[str] | None) -> list[str]:
    """``reference`` first, then every other available backend that runs on the device (or those requested).
    Triton on CPU runs only under its interpreter, which is not a speed path: left out unless requested."""
    import sae_fast
    if requested:
        return requested
    names = ["reference"]
    for name in sae_fast.available_backends():
        if name == "reference" or (name == "triton" and device.type == "cpu"):
            continue
        try:
            with sae_fast.use_backend(name):
                sae_fast.get_backend(device)
        except ValueError:
            continue
        names.append(name)
    return names


def run_workload(w: Workload, device: torch.device, dtype: str, backends: list[str], peers: list[str],
                 warmup: int, repeats: int, show_progress: bool = True, interleave: bool | None = None) -> Result:
    """Measure every row on one workload. ``interleave`` (default on CPU): all rows are built first and timed
    round-robin, call by call, so a shared machine's changing load hits all alike. Otherwise (default on CUDA,
    where memory may not hold every row's weights and optimizer state at once) rows run one after another."""
    from tqdm import tqdm
    interleave = device.type == "cpu" if interleave is None else interleave
    setup = make_setup(w, device, dtype)
    cs = (matryoshka.contestants if w.activation == "matryoshka" else contestants)(setup, backends, peers)
    floor, floor_fn = floor_entry(setup)
    rows = [floor]
    with tqdm(total=len(cs) + 1, desc=f"bench {w.name}", disable=not show_progress, file=sys.stderr,
              leave=False, unit="row") as bar:
        if interleave:
            built = [build_row(c, setup) for c in cs]
            rows += [row for row, _ in built]
            for phase in PHASES:
                bar.set_postfix_str(PHASE_TITLE[phase])
                entries = [(row, phase_call(h, phase, setup.x, setup)) for row, h in built
                           if h is not None and phase in h.phases]
                measure_phase(phase, ([(floor, floor_fn)] if phase == "fwd" else []) + entries,
                              device, warmup, repeats)
            del built, entries
            bar.update(len(cs) + 1)
        else:
            measure_phase("fwd", [(floor, floor_fn)], device, warmup, repeats)
            bar.update(1)
            for c in cs:
                bar.set_postfix_str(c.label)
                row, h = build_row(c, setup)
                rows.append(row)
                if h is not None:
                    for phase in h.phases:
                        measure_phase(phase, [(row, phase_call(h, phase, setup.x, setup))], device, warmup, repeats)
                del h
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                bar.update(1)
    return Result(w, dtype, rows, setup.notes, interleave)


def results_stem(args, device: torch.device, workloads: list[Workload]) -> str:
    stem = device_slug(device)
    default = list(DEFAULT_WORKLOADS.get(device.type, ())) == [w.name for w in workloads]
    return stem if default else f"{stem}-{'-'.join(w.name for w in workloads)}"


def main(args) -> int:
    """`sae-fast bench` without --model: measure the workloads, print the table, save the results."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here (use --device cpu, or --model h100 "
                         "for the roofline model)")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    workloads = resolve_workloads(args, DEFAULT_WORKLOADS.get(device.type, ("cpu",)))
    peers = {"all": ["sparsify", "saelens"], "none": []}.get(args.peers)
    peers = parse_list(args.peers) if peers is None else peers
    bad = [p for p in peers if p not in ("sparsify", "saelens")]
    if bad:
        raise ValueError(f"--peers: unknown {bad}; use all, none, or a list of sparsify,saelens")
    backends = fused_backends(device, parse_list(args.backends))
    repeats = args.repeats or (3 if args.quick else 20 if device.type == "cuda" else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5 if device.type == "cuda" else 2)
    meta = {
        "command": getattr(args, "command_line", None) or "sae-fast " + shlex.join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(), "versions": versions(), "device": device_info(device),
        "repeats": repeats, "warmup": warmup, "memory_method": MEMORY_METHOD[device.type],
        "load_avg_start": load_average(), "kind": "measurement",
        "settings": {"adam_lr": ADAM_LR, "l1_coeff": L1_COEFF, "backends": backends, "peers": peers},
    }
    order = args.order or ("interleaved" if device.type == "cpu" else "sequential")
    meta["order"] = order
    results = [run_workload(w, device, dtype, backends, peers, warmup, repeats, not args.quiet,
                            interleave=order == "interleaved") for w in workloads]
    meta["load_avg_end"] = load_average()
    print(render_text(results, meta))
    if args.out != "-":
        out = Path(args.out)
        saved = save_results(results, meta, out, results_stem(args, device, workloads))
        print(f"\nsaved {', '.join(saved)} in {out}/")
    return 0 if all(r.status != "failed" for res in results for r in res.rows if r.kind != "peer") else 1
