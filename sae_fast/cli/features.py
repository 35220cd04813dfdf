"""`sae-fast features`: feature statistics, neighbours, logit effects, contrast and cross-lingual search, and
the dashboard site."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from sae_fast.cli.common import check_positive, check_writable_file, load_sae_for_model


def _parse_latents(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--latents must be comma-separated integers; got {text!r}") from None


def _texts(spec):
    """A corpus path (file, .jsonl, folder) as a list of texts."""
    from sae_fast.activations import read_corpus
    return list(read_corpus(spec))


def _contrast(args, model, tok, layer, sae, scale):
    from sae_fast import features
    from sae_fast.features.contrast import error_code_sets

    if args.contrast == ["errors"]:
        pos, neg = error_code_sets()
        print(f"contrast demo: {len(pos)} blocks of code that raise or show an error vs {len(neg)} of ordinary code")
    elif len(args.contrast) == 2:
        pos, neg = (_texts(p) for p in args.contrast)
    else:
        raise ValueError(f"--contrast takes POS NEG (two corpus paths) or the word errors; got {args.contrast}")
    found = features.contrast(model, tok, layer, sae, pos, neg, scale=scale, level=args.level, ctx_len=args.ctx_len,
                              max_tokens=args.tokens)
    print(found.show(args.count))
    return found


def _features(args) -> int:
    """Statistics and contexts of an SAE's features over a corpus, printed and written as a site."""
    from sae_fast import features
    from sae_fast.activations import default_corpus, load_model, read_corpus

    try:
        check_positive(args, "tokens", "ctx_len", "top", "count", "pages", "neighbours")  # before anything loads
        if args.out != "-":
            if Path(args.out).exists() and not Path(args.out).is_dir():
                raise ValueError(f"--out {args.out!r} is a file; pass a folder for the site")
            check_writable_file("--out", Path(args.out) / "index.html")
        latents = _parse_latents(args.latents) if args.latents else None
        sae, scale, layer, model_name = load_sae_for_model(args.sae, args.model, args.layer)
        bad = [i for i in latents or () if not 0 <= i < sae.n_latents]
        if bad:  # before the model and the corpus scan
            raise ValueError(f"--latents {bad[0]} is out of range: the SAE has {sae.n_latents} latents")
        model, tok = load_model(model_name, auto_class="AutoModelForCausalLM" if args.logits else "AutoModel")
        if args.logits:
            features.unembedding(model)  # not a causal LM: say so before scanning
        if args.languages:
            print(features.cross_lingual(model, tok, layer, sae, scale=scale).show(args.count))
        contrast = _contrast(args, model, tok, layer, sae, scale) if args.contrast else None
        if args.languages or (contrast is not None and args.out == "-"):
            return 0
        t0 = time.perf_counter()
        if contrast is not None:  # the site shows the contrast's features over the positive set
            stats, latents = contrast.positives, latents or contrast.latents
        else:
            texts = default_corpus() if args.corpus is None else read_corpus(args.corpus)
            stats = features.top_examples(model, tok, layer, sae, texts, top=args.top, scale=scale,
                                          ctx_len=args.ctx_len, max_tokens=args.tokens)
            took = time.perf_counter() - t0
            print(f"scanned {stats.n_tokens:,} tokens in {took:.1f} s ({stats.n_tokens / took:,.0f} tokens/s); "
                  f"{int((stats.count > 0).sum()):,} of {sae.n_latents:,} latents fired")
        chosen = latents if latents is not None else stats.choose(args.pages, args.sort)
        neighbours = features.all_neighbours(sae, min(args.neighbours, sae.n_latents - 1))
        logits = features.logit_effects(model, sae, chosen, scale=scale, tokenizer=tok) if args.logits else None
        for r, i in enumerate(chosen[:args.count] if contrast is None else []):  # the contrast printed its own
            print(stats.show(i))
            print("  neighbours: " + ", ".join(f"{j} ({s:.2f})" for s, j in
                                               zip(neighbours[0][i, :3].tolist(), neighbours[1][i, :3].tolist())))
            if logits is not None:
                print("  " + logits.show(r).replace("\n", "\n  "))
        prompts = []
        for p in args.prompt or []:
            rows = features.on_prompt(model, tok, layer, sae, p, scale=scale)
            prompts.append((p, rows))
            print(f"features on {p!r}:")
            for token, pairs in rows:
                print(f"  {features.visible(token):>12s}  " + "  ".join(f"{i}:{v:.2f}" for i, v in pairs))
        if args.out != "-":
            t0 = time.perf_counter()
            path = features.dashboard(stats, sae, args.out, chosen, by=args.sort, neighbours=neighbours,
                                      logits=logits, prompts=prompts)
            print(f"dashboard: {path} ({len(chosen)} feature pages in {time.perf_counter() - t0:.1f} s)")
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"sae-fast features: error: {e}", file=sys.stderr)
        return 2
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("features", help="what an SAE's features respond to: statistics, contexts, neighbours, "
                       "logit effects, contrast and cross-lingual search, a dashboard site",
                       description="Scan a corpus through the model in one streaming pass and gather every latent's "
                                   "density, max and mean activation, histogram, top contexts and quantile samples; "
                                   "print the chosen latents (sorted by density, leaving out latents whose top "
                                   "contexts repeat one context) with their nearest features by decoder cosine, and "
                                   "write a static site (index + one page per feature). Defaults: the SAE `sae-fast "
                                   "train` wrote, the embedded model and corpus, 100k tokens.")
    p.add_argument("--sae", default="sae-fast-out/sae/encoder.layer.3", help="SAE folder (any format load_sae reads; "
                   "default: %(default)s)")
    p.add_argument("--model", default=None, help="model folder, cached id or smollm2 (default: the one in the SAE's cfg.json, "
                   "else the embedded all-MiniLM-L6-v2)")
    p.add_argument("--layer", default=None, help="hooked module (default: from the SAE's cfg.json / normalization.json, "
                   "else encoder.layer.3)")
    p.add_argument("--corpus", default=None, help="text file, .jsonl or folder (default: the embedded corpus)")
    p.add_argument("--tokens", type=int, default=100_000, help="tokens to scan, per set with --contrast "
                   "(default: %(default)s)")
    p.add_argument("--ctx-len", type=int, default=64, help="tokens per scanned window (default: %(default)s)")
    p.add_argument("--top", type=int, default=10, help="top contexts kept per latent (default: %(default)s)")
    p.add_argument("--latents", default=None, help="comma-separated latents to show (default: chosen by --sort)")
    p.add_argument("--sort", choices=("density", "max"), default="density", help="how latents are chosen and "
                   "sorted (default: %(default)s)")
    p.add_argument("--count", type=int, default=8, help="latents printed (default: %(default)s)")
    p.add_argument("--pages", type=int, default=200, help="feature pages in the site (default: %(default)s)")
    p.add_argument("--neighbours", type=int, default=8, help="nearest features per latent (default: %(default)s)")
    p.add_argument("--logits", action="store_true", help="causal LMs: the tokens each latent's decoder direction "
                   "promotes and suppresses through the unembedding (final norm's weight applied)")
    p.add_argument("--prompt", action="append", default=None, help="also list the features firing on each token of "
                   "this text, printed and in the site's prompt page (repeatable)")
    p.add_argument("--contrast", nargs="+", metavar="PATH", default=None, help="--contrast POS NEG: rank latents "
                   "firing more on corpus POS than on corpus NEG; --contrast errors runs the demo (standard-library code that "
                   "raises or shows an error vs ordinary code)")
    p.add_argument("--level", choices=("token", "text"), default="token", help="--contrast unit: tokens, or windows "
                   "of --ctx-len tokens (default: %(default)s)")
    p.add_argument("--languages", action="store_true", help="cross-lingual features on the packaged parallel "
                   "sentences (36 concepts in en/fr/de/zh) against a shuffled control, then stop")
    p.add_argument("--out", default="sae-fast-out/features", help="folder of the dashboard site, - for none "
                   "(default: %(default)s)")
    p.set_defaults(func=_features)
