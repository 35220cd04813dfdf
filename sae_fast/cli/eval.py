"""`sae-fast eval`: an SAE spliced into its model on held-out text (CE loss recovered, KL, FVU, L0, ...)."""
from __future__ import annotations

import json
import sys


def _eval(args) -> int:
    """Splice the SAE's reconstruction into the model and print how much of the model's loss it keeps."""
    from sae_fast.activations import default_corpus, load_model, read_corpus
    from sae_fast.activations.normalization import read_target_scale
    from sae_fast.cli.common import load_sae_for_model
    from sae_fast.evaluate import describe, evaluate

    try:
        if args.tokens < 1 or args.batch_size < 1 or args.ctx_len < 2:
            raise ValueError("--tokens and --batch-size must be >= 1 and --ctx-len >= 2")
        if not args.sink_factor >= 0:
            raise ValueError(f"--sink-factor must be >= 0; got {args.sink_factor}")
        sae, scale, layer, model_name = load_sae_for_model(args.sae, args.model, args.layer, transcoders=True)
        model, tok = load_model(model_name, auto_class="AutoModel" if args.no_lm else "AutoModelForCausalLM")
        texts = default_corpus() if args.corpus is None else read_corpus(args.corpus)
        m = evaluate(model, tok, layer, sae, texts, scale=scale, ctx_len=args.ctx_len, batch_size=args.batch_size,
                     max_tokens=args.tokens, sink_factor=args.sink_factor, lm=False if args.no_lm else None,
                     target_scale=read_target_scale(args.sae))
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"sae-fast eval: error: {e}", file=sys.stderr)
        return 2
    print(f"{model_name or 'all-MiniLM-L6-v2 (embedded)'} at {layer}, SAE {args.sae}:")
    print(describe(m))
    if "ce_clean" not in m:
        print(f"({type(model).__name__} has no LM head: the cross-entropy numbers do not apply)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(m, f, indent=2)
        print(f"numbers: {args.json}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="CE loss recovered, KL, FVU, L0 of an SAE spliced into its model",
                       description="Run the model over held-out text clean, with the SAE's reconstruction spliced "
                                   "in at its layer (a transcoder's prediction in place of its module's output), "
                                   "and with that layer zero- and mean-ablated; print next-token "
                                   "CE for each, CE loss recovered, delta LM loss, KL(clean||spliced), and FVU "
                                   "(one variance over the whole set), L0, dead fraction, cosine, shrinkage. "
                                   "Special tokens, BOS and attention sinks keep their clean activations. The "
                                   "first --tokens tokens of the corpus are the held-out set of `sae-fast train` "
                                   "with the same corpus and --ctx-len. For a model without an LM head only the "
                                   "reconstruction numbers apply.")
    p.add_argument("--sae", required=True, help="SAE folder (its cfg.json names the model and layer it was trained on)")
    p.add_argument("--model", default=None, help="model folder, cached id or smollm2 (default: the one in cfg.json)")
    p.add_argument("--layer", default=None, help="hooked module (default: the one in cfg.json / normalization.json)")
    p.add_argument("--corpus", default=None, help="text file, .jsonl or folder (default: the embedded corpus)")
    p.add_argument("--tokens", type=int, default=8192, help="evaluated tokens (default: %(default)s)")
    p.add_argument("--ctx-len", type=int, default=128, help="tokens per window (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: %(default)s)")
    p.add_argument("--sink-factor", type=float, default=4.0, help="positions with activation norm above this "
                   "multiple of the batch median are attention sinks, left clean (0: none; default: %(default)s)")
    p.add_argument("--no-lm", action="store_true", help="reconstruction numbers only (no LM head needed)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.set_defaults(func=_eval)
