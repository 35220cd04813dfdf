"""Where a training step's GPU time goes, per kernel (torch.profiler), for one backend and workload.

    python benchmarks/profile_step.py [--backend triton] [--workload w2] [--steps 5]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import sae_fast
from sae_fast.bench import WORKLOADS, make_setup, sae_fast_harness


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--workload", default="w2", choices=sorted(WORKLOADS))
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    w = WORKLOADS[args.workload]
    s = make_setup(w, torch.device("cuda"), "bf16")  # the bench's data (ReLU: b_enc shifted to mean L0 k)
    h = sae_fast_harness(s, args.backend)            # the bench's sae-fast row: same SAE, same weights
    opt = torch.optim.Adam(h.params, lr=1e-4)

    def step():
        with sae_fast.use_backend(args.backend), torch.autocast("cuda", torch.bfloat16):
            _, loss = h.forward(s.x)
        loss.backward()
        h.project_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)
        h.renormalize()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    print(f"{args.backend} {w}: {args.steps} steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))


if __name__ == "__main__":
    main()
