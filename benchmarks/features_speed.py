"""Speed of reading features on this machine: the one-pass statistics (tokens/s and latent-tokens/s), the
all-pairs decoder neighbours, and the dashboard's generation. Appends one line per measurement, with the
load average, to benchmarks/results/features-speed.txt.

    python benchmarks/features_speed.py stats --n 3072          # the trained default SAE if n matches, else random
    python benchmarks/features_speed.py stats --n 65536 --tokens 4000
    python benchmarks/features_speed.py neighbours --n 65536
    python benchmarks/features_speed.py dashboard --pages 1000
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from sae_fast import SparseAutoencoder, features
from sae_fast.activations import LayerCapture, default_corpus, load_model, read_normalization

TRAINED = Path("sae-fast-out/sae/encoder.layer.3")
RESULTS = Path(__file__).resolve().parent / "results" / "features-speed.txt"


def record(line: str) -> None:
    load = "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    full = f"{time.strftime('%Y-%m-%d %H:%M')} {platform.processor() or platform.machine()} " \
           f"{torch.get_num_threads()} threads, {load}: {line}"
    print(full)
    with RESULTS.open("a") as f:
        f.write(full + "\n")


def sae_for(n: int) -> tuple[SparseAutoencoder, float, str]:
    if TRAINED.is_dir():
        sae = SparseAutoencoder.load(TRAINED)
        if sae.n_latents == n:
            scale, _ = read_normalization(TRAINED)
            return sae.eval(), scale, "trained default SAE"
    return SparseAutoencoder(384, n, "topk", k=32, seed=0).eval(), 1.0, "random TopK SAE (k=32)"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("stats", "neighbours", "dashboard"))
    p.add_argument("--n", type=int, default=3072)
    p.add_argument("--tokens", type=int, default=20_000)
    p.add_argument("--pages", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    args = p.parse_args()
    torch.manual_seed(0)
    sae, scale, kind = sae_for(args.n)
    if args.what == "neighbours":
        t0 = time.perf_counter()
        features.all_neighbours(sae, k=args.k)
        s = time.perf_counter() - t0
        record(f"all_neighbours n={args.n:,} d={sae.d_in} k={args.k}: {s:.1f} s "
               f"({args.n ** 2 * sae.d_in * 2 / s / 1e9:.0f} GFLOP/s)")
        return
    model, tok = load_model()
    spent = {"model": 0.0, "sae": 0.0}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t
        return wrapper

    LayerCapture.run = timed("model", LayerCapture.run)
    sae.encode = timed("sae", sae.encode)
    t0 = time.perf_counter()
    stats = features.top_examples(model, tok, "encoder.layer.3", sae, default_corpus(), scale=scale,
                                  max_tokens=args.tokens, progress=False)
    s = time.perf_counter() - t0
    if args.what == "stats":
        rest = s - spent["model"]  # everything but the model's forward: SAE encode, statistics, tokenizing
        record(f"statistics pass, {kind} n={args.n:,}, {stats.n_tokens:,} tokens: {s:.1f} s in all "
               f"({stats.n_tokens / s:,.0f} tokens/s), of which model forward {spent['model']:.1f} s, fused SAE "
               f"encode {spent['sae']:.1f} s, statistics + tokenizing {rest - spent['sae']:.1f} s; without the "
               f"model: {stats.n_tokens / rest:,.0f} tokens/s = {stats.n_tokens * args.n / rest:,.3g} latent-tokens/s")
        return
    chosen = stats.choose(args.pages)
    t0 = time.perf_counter()
    neighbours = features.all_neighbours(sae, 8)
    t1 = time.perf_counter()
    features.dashboard(stats, sae, "sae-fast-out/features-speed", chosen, neighbours=neighbours)
    t2 = time.perf_counter()
    record(f"dashboard, {kind} n={args.n:,}: {len(chosen)} feature pages in {t2 - t1:.1f} s "
           f"({len(chosen) / (t2 - t1):.0f} pages/s; neighbours {t1 - t0:.1f} s before)")


if __name__ == "__main__":
    main()
