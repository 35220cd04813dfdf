"""Where a training step's GPU time goes, per kernel (torch.profiler), for one backend and workload.

    python benchmarks/profile_step.py [--backend triton] [--workload w2] [--steps 5] [--fused-step] [--trace t.json]

--fused-step profiles what ``sae-fast train`` runs (FusedAdam.step_fused, the bench's trainer-step row)
instead of backward + Adam; --trace also writes the Chrome trace (open it in Perfetto or chrome://tracing).
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import sae_fast
from sae_fast.bench import WORKLOADS, make_setup, sae_fast_harness
from sae_fast.bench.peers import trainer_step_harness

DEVICE = "cuda"  # tests/test_gpu_quick.py dry-runs the script on CPU tensors under TRITON_INTERPRET=1


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--workload", default="w2", choices=sorted(WORKLOADS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--fused-step", action="store_true", help="profile FusedAdam.step_fused (the trainer's step)")
    ap.add_argument("--trace", help="also write the Chrome trace here")
    args = ap.parse_args()
    w = WORKLOADS[args.workload]
    s = make_setup(w, torch.device(DEVICE), "bf16")  # the bench's data (ReLU: b_enc shifted to mean L0 k)
    h = sae_fast_harness(s, args.backend)            # the bench's sae-fast row: same SAE, same weights
    opt = torch.optim.Adam(h.params, lr=1e-4)

    def step():
        with sae_fast.use_backend(args.backend), torch.autocast(DEVICE, torch.bfloat16):
            _, loss = h.forward(s.x)
        loss.backward()
        h.project_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)
        h.renormalize()

    if args.fused_step:
        h = trainer_step_harness(s, args.backend)

        def step():
            with sae_fast.use_backend(args.backend), torch.autocast(DEVICE, torch.bfloat16):
                h.step(s.x)

    for _ in range(3):
        step()
    _sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        _sync()
    print(f"{args.backend} {w}: {args.steps} {'fused ' if args.fused_step else ''}steps")
    if args.trace:
        prof.export_chrome_trace(args.trace)
    print(prof.key_averages().table(sort_by=f"{DEVICE}_time_total", row_limit=30, max_name_column_width=60))


if __name__ == "__main__":
    main()
