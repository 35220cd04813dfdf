"""A skip-transcoder training step, ours against sparsify's, on the CPU (issue 19's transcoder row).

    python benchmarks/transcoder_step.py [--d 384] [--n 3072] [--k 32] [--batch 1024] [--reps 5] [--threads 2]

Both: TopK transcoder with a skip connection (W_skip d x d), AuxK on dead latents (a third of them dead, the
default k_aux = d / 2), the target a different tensor than the input, Adam over every parameter. Ours: one
``FusedAdam.step_fused(x, target=y)`` (cpu backend). sparsify 1.3.3: ``SparseCoder(transcode=True,
skip_connection=True)`` forward(x, y, dead_mask), (fvu + auxk) backward, torch.optim.Adam step (its trainer
uses signum by default; Adam is the like-for-like optimizer). Reports the median of ``--reps`` timed steps
after two warm-up steps, and checks the two compute the same loss on the same weights first.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import time

import torch

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decoder needs a GPU


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in (("d", 384), ("n", 3072), ("k", 32), ("batch", 1024), ("reps", 5), ("threads", 2)):
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import sae_fast
    from sae_fast import SparseAutoencoder
    from sae_fast.optim import FusedAdam
    with contextlib.redirect_stdout(io.StringIO()):
        from sparsify import SparseCoder, SparseCoderConfig

    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, a.d, generator=g)
    y = torch.randn(a.batch, a.d, generator=g) + x
    ours = SparseAutoencoder(a.d, a.n, "topk", k=a.k, transcode=True, skip_connection=True, seed=0, dead_tokens=1)
    with torch.no_grad():
        ours.W_dec.normal_(generator=g).mul_(a.d ** -0.5)
        ours.W_skip.normal_(generator=g).mul_(0.1 * a.d ** -0.5)
    dead = torch.zeros(a.n, dtype=torch.bool)
    dead[::3] = True
    theirs = SparseCoder(a.d, SparseCoderConfig(num_latents=a.n, k=a.k, transcode=True, skip_connection=True))
    with torch.no_grad():
        theirs.encoder.weight.copy_(ours.W_enc)
        theirs.encoder.bias.copy_(ours.b_enc)
        theirs.W_dec.copy_(ours.W_dec)
        theirs.b_dec.copy_(ours.b_dec)
        theirs.W_skip.copy_(ours.W_skip)

    def keep_dead():  # the same dead set every step, for both
        ours.tokens_since_fired.copy_(torch.where(dead, 10**9, 0))

    keep_dead()
    with sae_fast.use_backend("cpu"):  # grad mode on: AuxK runs in training forwards only
        mine = ours(x, target=y)
        out = theirs(x, y, dead_mask=dead)
    # The FVUs agree. The AuxK numbers differ by design: ours is a fraction of the residual's variance
    # (reference.auxk_loss), sparsify's of the target's (its total_variance); the same work either way.
    print(f"same weights: FVU ours {float(mine.fvu.detach()):.6f}, sparsify {float(out.fvu.detach()):.6f}; "
          f"AuxK ours {float(mine.aux_loss.detach()):.6f}, sparsify {float(out.auxk_loss.detach()):.6f}")

    opt = FusedAdam(ours, lr=1e-4)
    topt = torch.optim.Adam(theirs.parameters(), lr=1e-4)

    def ours_step():
        keep_dead()
        with sae_fast.use_backend("cpu"):
            opt.step_fused(x, target=y)

    def theirs_step():
        o = theirs(x, y, dead_mask=dead)
        (o.fvu + o.auxk_loss / 32).backward()
        topt.step()
        topt.zero_grad(set_to_none=True)

    rows = []
    for name, step in (("sae-fast FusedAdam.step_fused (cpu)", ours_step), ("sparsify 1.3.3 + torch Adam", theirs_step)):
        for _ in range(2):
            step()
        times = []
        for _ in range(a.reps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        rows.append((name, statistics.median(times)))
    print(f"skip transcoder step, B={a.batch} d={a.d} n={a.n} k={a.k}, AuxK k_aux={a.d // 2}, {a.threads} threads, "
          f"median of {a.reps}:")
    for name, t in rows:
        print(f"  {name:40s} {1e3 * t:8.1f} ms")
    print(f"  speed-up: {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
