"""`sae-fast features`: top contexts, neighbours, features on a prompt, the dashboard."""
from __future__ import annotations

import sys

from sae_fast.cli.common import check_positive, check_writable_file, load_sae_for_model


def _parse_latents(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--latents must be comma-separated integers; got {text!r}") from None


def _features(args) -> int:
    """Top contexts, neighbours and an HTML page for an SAE's features; features firing on a prompt."""
    import torch

    from sae_fast import features
    from sae_fast.activations import default_corpus, load_model, read_corpus

    try:
        check_positive(args, "tokens", "ctx_len", "top", "count")  # before anything is loaded
        if args.html != "-":
            check_writable_file("--html", args.html)
        latents = _parse_latents(args.latents) if args.latents else None
        sae, scale, layer, model_name = load_sae_for_model(args.sae, args.model, args.layer)
        bad = [i for i in latents or () if not 0 <= i < sae.n_latents]
        if bad:  # before the model and the corpus scan
            raise ValueError(f"--latents {bad[0]} is out of range: the SAE has {sae.n_latents} latents")
        model, tok = load_model(model_name)
        texts = default_corpus() if args.corpus is None else read_corpus(args.corpus)
        top = features.top_examples(model, tok, layer, sae, texts, top=args.top, scale=scale, ctx_len=args.ctx_len,
                                    max_tokens=args.tokens)
        if latents is None:
            latents = torch.topk(top.max_activation, min(args.count, sae.n_latents)).indices.tolist()
        for latent in latents:
            print(top.show(latent))
            sims, ids = features.decoder_neighbours(sae, latent, 3)
            print("  neighbours: " + ", ".join(f"{i} ({s:.2f})" for s, i in zip(sims.tolist(), ids.tolist())))
        if args.prompt:
            print(f"features on {args.prompt!r}:")
            for token, pairs in features.on_prompt(model, tok, layer, sae, args.prompt, scale=scale):
                print(f"  {token:>12s}  " + "  ".join(f"{i}:{v:.2f}" for i, v in pairs))
        if args.html != "-":
            print(f"dashboard: {features.dashboard(top, sae, latents, args.html)}")
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"sae-fast features: error: {e}", file=sys.stderr)
        return 2
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("features", help="what an SAE's features respond to: top contexts, neighbours, a prompt, HTML",
                       description="Scan a corpus through the model, keep every latent's strongest contexts, and "
                                   "print them for the strongest latents (or --latents) with their nearest features "
                                   "by decoder cosine; write an HTML page. Defaults: the SAE `sae-fast train` "
                                   "wrote, the embedded model and corpus.")
    p.add_argument("--sae", default="sae-fast-out/sae/encoder.layer.3", help="SAE folder (any format load_sae reads; "
                   "default: %(default)s)")
    p.add_argument("--model", default=None, help="model folder, cached id or smollm2 (default: the one in the SAE's cfg.json, "
                   "else the embedded all-MiniLM-L6-v2)")
    p.add_argument("--layer", default=None, help="hooked module (default: from the SAE's cfg.json / normalization.json, "
                   "else encoder.layer.3)")
    p.add_argument("--corpus", default=None, help="text file, .jsonl or folder (default: the embedded corpus)")
    p.add_argument("--tokens", type=int, default=100_000, help="tokens to scan (default: %(default)s)")
    p.add_argument("--ctx-len", type=int, default=64, help="tokens per scanned window (default: %(default)s)")
    p.add_argument("--top", type=int, default=10, help="contexts kept per latent (default: %(default)s)")
    p.add_argument("--latents", default=None, help="comma-separated latents to show (default: the strongest)")
    p.add_argument("--count", type=int, default=8, help="how many strongest latents to show (default: %(default)s)")
    p.add_argument("--prompt", default=None, help="also list the features firing on each token of this text")
    p.add_argument("--html", default="sae-fast-out/features.html", help="dashboard path, - for none "
                   "(default: %(default)s)")
    p.set_defaults(func=_features)
