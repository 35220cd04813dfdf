"""`sae-fast bench`: SAE training throughput, side by side, in one process.

Every row runs the same workload (shapes, dtype, initial weights, input batch) warm and synchronised,
and reports the median of repeated calls:
    floor        the encoder GEMM alone, ``xc @ W_enc.T`` in the compute dtype (what any SAE must pay)
    sae-fast     ``SparseAutoencoder`` under ``sae_fast.use_backend(name)``: ``reference`` and every
                 fused backend that runs on the device
    peers        EleutherAI sparsify (``SparseCoder``) and SAELens (``TopKTrainingSAE`` with
                 rescale_acts_by_decoder_norm True and False; ``StandardTrainingSAE`` for ReLU+L1),
                 when installed; a peer that is missing or fails is a row saying so, never dropped.
Phases: ``fwd`` (the training forward: autograd on, loss computed), ``fwd+bwd`` (plus ``loss.backward()``),
``step`` (plus the library's decoder-gradient projection if it has one, ``torch.optim.Adam``, and
decoder-row renormalisation). Peak memory is measured in a separate call of each phase. On CPU the rows are
timed round-robin, call by call (``--order interleaved``), so a shared machine's changing load hits all alike.
All rows: the same x and initial weights, Adam(lr=1e-4), no AuxK (no dead-latent mask is passed).

Ratios in one run are the headline; absolute times are only meaningful on a quiet machine or a GPU.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

PHASES = ("fwd", "fwd_bwd", "step")
PHASE_TITLE = {"fwd": "fwd", "fwd_bwd": "fwd+bwd", "step": "step"}
L1_COEFF = 5.0   # ReLU+L1 rows (sae-fast and SAELens use the same decoder-norm-weighted L1)
ADAM_LR = 1e-4   # small, so the weights (and W4's L0) barely move during the timed steps


# ============================================================================ workloads
@dataclass(frozen=True)
class Workload:
    """One benchmark shape. For ``activation="relu"``, ``k`` is the target mean L0: b_enc is shifted
    so that on the benchmark batch about ``k`` pre-activations per row are positive."""

    name: str
    batch: int
    d: int
    n: int
    k: int
    activation: str = "topk"

    def describe(self) -> str:
        what = f"k={self.k}" if self.activation == "topk" else f"ReLU+L1, mean L0~{self.k}"
        return f"B={self.batch} d={self.d} n={self.n} {what}"


WORKLOADS = {
    "cpu": Workload("cpu", 1024, 384, 16384, 32),
    "w1": Workload("w1", 4096, 768, 32768, 32),
    "w2": Workload("w2", 4096, 768, 131072, 32),
    "w3": Workload("w3", 4096, 4096, 65536, 64),
    "w4": Workload("w4", 4096, 768, 32768, 64, "relu"),
}
DEFAULT_WORKLOADS = {"cpu": ("cpu",), "cuda": ("w1", "w2", "w3", "w4")}


def quick(w: Workload) -> Workload:
    """A seconds-long version of a workload (same activation), for smoke runs and tests."""
    return replace(w, name=f"{w.name}-quick", batch=128, d=64, n=1024, k=min(w.k, 8))


# ============================================================================ device, versions, provenance
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def device_slug(device: torch.device) -> str:
    """File-name stem for results: the CPU model (with its thread count) or the GPU name."""
    name = device_name(device)
    name = re.sub(r"\((R|TM|tm|r)\)|\bCPU\b|@.*$", " ", name)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if device.type == "cuda":
        return f"cuda-{slug}"
    return f"cpu-{slug}-{torch.get_num_threads()}t"


def _version(module: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    import sae_fast
    out = {"sae_fast": sae_fast.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for dist in ("triton", "eai-sparsify", "sae-lens", "numpy"):
        out[dist] = _version(dist)
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def git_commit() -> dict:
    """The commit of the checkout sae_fast was imported from (None when it is not a git checkout)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "name": device_name(device), "threads": torch.get_num_threads()}
    if device.type == "cpu":
        try:
            flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
            info["isa"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
        except (OSError, StopIteration):
            pass
        info["logical_cpus"] = os.cpu_count()
    else:
        props = torch.cuda.get_device_properties(device)
        info.update(sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}")
    return info


# ============================================================================ measurement
MEMORY_METHOD = {
    "cuda": "CUDA caching-allocator peak (torch.cuda.max_memory_allocated) during one call, above the "
            "bytes allocated at its start",
    "cpu": "peak live bytes allocated through torch's CPU allocator during one call, above the bytes live at "
           "its start, from torch.profiler memory events (excludes BLAS/OpenMP scratch and Python objects)",
}


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak extra bytes while ``fn`` runs (see MEMORY_METHOD); None when it cannot be measured."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile
    with _quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        current = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            current += e.nbytes()
            peak = max(peak, current)
        return peak
    except AttributeError:  # the profiler's result API moved: say "not measured" rather than guess
        return None


@contextlib.contextmanager
def _quiet_fd2():
    """The profiler's C++ side writes start/stop lines to file descriptor 2; keep them off the table."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        sys.stderr.flush()
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def measure_phase(phase: str, entries: list, device: torch.device, warmup: int, repeats: int) -> None:
    """Time each (row, call) pair ``repeats`` times after ``warmup`` untimed calls, round-robin over the rows
    with the starting row rotated each round, so a change of load on a shared machine hits every row alike.
    Stores the median, the raw times and the peak memory (one more call) in ``row.phases[phase]``; a call that
    raises marks its row failed and drops it."""
    def ok(row, fn) -> bool:
        try:
            fn()
            _sync(device)
            return True
        except Exception as exc:  # a peer that breaks here is a row saying so
            row.status, row.error = "failed", f"in {PHASE_TITLE[phase]}: {_error_text(exc)}"
            return False

    live = [(row, fn) for row, fn in entries if row.status == "ok"]
    for _ in range(warmup):
        live = [(row, fn) for row, fn in live if ok(row, fn)]
    times = {id(row): [] for row, _ in live}
    for i in range(repeats):
        turn = i % len(live) if live else 0
        for row, fn in live[turn:] + live[:turn]:
            if row.status != "ok":
                continue
            start = time.perf_counter()
            if ok(row, fn):
                times[id(row)].append(time.perf_counter() - start)
    for row, fn in live:
        if row.status == "ok":
            t = times[id(row)]
            row.phases[phase] = {"median_ms": statistics.median(t) * 1e3, "times_ms": [round(v * 1e3, 4) for v in t],
                                 "peak_bytes": peak_memory(fn, device)}


# ============================================================================ the rows
@dataclass
class Harness:
    """What a row runs. ``forward(x) -> (x_hat, loss)`` is the library's training forward."""

    forward: Callable[[Tensor], tuple[Tensor, Tensor]]
    params: list
    project_grad: Callable[[], None] | None  # the library's decoder-gradient projection, if it has one
    renormalize: Callable[[], None]
    backend: str | None = None               # sae-fast rows: run under use_backend(backend)
    optimizer: torch.optim.Optimizer | None = None


@dataclass
class Row:
    label: str
    kind: str                       # floor | sae-fast | peer
    settings: str
    status: str = "ok"              # ok | failed | not installed | not applicable
    error: str | None = None
    phases: dict = field(default_factory=dict)   # phase -> {median_ms, times_ms, peak_bytes}
    xhat_rel_err: float | None = None

    def median(self, phase: str) -> float | None:
        p = self.phases.get(phase)
        return p["median_ms"] if p else None


@dataclass
class Setup:
    """The shared inputs of one workload: every row starts from copies of these."""

    workload: Workload
    device: torch.device
    dtype: str                      # fp32 | bf16 (autocast over fp32 master weights)
    x: Tensor
    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    x_hat_ref: Tensor
    notes: list = field(default_factory=list)

    def autocast(self):
        if self.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def make_setup(w: Workload, device: torch.device, dtype: str, seed: int = 0) -> Setup:
    """Random activations and an SAE initialised as SparseAutoencoder does (unit decoder rows, tied encoder)."""
    from . import reference
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(w.batch, w.d, generator=g)
    W_dec = torch.randn(w.n, w.d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc, b_enc, b_dec = W_dec.clone(), torch.zeros(w.n), torch.zeros(w.d)
    x, W_enc, b_enc, W_dec, b_dec = (t.to(device) for t in (x, W_enc, b_enc, W_dec, b_dec))
    notes = []
    pre = reference.pre_activations(x, W_enc, b_enc, b_dec)
    if w.activation == "relu":
        # Shift every bias by the same amount so that about k entries per row are positive on this batch.
        flat = pre.flatten()
        cut = torch.topk(flat, min(w.batch * w.k + 1, flat.numel())).values[-1]
        b_enc -= cut
        pre -= cut
        notes.append(f"b_enc shifted by {-float(cut):.4f}: mean L0 {float((pre > 0).sum(1).float().mean()):.1f}")
        values, idx = reference.relu(pre)
    else:
        values, idx = reference.topk(pre, w.k)
    x_hat_ref = reference.sparse_decode(values, idx, W_dec, b_dec)
    del pre
    return Setup(w, device, dtype, x, W_enc, b_enc, W_dec, b_dec, x_hat_ref, notes)


def _copy_params(setup: Setup, pairs) -> None:
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
    from .sae import SparseAutoencoder

    class AutocastCopiesSAE(SparseAutoencoder):
        @staticmethod
        def _as(param, dtype):
            return param.to(dtype)

    return AutocastCopiesSAE


def sae_fast_harness(setup: Setup, backend: str) -> Harness:
    from .sae import SparseAutoencoder
    w = setup.workload
    sae = SparseAutoencoder(w.d, w.n, w.activation, k=w.k, k_aux=0, l1_coeff=L1_COEFF, device=setup.device)
    _copy_params(setup, [(sae.W_enc, setup.W_enc), (sae.b_enc, setup.b_enc),
                         (sae.W_dec, setup.W_dec), (sae.b_dec, setup.b_dec)])

    def forward(x):
        out = sae(x)
        return out.x_hat, out.loss

    return Harness(forward, list(sae.parameters()), sae.remove_parallel_grad_, sae.normalize_decoder_, backend)


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
    _copy_params(setup, [(sc.encoder.weight, setup.W_enc), (sc.encoder.bias, setup.b_enc),
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
    _copy_params(setup, [(sae.W_enc, setup.W_enc.T), (sae.b_enc, setup.b_enc),
                         (sae.W_dec, setup.W_dec), (sae.b_dec, setup.b_dec)])

    def forward(x):
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefficients, dead_neuron_mask=None,
                                                       n_training_steps=0, is_logging_step=False))
        return out.sae_out, out.loss

    return Harness(forward, list(sae.parameters()), None, _renorm_rows(sae.W_dec))


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
    ours = (f"SparseAutoencoder(activation={w.activation!r}, k_aux=0{', l1_coeff=%g' % L1_COEFF if w.activation == 'relu' else ''}); "
            "step: remove_parallel_grad_, Adam, normalize_decoder_")
    out = []
    for name in backends:
        out.append(Contestant(f"sae-fast [{name}]", "sae-fast", f"{ours}; use_backend({name!r})",
                              lambda s, name=name: sae_fast_harness(s, name)))
    if "sparsify" in peers:
        decoder = "eager embedding_bag (SPARSIFY_DISABLE_TRITON=1)" if dev.type == "cpu" else "Triton embedding_bag"
        if os.environ.get("SPARSIFY_DISABLE_TRITON") == "1" and dev.type != "cpu":
            decoder = "eager embedding_bag (SPARSIFY_DISABLE_TRITON=1 from the environment)"
        autocast = "; its forward autocasts to bf16 on CUDA by itself" if dev.type == "cuda" else ""
        out.append(Contestant("sparsify", "peer", f"SparseCoder(topk, k={w.k}), decoder: {decoder}{autocast}; "
                              "step: remove_gradient_parallel_to_decoder_directions, Adam, "
                              "set_decoder_norm_to_unit_norm", sparsify_harness, "sparsify"))
    if "saelens" in peers:
        renorm = "Adam, decoder rows renormalised by the bench (as ours; SAELens's trainer does not, and clips grad norm, not done here)"
        if w.activation == "topk":
            for rescale in (True, False):
                out.append(Contestant(f"SAELens rescale={rescale}", "peer",
                                      f"TopKTrainingSAE(k={w.k}, rescale_acts_by_decoder_norm={rescale}), "
                                      f"training_forward_pass; step: {renorm}",
                                      lambda s, r=rescale: saelens_harness(s, r), "sae_lens"))
        else:
            out.append(Contestant("SAELens", "peer", f"StandardTrainingSAE(l1_coefficient={L1_COEFF}) ({act}), "
                                  f"training_forward_pass; step: {renorm}",
                                  lambda s: saelens_harness(s, None), "sae_lens"))
    return out


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= 240 else text[:237] + "..."


def _phase_fn(h: Harness, phase: str, x: Tensor, setup: Setup) -> Callable[[], Tensor]:
    """A call that runs one phase; returns x_hat (from the forward)."""

    def zero_grads():
        for p in h.params:
            p.grad = None

    def call():
        with setup.autocast():
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
        h.optimizer = torch.optim.Adam(h.params, lr=ADAM_LR)
        with torch.no_grad():
            x_hat = _phase_fn(h, "fwd", setup.x, setup)().float()
        ref = setup.x_hat_ref.float()
        row.xhat_rel_err = float((x_hat - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        return row, h
    except NotApplicable as exc:
        row.status, row.error = "not applicable", str(exc)
    except ImportError as exc:
        missing = c.package and getattr(exc, "name", None) and exc.name.split(".")[0] == c.package
        row.status, row.error = ("not installed" if missing else "failed"), _error_text(exc)
    except Exception as exc:  # a peer that breaks on this device/version is a row saying so
        row.status, row.error = "failed", _error_text(exc)
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


# ============================================================================ running a workload
@dataclass
class Result:
    workload: Workload
    dtype: str
    rows: list
    notes: list
    interleaved: bool = False

    @property
    def floor_ms(self) -> float:
        return self.rows[0].median("fwd")


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
    cs = contestants(setup, backends, peers)
    floor, floor_fn = floor_entry(setup)
    rows = [floor]
    with tqdm(total=len(cs) + 1, desc=f"bench {w.name}", disable=not show_progress, file=sys.stderr,
              leave=False, unit="row") as bar:
        if interleave:
            built = [build_row(c, setup) for c in cs]
            rows += [row for row, _ in built]
            for phase in PHASES:
                bar.set_postfix_str(PHASE_TITLE[phase])
                entries = [(row, _phase_fn(h, phase, setup.x, setup)) for row, h in built if h is not None]
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
                    for phase in PHASES:
                        measure_phase(phase, [(row, _phase_fn(h, phase, setup.x, setup))], device, warmup, repeats)
                del h
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                bar.update(1)
    return Result(w, dtype, rows, setup.notes, interleave)


# ============================================================================ reporting
def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def _fmt_mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}" if b >= 10 * 2**20 else f"{b / 2**20:.1f}"


def _speedup(base: float | None, ours: float | None) -> str:
    return "-" if not base or not ours else f"{base / ours:.2f}x"


def table_rows(res: Result) -> tuple[list[str], list[list[str]]]:
    floor = res.floor_ms
    head = ["row"]
    for p in PHASES:
        head += [f"{PHASE_TITLE[p]} ms", "x floor"]
    head += ["peak MiB (step)", "tokens/s (step)", "x_hat err", "status"]
    body = []
    for r in res.rows:
        cells = [r.label]
        for p in PHASES:
            ms = r.median(p)
            cells += [_fmt_ms(ms), "-" if ms is None else f"{ms / floor:.2f}"]
        mem = r.phases.get("fwd" if r.kind == "floor" else "step")  # the floor has only its GEMM
        peak = mem["peak_bytes"] if mem else None
        tok = res.workload.batch / (r.median("step") / 1e3) if r.median("step") else None
        cells += [_fmt_mib(peak), "-" if tok is None else f"{tok:,.0f}",
                  "-" if r.xhat_rel_err is None else f"{r.xhat_rel_err:.1e}",
                  r.status if not r.error else f"{r.status}: {r.error}"]
        body.append(cells)
    return head, body


def speedup_rows(res: Result) -> tuple[list[str], list[list[str]]]:
    ours = [r for r in res.rows if r.kind == "sae-fast" and r.label != "sae-fast [reference]" and r.status == "ok"]
    others = [r for r in res.rows if r.kind != "floor" and r not in ours]
    head = ["speedup (step; fwd / fwd+bwd)"] + [f"vs {o.label}" for o in others]
    body = []
    for r in ours:
        cells = [r.label]
        for o in others:
            if o.status != "ok":
                cells.append(o.status)
                continue
            cells.append(f"{_speedup(o.median('step'), r.median('step'))} "
                         f"({_speedup(o.median('fwd'), r.median('fwd'))} / {_speedup(o.median('fwd_bwd'), r.median('fwd_bwd'))})")
        body.append(cells)
    return head, body


def _text_table(head, body) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    status_col = len(head) - 1 if head and head[-1] == "status" else None
    lines = []
    for cells in [head] + body:
        parts = []
        for i, (c, wdt) in enumerate(zip(cells, widths)):
            if i == status_col:
                parts.append(str(c))
            elif i == 0:
                parts.append(str(c).ljust(wdt))
            else:
                parts.append(str(c).rjust(wdt))
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _md_table(head, body) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(esc(c) for c in cells) + " |" for cells in body]
    return "\n".join(lines)


_ORDER = {"interleaved": "rows timed round-robin call by call (a load change hits every row alike)",
          "sequential": "rows timed one after another"}


def _title(res: Result, meta: dict) -> str:
    dev = meta["device"]
    dtype = "fp32" if res.dtype == "fp32" else "bf16 autocast, fp32 master weights"
    return (f"workload {res.workload.name}: {res.workload.describe()}, {dtype} | {dev['name']} "
            f"({dev['threads']} threads) | median of {meta['repeats']} after {meta['warmup']} warm-up calls, "
            f"{meta['order']}")


SAME_FOR_ALL = (f"every row: the same x and initial weights (unit decoder rows, tied encoder), torch.optim.Adam("
                f"lr={ADAM_LR}), no AuxK (no dead-latent mask passed), fresh gradients each call.")


def render_text(results: list[Result], meta: dict) -> str:
    out = [f"sae-fast bench (measured) | torch {meta['versions']['torch']} | load average at start "
           f"{meta['load_avg_start']}"]
    for res in results:
        out += ["", _title(res, meta)]
        out.append(_text_table(*table_rows(res)))
        head, body = speedup_rows(res)
        if body:
            out += ["", _text_table(head, body)]
        for note in res.notes:
            out.append(f"note: {note}")
    out += ["", "x floor: time / the encoder GEMM's time (fwd column of the floor row). x_hat err: max |x_hat - "
            "reference.py's x_hat| / max |x_hat|, from the first forward.", f"peak memory: {meta['memory_method']}.",
            SAME_FOR_ALL, "rows ran:"]
    for r in results[0].rows:
        out.append(f"  {r.label}: {r.settings}")
    return "\n".join(out)


def render_markdown(results: list[Result], meta: dict) -> str:
    v = meta["versions"]
    git = meta["git"]
    out = [f"# sae-fast bench: {meta['device']['name']} (measured)", "",
           f"- command: `{meta['command']}`",
           f"- date: {meta['date']}; git commit {git['commit']}{' (with uncommitted changes)' if git['dirty'] else ''}",
           "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
           f"- device: {json.dumps(meta['device'])}",
           f"- load average (1, 5, 15 min) at start {meta['load_avg_start']}, at end {meta['load_avg_end']}",
           f"- timing: median of {meta['repeats']} synchronised calls after {meta['warmup']} warm-up calls, "
           f"one process, {_ORDER[meta['order']]}",
           f"- peak memory: {meta['memory_method']}", ""]
    for res in results:
        out += [f"## {_title(res, meta)}", "", _md_table(*table_rows(res)), ""]
        head, body = speedup_rows(res)
        if body:
            out += [_md_table(head, body), ""]
        out += [f"- note: {n}" for n in res.notes]
    out += ["", "## What each row ran", "", SAME_FOR_ALL, ""]
    out += [f"- **{r.label}**: {r.settings}" for r in results[0].rows]
    out += ["", "`x floor` is time / the encoder GEMM's time; `x_hat err` is max |x_hat - reference.py's x_hat| / "
            "max |x_hat| from the first forward (a check that every row computes the same SAE).", ""]
    return "\n".join(out)


def save_chart(results: list[Result], meta: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(results), 1, figsize=(9, 1.2 + 0.55 * max(len(r.rows) for r in results) * len(results)),
                             squeeze=False)
    for ax, res in zip(axes[:, 0], results):
        rows = [r for r in res.rows if r.kind != "floor"]
        labels = [r.label if r.status == "ok" else f"{r.label} ({r.status})" for r in rows]
        height = 0.8 / len(PHASES)
        for j, p in enumerate(PHASES):
            vals = [(r.median(p) or 0) / res.floor_ms for r in rows]
            ax.barh([i + j * height for i in range(len(rows))], vals, height=height, label=PHASE_TITLE[p])
        ax.set_yticks([i + height for i in range(len(rows))], labels)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.8, ls="--", label="encoder GEMM")
        ax.set_xlabel("time / encoder GEMM (lower is better)")
        ax.set_title(f"{res.workload.name}: {res.workload.describe()}, {res.dtype} | {meta['device']['name']}",
                     fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def to_json(results: list[Result], meta: dict) -> dict:
    out = []
    for res in results:
        rows = [asdict(row) for row in res.rows]
        for row in rows:
            for phase in row["phases"].values():
                phase["tokens_per_s"] = res.workload.batch / (phase["median_ms"] / 1e3)
        out.append({"workload": asdict(res.workload), "dtype": res.dtype, "interleaved": res.interleaved,
                    "notes": res.notes, "rows": rows})
    return {**meta, "workloads": out}


# ============================================================================ entry point
def parse_list(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def resolve_workloads(args, defaults) -> list[Workload]:
    """The named workloads (or ``defaults``), shrunk by --quick, with any shape flags applied."""
    names = parse_list(args.workload) or list(defaults)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise ValueError(f"--workload: unknown {unknown}; choose from {', '.join(WORKLOADS)}")
    out = []
    for name in names:
        w = quick(WORKLOADS[name]) if args.quick else WORKLOADS[name]
        custom = {f: getattr(args, f) for f in ("batch", "d", "n", "k", "activation") if getattr(args, f) is not None}
        if custom:
            # The name says what changed (w2-n1048576), so result files of different shapes never collide.
            tag = "-".join(f"{'b' if f == 'batch' else f}{v}" for f, v in custom.items())
            w = replace(w, name=f"{w.name}-{tag}", **custom)
        if w.activation == "topk" and not 1 <= w.k <= w.n:
            raise ValueError(f"--k must be between 1 and n={w.n}; got {w.k}")
        for f in ("batch", "d", "n", "k"):
            if getattr(w, f) < 1:
                raise ValueError(f"--{f} must be >= 1; got {getattr(w, f)}")
        out.append(w)
    return out


def results_stem(args, device: torch.device, workloads: list[Workload]) -> str:
    stem = device_slug(device)
    default = list(DEFAULT_WORKLOADS.get(device.type, ())) == [w.name for w in workloads]
    return stem if default else f"{stem}-{'-'.join(w.name for w in workloads)}"


def main(args) -> int:
    if args.model:
        from .roofline import main as model_main
        return model_main(args)
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
        "load_avg_start": [round(v, 2) for v in os.getloadavg()], "kind": "measurement",
        "settings": {"adam_lr": ADAM_LR, "l1_coeff": L1_COEFF, "backends": backends, "peers": peers},
    }
    order = args.order or ("interleaved" if device.type == "cpu" else "sequential")
    meta["order"] = order
    results = [run_workload(w, device, dtype, backends, peers, warmup, repeats, not args.quiet,
                            interleave=order == "interleaved") for w in workloads]
    meta["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    print(render_text(results, meta))
    if args.out != "-":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = results_stem(args, device, workloads)
        (out / f"{stem}.json").write_text(json.dumps(to_json(results, meta), indent=1) + "\n")
        (out / f"{stem}.md").write_text(render_markdown(results, meta))
        saved = [f"{stem}.json", f"{stem}.md"]
        if save_chart(results, meta, out / f"{stem}.png"):
            saved.append(f"{stem}.png")
        print(f"\nsaved {', '.join(saved)} in {out}/")
    return 0 if all(r.status != "failed" for res in results for r in res.rows if r.kind != "peer") else 1
