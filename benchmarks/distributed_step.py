"""Latent-sharded and data-parallel SAE steps on 1 and 2 gloo ranks (CPU): step time and memory per rank,
plus the MODEL table of memory per rank and collective bytes per step at 1M / 4M / 34M latents.

    OMP_NUM_THREADS=1 python benchmarks/distributed_step.py            # measure (1 thread per rank)
    python benchmarks/distributed_step.py --model-only                 # print the modelled table only

Memory per rank: the SAE's training state (weights, gradients, Adam moments) counted from the tensors,
and the process's peak RSS (torch itself is ~0.3 GB of that). Timing: median of --steps full steps
(forward, backward, gradient sum where data-parallel, Adam, decoder renorm) after 2 warm-up steps.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, init, args, out):
    from sae_fast import SparseAutoencoder
    from sae_fast.distributed import DataParallelSAE, LatentShardedSAE, attach_grad_sync
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    full = SparseAutoencoder(d_in=args.d, n_latents=args.n, k=args.k, seed=0, k_aux=args.k_aux, dead_tokens=1)
    if args.mode == "latent":
        sae = LatentShardedSAE(full)
        del full
    else:
        sae = DataParallelSAE(full, takes_global_batch=True)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    if args.mode == "data":
        attach_grad_sync(opt, sae)
    x = torch.randn(args.batch, args.d, generator=torch.Generator().manual_seed(1))
    times = []
    for i in range(args.steps + 2):
        dist.barrier()
        t = time.perf_counter()
        out_ = sae(x)
        out_.loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        opt.zero_grad(set_to_none=False)
        sae.normalize_decoder_()
        dist.barrier()
        if i >= 2:
            times.append(time.perf_counter() - t)
    state = sum(p.numel() * p.element_size() * 4 for p in sae.parameters())  # weight, grad, 2 Adam moments
    res = {"rank": rank, "step_ms": 1000 * statistics.median(times), "state_mb": state / 2**20,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def measure(args) -> list[dict]:
    rows = []
    for mode in args.modes:
        for world in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                a = argparse.Namespace(**{**vars(args), "mode": mode})
                mp.spawn(_worker, args=(world, f"{tmp}/pg", a, f"{tmp}/res"), nprocs=world, join=True)
                for r in range(world):
                    with open(f"{tmp}/res.{r}") as f:
                        rows.append({"mode": mode, "world": world, **json.load(f)})
    return rows


# ---------------------------------------------------------------------------- the model
def model_rows(d=4096, B=4096, k=64, k_aux=2048, latents=(2**20, 2**22, 34 * 2**20), worlds=(8, 16, 32, 64)):
    """Bytes per rank, fp32 master weights + fp32 grads + 2 fp32 Adam moments (16 bytes per weight);
    per-step bytes each rank receives in collectives (ring all_reduce ~ 2 x the buffer)."""
    out = []
    for n in latents:
        for w in worlds:
            state_latent = 16 * 2 * (n // w) * d
            # all_gather of fp32 values + int64 keys, top-k and AuxK's top-k_aux, (w - 1) peers' B x k each
            gather = (w - 1) * B * (k + k_aux) * 12
            reduce = 2 * 2 * B * d * 4  # x_hat and AuxK's e_hat partials, fp32
            out.append({"n": n, "world": w, "latent_state_gb": state_latent / 1e9,
                        "latent_collective_gb": (gather + reduce) / 1e9,
                        "data_state_gb": 16 * 2 * n * d / 1e9, "data_collective_gb": 2 * 2 * n * d * 4 / 1e9})
    return out


def print_model():
    print("MODEL (not measured): d=4096, B=4096 tokens/step, k=64, AuxK k_aux=2048, fp32 weights+grads+Adam")
    print("| latents | GPUs | latent-sharded state / rank | latent-sharded collectives / rank / step | "
          "data-parallel state / rank | data-parallel gradient all_reduce / rank / step |")
    print("|---|---|---|---|---|---|")
    for r in model_rows():
        print(f"| {r['n'] / 2**20:.0f}M | {r['world']} | {r['latent_state_gb']:.1f} GB | "
              f"{r['latent_collective_gb']:.2f} GB | {r['data_state_gb']:.0f} GB | {r['data_collective_gb']:.0f} GB |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--k-aux", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--modes", nargs="+", default=["latent", "data"])
    p.add_argument("--model-only", action="store_true")
    args = p.parse_args(argv)
    if not args.model_only:
        rows = measure(args)
        print(f"measured: gloo on this machine, B={args.batch} d={args.d} n={args.n} k={args.k} "
              f"k_aux={args.k_aux} (all latents dead: AuxK on), {os.environ.get('OMP_NUM_THREADS', '?')} thread(s)/rank")
        print("| mode | ranks | rank | step (ms) | SAE train state (MB) | peak RSS (MB) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['mode']} | {r['world']} | {r['rank']} | {r['step_ms']:.0f} | {r['state_mb']:.0f} | "
                  f"{r['peak_rss_mb']:.0f} |")
        print()
    print_model()
    return 0


if __name__ == "__main__":
    sys.exit(main())
