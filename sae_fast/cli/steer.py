"""`sae-fast steer`: generate with and without an SAE latent clamped."""
from __future__ import annotations

import sys

from sae_fast.cli.common import check_causal_lm, check_finite, check_positive, load_sae_with_scale


def _steer(args) -> int:
    """Generate from a causal LM with and without one SAE latent clamped to a multiple of its maximum."""
    import torch

    from sae_fast import features
    from sae_fast.activations import default_corpus, load_model, read_corpus
    from sae_fast.steer import steer

    try:
        check_positive(args, "tokens", "max_new_tokens")  # before anything is loaded
        check_finite(args, "factor", "value")
        check_causal_lm(args.model)
        sae, scale, layer = load_sae_with_scale(args.sae, args.layer)
        if not (0 <= args.latent < sae.n_latents):
            raise ValueError(f"--latent must be in [0, {sae.n_latents}); got {args.latent}")
        model, tok = load_model(args.model, auto_class="AutoModelForCausalLM")
        if args.value is None:
            texts = default_corpus() if args.corpus is None else read_corpus(args.corpus)
            top = features.top_examples(model, tok, layer, sae, texts, top=1, scale=scale, max_tokens=args.tokens)
            peak = float(top.max_activation[args.latent])
            if peak <= 0:
                raise ValueError(f"latent {args.latent} never fired on {args.tokens:,} corpus tokens; pass --value")
            value = args.factor * peak
            print(f"latent {args.latent}: max activation {peak:.3f} over {top.token_ids.numel():,} tokens; "
                  f"clamping to {args.factor:g}x = {value:.3f}")
        else:
            value = args.value
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        inputs = tok(args.prompt, return_tensors="pt")
        inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        with torch.no_grad():
            plain = model.generate(**inputs, **gen)
            with steer(model, layer, sae, clamp={args.latent: value}, scale=scale):
                steered = model.generate(**inputs, **gen)
        n = inputs["input_ids"].shape[1]
        print(f"prompt:  {args.prompt}")
        print(f"plain:   {tok.decode(plain[0, n:], skip_special_tokens=True)}")
        print(f"steered: {tok.decode(steered[0, n:], skip_special_tokens=True)}")
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"sae-fast steer: error: {e}", file=sys.stderr)
        return 2
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("steer", help="generate with and without an SAE feature clamped to a multiple of its max",
                       description="The Scaling Monosemanticity experiment on your causal LM: find the latent's "
                                   "maximum activation over a corpus, clamp it to --factor times that at the "
                                   "SAE's layer on every token (the SAE's reconstruction error is kept), and "
                                   "print greedy continuations of --prompt without and with the clamp.")
    p.add_argument("--model", required=True, help="causal LM folder or cached id (the SAE's model)")
    p.add_argument("--sae", required=True, help="SAE folder (normalization.json beside it gives layer and scale)")
    p.add_argument("--latent", type=int, required=True, help="the latent to clamp")
    p.add_argument("--factor", type=float, default=5.0, help="multiple of its max activation (default: %(default)s)")
    p.add_argument("--value", type=float, default=None, help="clamp to this value instead (no corpus scan)")
    p.add_argument("--prompt", default="I think that", help="text to continue (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=30, help="tokens to generate (default: %(default)s)")
    p.add_argument("--layer", default=None, help="hooked module (default: from normalization.json)")
    p.add_argument("--corpus", default=None, help="text file, .jsonl or folder for the max (default: embedded)")
    p.add_argument("--tokens", type=int, default=50_000, help="corpus tokens scanned for the max (default: %(default)s)")
    p.set_defaults(func=_steer)
