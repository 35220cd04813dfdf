"""`sae-fast bench`: measured training throughput side by side (runner.py), and the roofline MODEL of a GPU
(roofline.py, printed by roofline_report.py).

    workloads.py        the W1-W4 (and cpu) table, the shared settings, the benchmark SAE tensors
    provenance.py       device names and slug, versions, git commit, load average
    measure.py          synchronised timing, peak memory, the Row/Result records
    peers.py            what each row runs: sae-fast, EleutherAI sparsify, SAELens (and the autocast-copies SAE)
    matryoshka.py       the Matryoshka workload's rows (ours beside plain, SAELens' Matryoshka) and its ratio table
    report.py           the text table, Markdown, JSON and PNG of a measurement
    runner.py           building the rows of a workload, running them, `main` of `sae-fast bench`
    roofline.py         the MODEL: kernels, bytes, flops and predicted times per algorithm
    roofline_report.py  `sae-fast bench --model`: its table, JSON and Markdown

Imports point one way: workloads and provenance import nothing of the package; measure and peers import
workloads; matryoshka imports peers; report imports measure and matryoshka; runner imports all of these;
roofline imports workloads only (never the runner); roofline_report imports roofline, report and workloads.
The names below are the package's public face.
"""
from .measure import MEMORY_METHOD, PHASE_TITLE, PHASES, Result, Row, measure_phase, peak_memory, sync
from .peers import Contestant, Harness, NotApplicable, autocast_copies_sae, contestants, sae_fast_harness
from .provenance import device_info, device_name, device_slug, git_commit, versions
from .report import render_markdown, render_text, to_json
from .runner import build_row, floor_entry, fused_backends, main, phase_call, run_workload
from .workloads import (
    ADAM_LR,
    DEFAULT_WORKLOADS,
    L1_COEFF,
    WORKLOADS,
    Setup,
    Workload,
    make_setup,
    quick,
    resolve_workloads,
    sae_tensors,
)

__all__ = [
    "ADAM_LR", "DEFAULT_WORKLOADS", "L1_COEFF", "MEMORY_METHOD", "PHASES", "PHASE_TITLE", "WORKLOADS",
    "Contestant", "Harness", "NotApplicable", "Result", "Row", "Setup", "Workload",
    "autocast_copies_sae", "build_row", "contestants", "device_info", "device_name", "device_slug", "floor_entry",
    "fused_backends", "git_commit", "main", "make_setup", "measure_phase", "peak_memory", "phase_call", "quick",
    "render_markdown", "render_text", "resolve_workloads", "run_workload", "sae_fast_harness", "sae_tensors",
    "sync", "to_json", "versions",
]
