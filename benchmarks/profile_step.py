"""Where a training step's GPU time goes, per kernel (torch.profiler), for one backend and workload.

    python benchmarks/profile_step.py [--backend triton] [--workload w2] [--steps 5]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import sae_fast
from sae_fast import SparseAutoencoder
from sae_fast.bench import L1_COEFF, WORKLOADS, make_setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--workload", default="w2", choices=sorted(WORKLOADS))
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    w = WORKLOADS[args.workload]
    s = make_setup(w, torch.device("cuda"), "bf16")  # the bench's data (ReLU: b_enc shifted to mean L0 k)
    sae = SparseAutoencoder(w.d, w.n, w.activation, k=w.k, k_aux=0, l1_coeff=L1_COEFF).cuda()
    with torch.no_grad():
        for p, v in ((sae.W_enc, s.W_enc), (sae.b_enc, s.b_enc), (sae.W_dec, s.W_dec), (sae.b_dec, s.b_dec)):
            p.copy_(v)
    x = s.x
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step():
        with sae_fast.use_backend(args.backend), torch.autocast("cuda", torch.bfloat16):
            out = sae(x)
        out.loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder_()

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
