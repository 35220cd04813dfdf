"""The cost of mixed precision: one SparseAutoencoder fwd + bwd under bf16 autocast, with the fp32 parameters
passed to the ops as master weights (what sae-fast does) and with 16-bit autocast copies of every weight
(what it did before: copies in autograd, bf16 gradients cast back). Any device; medians of interleaved calls.

    python benchmarks/master_weights.py [--device cpu] [--workload cpu] [--repeats 20] [--out DIR]

Writes <device>-master-weights-<workload>.txt to --out (default: print only).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from sae_fast import SparseAutoencoder, ops
from sae_fast.bench import WORKLOADS, autocast_copies_sae, device_name, device_slug, quick


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workload", default="cpu", choices=list(WORKLOADS))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="the workload at smoke-test size")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    w = quick(WORKLOADS[args.workload]) if args.quick else WORKLOADS[args.workload]
    x = torch.randn(w.batch, w.d, device=dev)
    variants = {"master weights (sae-fast)": SparseAutoencoder,
                "autocast copies of every weight (before)": autocast_copies_sae()}
    saes = {name: cls(w.d, w.n, w.activation, k=w.k, k_aux=0, seed=0, device=dev) for name, cls in variants.items()}

    def step(sae):
        sae.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = sae(x).loss
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for sae in saes.values():
        for _ in range(3):
            step(sae)
    times = {name: [] for name in saes}
    for _ in range(args.repeats):  # interleaved, so drifts of a shared machine hit both alike
        for name, sae in saes.items():
            start = time.perf_counter()
            step(sae)
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    first, second = med.values()
    lines = [f"SparseAutoencoder fwd + bwd under bf16 autocast on {device_name(dev)} "
             f"({torch.get_num_threads()} threads), backend {ops.get_backend(dev).name}, {w.describe()}; "
             f"median of {args.repeats} interleaved calls. Command: python benchmarks/master_weights.py "
             f"--device {args.device} --workload {args.workload} --repeats {args.repeats}"]
    lines += [f"{ms:9.1f} ms  {name}" for name, ms in med.items()]
    lines.append(f"ratio: the copies take {second / first:.2f}x the master-weight step")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{device_slug(dev)}-master-weights-{w.name}.txt").write_text(text)
    return med


if __name__ == "__main__":
    main()
