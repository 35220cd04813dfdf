"""Static checks of the Triton kernels without a GPU: compile every launch the launchers make for the
DESIGN.md workloads for sm_80 and sm_90, and read registers, spills, shared memory and tensor-core
instructions from the cubin with the cuobjdump that ships in the triton wheel. A development tool: the
runtime package never imports it.

    python benchmarks/triton_resources.py   # -> benchmarks/results/triton_resources_triton-<version>.{md,json}
    python benchmarks/triton_resources.py --json out.json [--markdown out.md] [--jobs 2] [--workloads W1 ...]

With neither --json nor --markdown it writes both tables to benchmarks/results/. Exits non-zero when a
launch spills, overflows shared memory, cannot fit an SM, or a GEMM kernel has no tensor-core
instructions. Run it with ``TRITON_INTERPRET`` unset: it compiles. Triton's compile cache goes to a
temporary directory.

How: the real launchers run on ``meta`` tensors with each kernel replaced by a recorder, so the
configs, constexprs and arguments checked are exactly the ones a GPU run would use (only the SM count
and capability are set to the target's). Triton's own argument binder then derives the specialization
(int args equal to 1 become constants, 16-divisible ints and pointers get divisibility hints) and
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` builds the cubin.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from sae_fast.bench.workloads import DEFAULT_WORKLOADS
from sae_fast.bench.workloads import WORKLOADS as BENCH_WORKLOADS

RESULTS = Path(__file__).resolve().parent / "results"

# The GPU workloads W1-W4 of sae_fast.bench; W4 is ReLU + L1 at a mean L0 of about 64 (its code is padded to
# the largest row count).
WORKLOADS = {name.upper(): BENCH_WORKLOADS[name] for name in DEFAULT_WORKLOADS["cuda"]}
AUX_K = 32  # AuxK in the fused pass (16-bit inputs): the largest k_aux it takes (topk_encoder.MAX_K_AUX)
SCAN_CHUNK = 4096  # latents per cuBLAS chunk of the GEMM + scan encoders (scan_encoder)
MATRYOSHKA_WIDTHS = lambda n: (n // 16, n // 4, n)  # noqa: E731 - three prefixes, as SAELens' examples
W4_MAX_ROW = 256  # W4: padded code width (largest L0 in a batch at a mean of 64), per-split list capacity
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Per-target limits: SM count of the reference part (A100 SXM, H100 SXM), the largest shared memory one
# block may use, registers per SM.
TARGETS = {
    80: dict(name="sm_80 (A100)", sms=108, smem_per_block=166912, regs_per_sm=65536),
    90: dict(name="sm_90 (H100)", sms=132, smem_per_block=232448, regs_per_sm=65536),
}
GEMM_KERNELS = ("_topk_partial_kernel", "_threshold_partial_kernel")


@dataclasses.dataclass
class Launch:
    workload: str
    dtype: str
    cap: int
    kernel: str
    fn: object
    args: tuple
    kwargs: dict
    note: str = ""

    def config(self) -> str:
        text = " ".join(f"{k}={_short(v)}" for k, v in self.kwargs.items())
        return f"{text} [{self.note}]" if self.note else text


def _short(v):
    return str(v).replace(" ", "")


class _Recorder:
    def __init__(self, fn, sink: list, name: str):
        self.fn, self.sink, self.name = fn, sink, name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append((self.name, self.fn, args, kwargs))


@contextlib.contextmanager
def _recording(modules, device):
    """Replace every jit kernel of ``modules`` by a recorder and make ``Device.of`` return ``device``."""
    from triton.runtime.jit import JITFunction

    from sae_fast.kernels.encoder_common import Device

    sink, saved = [], []
    for mod in modules:
        for name, value in list(vars(mod).items()):
            if isinstance(value, JITFunction) and name.endswith("_kernel"):
                saved.append((mod, name, value))
                setattr(mod, name, _Recorder(value, sink, name))
    original_of = Device.of
    Device.of = staticmethod(lambda t: device)
    try:
        yield sink
    finally:
        Device.of = original_of
        for mod, name, value in saved:
            setattr(mod, name, value)


def launches(workload: str, dtype_name: str, cap: int) -> list[Launch]:
    """Every kernel launch of one training step of ``workload`` (forward, backward) as the launchers make it.
    bf16 is autocast over fp32 master weights, as SparseAutoencoder runs it: the encoder tiles read a bf16
    copy of W_enc (and, as a second launch, the fp32 weights themselves: the triton backend's
    ``EncoderOptions.master_in_kernel``); the decoder gathers read fp32 W_dec or a bf16 copy
    (``ops._gathered``), the backward writes fp32 gradients."""
    from sae_fast import ops
    from sae_fast.kernels import (
        decoder,
        encoder_common,
        fused_step,
        latent_backward,
        matryoshka,
        scan_encoder,
        threshold_encoder,
        topk_encoder,
    )

    w = WORKLOADS[workload]
    B, d, n, k = w.shape
    dt = DTYPES[dtype_name]
    f32 = torch.float32
    meta = dict(device="meta")
    x = torch.empty(B, d, dtype=dt, **meta)
    W_enc, W_dec = torch.empty(n, d, dtype=f32, **meta), torch.empty(n, d, dtype=f32, **meta)
    b_enc, b_dec = torch.empty(n, dtype=f32, **meta), torch.empty(d, dtype=f32, **meta)
    W_gemm = torch.empty(n, d, dtype=dt, **meta)  # what the backend hands the tiles (a copy for bf16)
    dev = encoder_common.Device(cap, TARGETS[cap]["sms"])
    notes = {}  # launch position -> what sets it apart
    kernels = (encoder_common, topk_encoder, threshold_encoder, decoder, latent_backward, fused_step, matryoshka)
    with _recording(kernels, dev) as sink:
        c = encoder_common.fold_bias(W_enc, b_enc, b_dec)
        K = k if w.activation == "topk" else W4_MAX_ROW
        encoders = [(W_gemm, "")] + ([(W_enc, "W_enc fp32 in the tiles")] if dt != f32 else [])
        for W, text in encoders:
            start = len(sink)
            if w.activation == "topk":
                topk_encoder.topk_select(x, W, c, k, out_dtype=f32)
                if topk_encoder.fuses_aux(AUX_K, dt):
                    topk_encoder.topk_select(x, W, c, k, torch.empty(n, dtype=torch.bool, **meta), AUX_K, f32)
            else:
                parts = threshold_encoder.threshold_partial(x, W, c, torch.empty(n, dtype=f32, **meta), W4_MAX_ROW)
                if not text:
                    threshold_encoder.threshold_compact(*parts, K)
            notes.update(dict.fromkeys(range(start, len(sink)), text))
        if dt != f32:  # the GEMM + scan alternative (EncoderOptions.scan_chunk)
            for aux in (False, True) if w.activation == "topk" else (None,):
                start = len(sink)
                if aux is None:
                    scan_encoder.threshold_scan_partial(x, W_gemm, c, torch.empty(n, dtype=f32, **meta), W4_MAX_ROW,
                                                        SCAN_CHUNK)
                else:
                    dead = torch.empty(n, dtype=torch.bool, **meta) if aux else None
                    scan_encoder.topk_scan(x, W_gemm, c, k, dead, AUX_K if aux else 0, f32, SCAN_CHUNK)
                # One scan launch per chunk, alike but for RESUME: keep the first of each kind.
                seen, keep = set(), []
                for launch in sink[start:]:
                    kind = (launch[0], launch[3].get("RESUME"))
                    if kind not in seen:
                        seen.add(kind)
                        keep.append(launch)
                sink[start:] = keep
                notes.update(dict.fromkeys(range(start, len(sink)), f"GEMM + scan, chunk {SCAN_CHUNK}"))
        idx = torch.empty(B, K, dtype=torch.int32, **meta)
        W_read = ops._gathered(W_dec, dt, B * K, 2)           # what the decode and gather-dot read
        values, dp = torch.empty(B, K, dtype=dt, **meta), torch.empty(B, K, dtype=W_read.dtype, **meta)
        g, xc = torch.empty(B, d, dtype=dt, **meta), torch.empty(B, d, dtype=dt, **meta)
        decoder.sparse_decode(values, idx, W_read, b_dec)     # x_hat
        decoder.gather_dot(g, idx, W_read)                    # dv
        decoder.sparse_decode(dp, idx, W_enc)                 # dx
        if w.activation == "topk":                                 # one latent-sorted pass for all three
            latent_backward.latent_backward(idx, n, dp, xc, values, g, grad_dtype=f32)
        else:                                                  # encoder and decoder nodes separately
            latent_backward.latent_backward(idx, n, values, xc, grad_dtype=f32)
            latent_backward.latent_backward(idx, n, v=values, g=g, grad_dtype=f32)
        if w.activation == "topk":  # a Matryoshka SAE's decode and one backward for every prefix
            start = len(sink)
            widths = MATRYOSHKA_WIDTHS(n)
            S = torch.empty(len(widths), B, d, dtype=dt, **meta)
            matryoshka.matryoshka_decode(values, idx, W_read, b_dec, widths)
            matryoshka.matryoshka_gather_dot(S, idx, W_read, widths)
            matryoshka.matryoshka_latent_backward(idx, n, dp, xc, values, S, widths, grad_dtype=f32)
            notes.update(dict.fromkeys(range(start, len(sink)), f"Matryoshka, widths {widths}"))
        # The fused training step (sae_fast.optim.FusedAdam) in place of the latent-sorted backward + Adam.
        start = len(sink)
        unit = w.activation == "topk"
        moments = [torch.empty(*t.shape, dtype=f32, **meta) for t in (W_enc, W_enc, b_enc, b_enc, W_dec, W_dec)]
        d_norm = None if unit else torch.empty(n, dtype=f32, **meta)
        fused_step.fused_adam_step(idx, values, K, dp, xc, values, g, d_norm, [W_enc, b_enc, W_dec], moments,
                                   (1e-3, 1.0, 0.9, 0.999, 1e-8), unit, unit)
        notes.update(dict.fromkeys(range(start, len(sink)), "fused step"))
    return [Launch(workload, dtype_name, cap, name, fn, args, kwargs, notes.get(i, ""))
            for i, (name, fn, args, kwargs) in enumerate(sink)]


# ============================================================================ compile and inspect
def _nvidia_bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def _specialize(fn, args, kwargs, cap):
    """Signature, constexprs, attrs and options exactly as JITFunction.run derives them for a launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", cap, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs, debug=False)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return target, signature, constexprs, attrs, options


