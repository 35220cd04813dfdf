"""Read features and steer with them, on the embedded all-MiniLM-L6-v2 (offline, about 30 s on 2 cores).

Uses the SAE that `sae-fast train` wrote (sae-fast-out/sae/encoder.layer.3) when it exists, else trains a
small one first. Then: the top-activating contexts of a few features over Python's docs, their nearest
neighbours by decoder direction, the features firing on a prompt, and a clamp of one feature to 5x its
maximum activation (as in Scaling Monosemanticity) that pulls the model's sentence embedding of an
unrelated prompt toward that feature's contexts.

    python examples/inspect_and_steer.py [--sae sae-fast-out/sae/encoder.layer.3] [--tokens 60000]
"""
import argparse
import itertools
from pathlib import Path

import torch

from sae_fast import SparseAutoencoder, features
from sae_fast.activations import collect_text, default_corpus, load_model, read_normalization
from sae_fast.steer import steer

LAYER = "encoder.layer.3"


def train_small(model, tok, steps: int = 200) -> tuple[SparseAutoencoder, float]:
    train, _ = collect_text(model, tok, LAYER, default_corpus(), max_tokens=40_000, progress=False)
    sae = SparseAutoencoder(384, 1536, "topk", k=32, seed=0)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-3)
    for batch in itertools.islice(train.batches(1024, normalize=True), steps):
        sae(batch[LAYER]).loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder_()
    return sae.eval(), train.scales()[LAYER]


def sentence_embedding(model, tok, texts) -> torch.Tensor:
    """Mean of the last hidden states over real tokens (how all-MiniLM-L6-v2 embeds sentences)."""
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sae", default="sae-fast-out/sae/" + LAYER, help="an SAE folder (default: sae-fast train's)")
    ap.add_argument("--tokens", type=int, default=60_000, help="corpus tokens to scan for top examples (default 60000)")
    ap.add_argument("--train-steps", type=int, default=200, help="steps when there is no SAE to load (default 200)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_model()

    folder = Path(args.sae)
    if (folder / "cfg.json").is_file():
        sae = SparseAutoencoder.load(folder).eval()
        scale, _ = read_normalization(folder)
        print(f"loaded {folder} (activation scale {scale:.3f})")
    else:
        print(f"no SAE at {folder}: training a small one")
        sae, scale = train_small(model, tok, args.train_steps)

    top = features.top_examples(model, tok, LAYER, sae, default_corpus(), top=5, scale=scale, max_tokens=args.tokens)
    picks = top.choose(3)  # by density, leaving out latents whose top contexts repeat one context
    for latent in picks:
        print("\n" + top.show(latent, context=6))
        sims, ids = features.decoder_neighbours(sae, latent, k=3)
        print("  neighbours: " + ", ".join(f"{i} ({s:.2f})" for s, i in zip(sims.tolist(), ids.tolist())))

    prompt = "for key, value in sorted(table.items()): print(key)"
    print(f"\nfeatures on {prompt!r}:")
    for token, pairs in features.on_prompt(model, tok, LAYER, sae, prompt, scale=scale, top=3):
        print(f"  {token:>10s}  " + "  ".join(f"{i}:{v:.2f}" for i, v in pairs))

    # Clamp the feature to 5x its maximum on every token of an unrelated sentence: its embedding moves
    # toward the contexts where the feature fires most.
    latent = picks[0]
    contexts = [text.replace("«", "").replace("»", "") for _, text in top.examples(latent, context=6)]
    target = sentence_embedding(model, tok, contexts).mean(0)
    plain_text = "The weather was pleasant, so we walked along the river."
    before = float(sentence_embedding(model, tok, [plain_text])[0] @ target)
    with steer(model, LAYER, sae, clamp={latent: 5 * float(top.max_activation[latent])}, scale=scale):
        after = float(sentence_embedding(model, tok, [plain_text])[0] @ target)
    print(f"\nclamping latent {latent} to 5x its max: similarity of {plain_text!r} to its top contexts "
          f"{before:.3f} -> {after:.3f}")
    return {"latent": latent, "before": before, "after": after, "max_activation": float(top.max_activation[latent])}


if __name__ == "__main__":
    main()
