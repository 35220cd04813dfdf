"""`sae-fast bench --model h100|h200`: the roofline MODEL of the workloads, printed as a table and saved as JSON
and Markdown (every kernel's flops, bytes and bound), each labelled MODEL."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .report import markdown_table, text_table
from .roofline import GPU, GPUS, LABEL, model_workload
from .workloads import DEFAULT_WORKLOADS, resolve_workloads


def _us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:,.0f}" if us >= 10 else f"{us:.1f}"


def render(gpu: GPU, results: list, markdown: bool = False) -> str:
    lines = []
    if markdown:
        lines += [f"# {LABEL}: {gpu.name}", "",
                  f"- peaks: bf16 tensor core {gpu.bf16_tflops} TFLOPS (dense), tf32 {gpu.tf32_tflops}, "
                  f"fp32 CUDA core {gpu.fp32_tflops}; HBM {gpu.hbm_tb_s} TB/s; {gpu.sms} SMs",
                  f"- source: {gpu.source}",
                  "- predicted time per kernel = max(flops / peak, bytes / bandwidth); assumptions and formulas: "
                  "`sae_fast/bench/roofline.py` (every prediction is a lower bound)",
                  "- made by `sae-fast bench --model " + gpu.key + "`", ""]
    else:
        lines += [f"{LABEL} | {gpu.name}: bf16 {gpu.bf16_tflops} TFLOPS dense, fp32 {gpu.fp32_tflops} TFLOPS, "
                  f"HBM {gpu.hbm_tb_s} TB/s", f"source: {gpu.source}"]
    for res in results:
        w, fl = res["workload"], res["encoder_gemm"]
        what = f"k={w['k']}" if w["activation"] == "topk" else f"ReLU+L1, mean L0 {w['k']}"
        title = (f"{w['name']}: B={w['batch']} d={w['d']} n={w['n']} {what}, bf16 autocast + fp32 masters "
                 f"(S={res['shape']['splits']} n-splits) | MODEL encoder GEMM {_us(fl['seconds'])} us "
                 f"({fl['bound']}-bound)")
        head = ["algorithm (MODEL)", "fwd us", "x gemm", "fwd+bwd us", "x gemm", "step us", "x gemm", "tokens/s"]
        body = []
        for key, a in res["algorithms"].items():
            sec, rat = a["seconds"], a["ratio_to_encoder_gemm"]
            fb = ["-", "-"] if key == "sae-fast+fused-opt" else [_us(sec["fwd_bwd"]), f"{rat['fwd_bwd']:.2f}"]
            body.append([key, _us(sec["fwd"]), f"{rat['fwd']:.2f}", *fb,
                         _us(sec["step"]), f"{rat['step']:.2f}", f"{a['tokens_per_s_step']:,.0f}"])
        if "sae-fast" in res["algorithms"]:
            ours = res["algorithms"]["sae-fast"]["seconds"]["step"]
            for row in body:
                other = res["algorithms"][row[0]]["seconds"]["step"]
                row.append("-" if row[0] == "sae-fast" else f"{other / ours:.2f}x")
            head.append("sae-fast step speedup")
        lines += ["", f"## {title}", ""] if markdown else ["", title]
        lines.append(_table(head, body, markdown))
    if markdown:
        lines += ["", "## Kernels (MODEL): every kernel of each algorithm, per workload", ""]
        for res in results:
            w = res["workload"]
            for key, a in res["algorithms"].items():
                lines += [f"### {w['name']} / {key}: {a['description']}", ""]
                body = [[k["phase"], k["name"], f"{k['flops'] / 1e9:.2f}", f"{k['bytes'] / 2**20:.1f}",
                         "yes" if k["tensor_core"] else "", _us(k["seconds"]), k["bound"]] for k in a["kernels"]]
                head = ["phase", "kernel", "GFLOP", "MiB moved", "tensor core", "us", "bound"]
                lines += [_table(head, body, True), ""]
    else:
        lines += ["", "x gemm: predicted time / predicted encoder GEMM time. Per-kernel flops, bytes and formulas: "
                  "the saved Markdown and sae_fast/bench/roofline.py."]
    return "\n".join(lines) + "\n"


def _table(head, body, markdown: bool) -> str:
    # Cells are escaped: kernel names such as "L1 = |acts * norms|" would otherwise split a Markdown row.
    return markdown_table(head, body, escape=True) if markdown else text_table(head, body)


def main(args) -> int:
    key = args.model.lower()
    if key not in GPUS:
        raise ValueError(f"--model: unknown GPU {args.model!r}; choose from {', '.join(GPUS)}")
    gpu = GPUS[key]
    defaults = DEFAULT_WORKLOADS["cuda"]  # the GPU workloads W1-W4
    workloads = resolve_workloads(args, defaults)
    dtype = args.dtype or "bf16"
    results = [model_workload(w, gpu, dtype) for w in workloads]
    print(render(gpu, results))
    if args.out != "-":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"model-{gpu.key}" + ("" if tuple(w.name for w in workloads) == defaults else
                                     "-" + "-".join(w.name for w in workloads))
        payload = {"kind": LABEL, "gpu": asdict(gpu), "dtype": dtype,
                   "command": getattr(args, "command_line", None), "workloads": results}
        (out / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
        (out / f"{stem}.md").write_text(render(gpu, results, markdown=True))
        print(f"saved {stem}.json, {stem}.md in {out}/ (MODEL)")
    return 0