def _compile_one(job):
    """(key, module, kernel name, signature, constexprs, attrs, options, cap) -> (key, resources).
    Runs in a worker process."""
    key, module, name, signature, constexprs, attrs, options, cap = job
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(module), name)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cap, 32),
                              options=options)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_nvidia_bin("cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_nvidia_bin("cuobjdump"), "-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return key, dict(
        regs=int(fields["REG"]), stack=int(fields["STACK"]), local=int(fields["LOCAL"]),
        smem=int(fields["SHARED"]) + int(compiled.metadata.shared),
        hmma=len(re.findall(r"\bHMMA\.", sass)), hgmma=len(re.findall(r"\bHGMMA\.", sass)),
        ldl_stl=len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        num_warps=compiled.metadata.num_warps, compile_s=round(seconds, 2))


def is_gemm(row: dict) -> bool:
    """Launches that multiply on tensor cores (a scan of cuBLAS scores, FROM_SCORES, does not multiply)."""
    return row["kernel"] in GEMM_KERNELS and "FROM_SCORES=True" not in row.get("config", "")


def check(row: dict) -> list[str]:
    """The failed checks of one row, each saying what and why."""
    t = TARGETS[row["cap"]]
    problems = []
    # A stack frame no instruction touches (LLVM lowers some i1-vector bitcasts through a 2-byte local
    # buffer that ptxas then removes) costs nothing; local loads and stores are spills.
    if row["local"] or row["ldl_stl"]:
        problems.append(f"spills: STACK={row['stack']} LOCAL={row['local']} local ld/st={row['ldl_stl']}")
    if row["smem"] > t["smem_per_block"]:
        problems.append(f"shared memory {row['smem']} B > {t['smem_per_block']} B per block")
    threads = 32 * row["num_warps"]
    regs_per_block = threads * (-(-row["regs"] * 32 // 256) * 256) // 32  # per-warp allocation unit of 256
    if regs_per_block > t["regs_per_sm"] or threads > 1024:
        problems.append(f"no block fits an SM: {row['regs']} registers x {threads} threads")
    if is_gemm(row):
        mma = row["hmma"] + (row["hgmma"] if row["cap"] >= 90 else 0)
        if mma == 0:
            problems.append("no tensor-core instructions (HMMA/HGMMA): the GEMM runs on scalar FMA")
    return problems


def collect(workloads=tuple(WORKLOADS), dtypes=tuple(DTYPES), caps=tuple(TARGETS), jobs: int = 1,
            progress=None) -> list[dict]:
    """One row per (workload, dtype, target, launch); identical specializations are compiled once."""
    rows, work = [], {}
    for cap in caps:
        for dt in dtypes:
            for wl in workloads:
                for launch in launches(wl, dt, cap):
                    target, signature, constexprs, attrs, options = _specialize(launch.fn, launch.args,
                                                                                launch.kwargs, cap)
                    key = repr((cap, launch.kernel, sorted(signature.items()), sorted(constexprs.items()),
                                sorted(attrs.items()), sorted(options.__dict__.items())))
                    work.setdefault(key, (key, launch.fn.fn.__module__, launch.kernel, signature, constexprs, attrs,
                                          dict(options.__dict__), cap))
                    rows.append(dict(workload=wl, dtype=dt, cap=cap, target=TARGETS[cap]["name"],
                                     kernel=launch.kernel, config=launch.config(), key=key))
    results = {}
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) if jobs > 1 else None
    try:
        done = pool.map(_compile_one, work.values()) if pool else map(_compile_one, work.values())
        for i, (key, res) in enumerate(done):
            results[key] = res
            if progress:
                progress(i + 1, len(work))
    finally:
        if pool:
            pool.shutdown()
    for row in rows:
        row.update(results[row.pop("key")])
        row["problems"] = check(row)
    return rows


def markdown(rows: list[dict], command: str) -> str:
    head = ("| target | workload | dtype | kernel | config | regs | spill (stack/local) | smem B | HMMA | HGMMA "
            "| ok |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['target']} | {r['workload']} | {r['dtype']} | `{r['kernel']}` | {r['config']} | {r['regs']} "
        f"| {r['stack']}/{r['local']} | {r['smem']} | {r['hmma']} | {r['hgmma']} "
        f"| {'yes' if not r['problems'] else '; '.join(r['problems'])} |\n" for r in rows)
    return (f"# Triton kernels: static resource usage (compiled, not run)\n\nMade by `{command}` "
            f"(triton {_triton_version()}, no GPU: cubins from `triton.compile` for each target, read with "
            f"`cuobjdump`). Every launch of one training step of each DESIGN.md workload, with the config its "
            f"launcher picks for the target's SM count. bf16 is autocast over fp32 master weights. W4: ReLU, code "
            f"padded to {W4_MAX_ROW}; the bf16 top-k encoder also appears with a fused AuxK list of {AUX_K}, and "
            f"every bf16 encoder launch once more with the fp32 W_enc read by the tiles (master_in_kernel); the "
            f"bf16 encoders also as GEMM + scan (chunk {SCAN_CHUNK}: the scan kernels, cuBLAS not listed); the "
            f"fused training step (`_fused_adam_kernel`, FusedAdam) beside the latent-sorted backward it replaces; for "
            f"the top-k workloads the Matryoshka kernels at widths n/16, n/4, n. "
            f"AuxK at the trainer's default k_aux = d/2 is no Triton launch (a GEMM over dead rows: cuBLAS and "
            f"torch.topk).\n\n"
            + head + body)


def _triton_version() -> str:
    import triton

    return triton.__version__


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--targets", nargs="+", type=int, default=list(TARGETS), choices=list(TARGETS))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the checks compile the kernels")
    command = " ".join(["python benchmarks/triton_resources.py", *argv])
    with tempfile.TemporaryDirectory() as home:
        os.environ["TRITON_HOME"] = home  # the compile cache lives and dies here (the workers inherit it)
        if args.json is None and args.markdown is None:
            RESULTS.mkdir(exist_ok=True)
            stem = RESULTS / f"triton_resources_triton-{_triton_version()}"
            args.json, args.markdown = Path(f"{stem}.json"), Path(f"{stem}.md")
        from tqdm import tqdm

        bar = tqdm(desc="compiling", unit="kernel", file=sys.stderr)

        def progress(i, total):
            bar.total = total
            bar.update(1)

        rows = collect(args.workloads, args.dtypes, args.targets, args.jobs, progress)
        bar.close()
    if args.json:
        args.json.write_text(json.dumps(dict(command=command, triton=_triton_version(), rows=rows), indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(rows, command))
    bad = [r for r in rows if r["problems"]]
    for r in rows:
        mark = "FAIL " + "; ".join(r["problems"]) if r["problems"] else "ok"
        print(f"{r['target']:<13} {r['workload']} {r['dtype']} {r['kernel']:<26} regs={r['regs']:<3} "
              f"stack={r['stack']} smem={r['smem']:<6} hmma={r['hmma']} hgmma={r['hgmma']}  {mark}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
