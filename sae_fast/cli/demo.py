"""`sae-fast demo`: a TopK SAE on synthetic data with a known dictionary."""
from __future__ import annotations

import argparse
import json
import sys
import time


def _demo(args) -> int:
    """Train a TopK SAE on synthetic data with a known dictionary; report how many features it recovered."""
    import torch
    from tqdm import tqdm

    import sae_fast
    from sae_fast import SparseAutoencoder
    from sae_fast.cli.common import check_finite, check_positive
    from sae_fast.synthetic import SparseDictionaryData, best_cosines

    try:  # every argument before any work
        check_positive(args, "d", "features", "active", "n_latents", "k", "steps", "batch")
        check_finite(args, "lr")
        if args.k > args.n_latents:
            raise ValueError(f"--k {args.k} is more than --n-latents {args.n_latents}")
        if args.active > args.features:
            raise ValueError(f"--active {args.active} is more than --features {args.features}")
        if not args.lr > 0:
            raise ValueError(f"--lr must be > 0; got {args.lr}")
    except ValueError as e:
        print(f"sae-fast demo: error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    data = SparseDictionaryData(args.d, args.features, active=args.active, seed=args.seed)
    sae = SparseAutoencoder(args.d, args.n_latents, "topk", k=args.k, seed=args.seed,
                            dead_tokens=args.batch * 50)
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    backend = sae_fast.get_backend("cpu").name
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"demo [{backend}]", disable=args.quiet)
    for _ in bar:
        out = sae(data.sample(args.batch))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()
        bar.set_postfix(fvu=f"{out.fvu.item():.3f}", l0=f"{out.l0.item():.1f}",
                        dead=f"{sae.dead_mask.float().mean().item():.1%}")
    elapsed = time.perf_counter() - start
    sae.eval()
    cosines = best_cosines(sae.W_dec, data.features)
    with torch.no_grad():
        final = sae(data.sample(4096))
    result = {
        "backend": backend,
        "steps": args.steps,
        "seconds": round(elapsed, 2),
        "fvu": round(final.fvu.item(), 4),
        "l0": round(final.l0.item(), 2),
        "dead_fraction": round(sae.dead_mask.float().mean().item(), 4),
        "feature_recovery": round(sum(cosines) / len(cosines), 4),  # synthetic.recovery
    }
    print(json.dumps(result, indent=2))
    found = sum(c > 0.9 for c in cosines)
    print(f"feature_recovery: the mean, over the {args.features} true features, of each one's best cosine with "
          f"a decoder row (1 = every feature found exactly); {found} of them have a decoder row within cosine 0.9")
    if args.out:
        sae.save(args.out)
        print(f"saved the SAE to {args.out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a TopK SAE on synthetic data with a known dictionary (seconds, CPU)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--d", type=int, default=64, help="activation width")
    p.add_argument("--features", type=int, default=256, help="ground-truth features in the data")
    p.add_argument("--active", type=int, default=4, help="ground-truth features active per sample")
    p.add_argument("--n-latents", type=int, default=512, help="SAE dictionary size")
    p.add_argument("--k", type=int, default=8, help="active latents per token")
    p.add_argument("--steps", type=int, default=600, help="training steps")
    p.add_argument("--batch", type=int, default=512, help="tokens per step")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default=None, help="folder to save the trained SAE in")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_demo)
