"""`sae-fast bench`: measured throughput tables, or the roofline model of a named GPU."""
from __future__ import annotations

import sys


def _bench(args) -> int:
    from sae_fast.bench import roofline_report, runner
    try:
        if args.model:  # the roofline MODEL of a named GPU: nothing is measured
            return roofline_report.main(args)
        return runner.main(args)
    except ValueError as exc:  # bad flags: say which, without a traceback
        print(f"sae-fast bench: {exc}", file=sys.stderr)
        return 2


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="measure training throughput side by side (GEMM floor, backends, peers), or --model a GPU",
        description="Measure fwd, fwd+bwd and full training step of an SAE in one process: the encoder GEMM "
                    "(floor), sae-fast's reference and fused backends, and EleutherAI sparsify and SAELens when "
                    "installed. Prints a table and saves JSON, Markdown and a PNG chart named by device. "
                    "With --model h100|h200 it prints a roofline MODEL instead (no device needed).")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available, else cpu)")
    p.add_argument("--workload", default=None,
                   help="comma-separated names from cpu, w1, w2, w3, w4 (default: cpu on CPU, w1-w4 on CUDA "
                        "and for --model)")
    p.add_argument("--quick", action="store_true",
                   help="small shapes (B=128 d=64 n=1024 k<=8) and 3 repeats: a smoke run")
    p.add_argument("--batch", type=int, default=None, help="override the workload's batch (tokens per step)")
    p.add_argument("--d", type=int, default=None, help="override the activation width")
    p.add_argument("--n", type=int, default=None, help="override the number of latents")
    p.add_argument("--k", type=int, default=None, help="override k (TopK) or the target mean L0 (relu)")
    p.add_argument("--activation", choices=("topk", "relu", "matryoshka"), default=None,
                   help="override the activation; matryoshka: sae-fast's Matryoshka TopK and BatchTopK SAEs "
                        "(widths n/64, n/16, n/4, n) beside the plain ones at the same n and k, against SAELens' "
                        "MatryoshkaBatchTopKTrainingSAE")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="fp32, or bf16 autocast over fp32 master weights (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--backends", default=None,
                   help="comma-separated sae-fast backends (default: reference and every available backend "
                        "that runs on the device)")
    p.add_argument("--peers", default="all", help="all (default), none, or a comma-separated list of sparsify,saelens")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per phase (default: 10 CPU, 20 CUDA, 3 quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 2 CPU, 5 CUDA, 1 quick)")
    p.add_argument("--order", choices=("interleaved", "sequential"), default=None,
                   help="interleaved: build every row, then time them round-robin call by call (fair on a shared "
                        "machine; default on CPU); sequential: one row at a time (less memory; default on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="sae-fast-bench",
                   help="folder for the JSON/Markdown/PNG results (default: ./sae-fast-bench, in the current "
                        "directory, never the checkout's committed benchmarks/results); - to save nothing")
    p.add_argument("--model", default=None, metavar="GPU",
                   help="print the roofline MODEL for h100 or h200 instead of measuring")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_bench)
