"""Issue-4 table: a TopK SAE training step (fwd+bwd) on CPU, every contender on the same weights, one process.

    OMP_NUM_THREADS=2 python benchmarks/cpu_topk.py --out benchmarks/results/cpu_topk_<machine>.md

On a machine shared with other busy processes, OMP_WAIT_POLICY=passive keeps idle OpenMP workers from
spinning on the cores the running threads need (it changes every row, not only ours).

Rows: the encoder GEMM alone (torch.mm, the floor), the reference and torch backends, the cpu backend
(also with AuxK on), EleutherAI sparsify's SparseCoder (if installed; SPARSIFY_DISABLE_TRITON=1).
Timings interleave the rows over several rounds and report the median over all repeats, so load spikes
on a shared machine hit every row alike. Peak extra memory of the forward is measured in a fresh
subprocess per (backend, n) as the rise of VmHWM (RSS high-water mark) over the resident size before it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import torch  # noqa: E402

import sae_fast  # noqa: E402
from sae_fast import ops  # noqa: E402
from sae_fast.bench import WORKLOADS, sae_tensors  # noqa: E402

BIAS_STD = 0.01  # small random biases, so the selection is not the bias-free one


def sae_fast_step(backend, x, params, k, dead=None, k_aux=0):
    """fwd+bwd of ops.topk_sae with the FVU loss (plus AuxK's when k_aux), as sparsify's forward computes."""
    W_enc, b_enc, W_dec, b_dec = params
    total = (x - x.mean(0)).pow(2).sum()

    def step():
        for p in params:
            p.grad = None
        with sae_fast.use_backend(backend):
            out = ops.topk_sae(x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux)
            loss = (out.x_hat - x).pow(2).sum() / total
            if k_aux:
                e_hat = ops.sparse_decode(out.aux_values, out.aux_indices, W_dec, None)
                loss = loss + (e_hat - (x - out.x_hat).detach()).pow(2).sum() / total
        loss.backward()
    return step


def sparsify_step(x, weights, k):
    from sparsify import SparseCoder, SparseCoderConfig

    _, W_enc, b_enc, W_dec, b_dec = weights
    sc = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=W_enc.shape[0], k=k), device="cpu")
    with torch.no_grad():
        sc.encoder.weight.copy_(W_enc)
        sc.encoder.bias.copy_(b_enc)
        sc.W_dec.copy_(W_dec)
        sc.b_dec.copy_(b_dec)

    def step():
        sc.zero_grad(set_to_none=True)
        sc(x).fvu.backward()
    return step


def time_rows(rows, rounds, repeats):
    samples = {name: [] for name in rows}
    for fn in rows.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in rows.items():
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(s) for name, s in samples.items()}


def peak_memory(backend, B, d, n, k):
    """Extra resident memory (MiB) of one no-grad forward, in a fresh process."""
    code = f"""
import torch, sae_fast, sys
from sae_fast import ops
from sae_fast.bench import sae_tensors
x, W_enc, b_enc, W_dec, b_dec = sae_tensors({B}, {d}, {n}, bias_std={BIAS_STD})
def fwd():
    with torch.no_grad(), sae_fast.use_backend({backend!r}):
        return ops.topk_sae(x, W_enc, b_enc, W_dec, b_dec, {k})
fwd(); fwd()
def status(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1])
open('/proc/self/clear_refs', 'w').write('5')
before = status('VmRSS:')
fwd()
print((status('VmHWM:') - before) / 1024)
"""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed buffers go back to the OS at once
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    w = WORKLOADS["cpu"]  # `sae-fast bench`'s CPU workload
    p.add_argument("--B", type=int, default=w.batch)
    p.add_argument("--d", type=int, default=w.d)
    p.add_argument("--n", type=int, default=w.n)
    p.add_argument("--k", type=int, default=w.k)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="interleaved passes over all rows")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row and round")
    p.add_argument("--memory-n", type=int, nargs="*", default=[w.n, 4 * w.n], help="n values for the memory rows")
    p.add_argument("--out", help="write the table (Markdown) here and the numbers next to it as .json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    weights = sae_tensors(a.B, a.d, a.n, bias_std=BIAS_STD)
    x = weights[0]
    params = [t.clone().requires_grad_() for t in weights[1:]]
    xc = x - weights[4]
    W_enc = weights[1]
    rows = {"encoder GEMM alone (torch.mm)": lambda: torch.mm(xc, W_enc.T)}
    rows["reference backend fwd+bwd"] = sae_fast_step("reference", x, params, a.k)
    rows["torch backend fwd+bwd"] = sae_fast_step("torch", x, params, a.k)
    rows["cpu backend fwd+bwd"] = sae_fast_step("cpu", x, params, a.k)
    # AuxK as in training: k_aux = d/2 over a dead set (here a fixed 20% of the latents)
    dead = torch.rand(a.n, generator=torch.Generator().manual_seed(1)) < 0.2
    rows[f"cpu backend fwd+bwd, AuxK k_aux={a.d // 2}, 20% dead"] = sae_fast_step("cpu", x, params, a.k, dead, a.d // 2)
    try:
        rows["sparsify SparseCoder fwd+bwd"] = sparsify_step(x, weights, a.k)
    except ImportError:
        pass
    load_before = os.getloadavg()
    ms = time_rows(rows, a.rounds, a.repeats)
    load_after = os.getloadavg()
    gemm = ms["encoder GEMM alone (torch.mm)"]
    env = "".join(f"{v}={os.environ[v]} " for v in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if v in os.environ)
    cpu_best = ms["cpu backend fwd+bwd"]
    lines = [f"# CPU TopK SAE step: B={a.B} d={a.d} n={a.n} k={a.k} fp32, {a.threads} threads", "",
             f"Command: `{env}python benchmarks/cpu_topk.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`  ",
             f"torch {torch.__version__}; load average (1 min) {load_before[0]:.2f} before, "
             f"{load_after[0]:.2f} after; medians of {a.rounds}x{a.repeats} interleaved calls.", "",
             "| row | ms | x GEMM | x cpu |", "|---|---:|---:|---:|"]
    for name, v in ms.items():
        lines.append(f"| {name} | {v:.1f} | {v / gemm:.2f} | {v / cpu_best:.2f} |")
    mem = {}
    if a.memory_n:
        lines += ["", f"Peak extra memory of one no-grad forward (MiB), B={a.B} d={a.d} k={a.k}:", "",
                  "| backend | " + " | ".join(f"n={n}" for n in a.memory_n) + " |",
                  "|---|" + "---:|" * len(a.memory_n)]
        for backend in ("reference", "torch", "cpu"):
            mem[backend] = [peak_memory(backend, a.B, a.d, n, a.k) for n in a.memory_n]
            lines.append(f"| {backend} | " + " | ".join(f"{m:.1f}" for m in mem[backend]) + " |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump({"args": vars(a), "ms": ms, "peak_extra_mib": mem, "load": [load_before, load_after],
                       "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
