"""`sae-fast steer`: generate with and without SAE latents clamped, added or ablated, and measure the effect."""
from __future__ import annotations

import sys

from sae_fast.cli.common import check_causal_lm, check_finite, check_positive


def _ints(text, flag) -> list[int]:
    try:
        return [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated latent ids; got {text!r}") from None


def _pairs(text) -> dict[int, float]:
    out = {}
    for part in (p for p in str(text).split(",") if p.strip()):
        latent, _, amount = part.partition("=")
        try:
            out[int(latent)] = float(amount)
        except ValueError:
            raise ValueError(f"--add takes LATENT=AMOUNT pairs, comma-separated; got {text!r}") from None
    return out


def _factors(text) -> list[float]:
    import math

    try:
        factors = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--sweep takes comma-separated factors; got {text!r}") from None
    if not factors or not all(math.isfinite(f) for f in factors):
        raise ValueError(f"--sweep takes comma-separated finite factors; got {text!r}")
    return factors


def _steer(args) -> int:
    """Continuations without and with the intervention, side by side, with its measured effect."""
    from sae_fast.activations import default_corpus, load_model, read_corpus
    from sae_fast.activations.corpus import encode_prompt
    from sae_fast.cli.common import load_sae_for_model
    from sae_fast.steer_effect import (
        cached_latent_max,
        generate,
        latent_on_text,
        promoted_logprob_change,
        promoted_tokens,
        require_causal_lm,
    )

    try:
        latents, ablate, add = _ints(args.latent or "", "--latent"), _ints(args.ablate or "", "--ablate"), \
            _pairs(args.add or "")
        if not (latents or ablate or add):
            raise ValueError("name what to steer: --latent N[,M] (clamp), --add N=AMOUNT or --ablate N")
        check_positive(args, "tokens", "max_new_tokens")  # before anything is loaded
        check_finite(args, "factor", "value")
        factors = _factors(args.sweep) if args.sweep else [args.factor]
        sae, scale, layer, model_name = load_sae_for_model(args.sae, args.model, args.layer)
        check_causal_lm(model_name)  # from its config, before the weights load
        for i in [*latents, *ablate, *add]:
            if not 0 <= i < sae.n_latents:
                raise ValueError(f"latent {i} is out of range: the SAE has {sae.n_latents} latents [0, {sae.n_latents})")
        model, tok = load_model(model_name, auto_class="AutoModelForCausalLM")
        require_causal_lm(model)
        if latents and args.value is None:
            corpus = "embedded" if args.corpus is None else str(args.corpus)
            peak = cached_latent_max(args.sae, model, tok, layer, sae,
                                     lambda: default_corpus() if args.corpus is None else read_corpus(args.corpus),
                                     corpus, scale, args.tokens)
            for i in latents:
                if peak[i] <= 0:
                    raise ValueError(f"latent {i} never fired on {args.tokens:,} corpus tokens; pass --value")
                print(f"latent {i}: max activation {float(peak[i]):.3f} over {args.tokens:,} {corpus} corpus tokens")
        inputs = encode_prompt(tok, args.prompt)
        gen = dict(max_new_tokens=args.max_new_tokens, sample=args.sample, temperature=args.temperature, seed=args.seed)
        base = generate(model, tok, inputs, None, **gen)
        show = latents or list(add) or ablate
        text = lambda ids: tok.decode(ids[0], skip_special_tokens=True).replace("\n", "\\n")  # noqa: E731
        print(f"prompt:    {args.prompt}\nbaseline:  {text(base)}")
        for i in show:
            words = [tok.decode([t]) for t in promoted_tokens(model, sae, i, 8).tolist()]
            m = latent_on_text(model, layer, sae, inputs, base, i, scale)
            print(f"  latent {i} promotes {words}; on the baseline text: mean {m['mean']:.3f}, "
                  f"fires on {m['fires']}/{m['tokens']} tokens")
        for f in factors:
            clamp = {i: (args.value if args.value is not None else f * float(peak[i])) for i in latents}
            edit = dict(layer=layer, sae=sae, clamp=clamp, add={i: a * (f if args.sweep else 1) for i, a in add.items()},
                        ablate=ablate, scale=scale, positions=args.positions)
            new = generate(model, tok, inputs, edit, **gen)
            what = ", ".join([f"{i}={v:.2f}" for i, v in clamp.items()] + [f"{i}+={a:.2f}" for i, a in edit["add"].items()]
                             + [f"{i}=0" for i in ablate])
            print(f"steered ({f:g}x: {what}; {args.positions} positions):\n           {text(new)}")
            for i in show:
                m = latent_on_text(model, layer, sae, inputs, new, i, scale)
                dlp = promoted_logprob_change(model, inputs, base, edit, promoted_tokens(model, sae, i, 10))
                print(f"  latent {i} re-measured on this text (steering off): mean {m['mean']:.3f}, fires on "
                      f"{m['fires']}/{m['tokens']} tokens; log P(its 10 promoted tokens) {dlp:+.3f} nats/position")
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"sae-fast steer: error: {e}", file=sys.stderr)
        return 2
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("steer", help="generate with and without SAE features clamped/added/ablated; measure the effect",
                       description="The Scaling Monosemanticity experiment on a causal LM: find each latent's maximum "
                                   "activation over a corpus (special tokens, BOS and attention sinks left out; cached "
                                   "beside the SAE in max_activation.safetensors), clamp it to --factor times that at "
                                   "the SAE's layer (the SAE's reconstruction error is kept), and print the baseline "
                                   "and steered continuations of --prompt. The effect is measured: the latent "
                                   "re-measured on each generated text with steering off, and the change in "
                                   "log-probability of the tokens its decoder direction promotes (teacher-forced on "
                                   "the baseline continuation).")
    p.add_argument("--sae", required=True, help="SAE folder (its cfg.json names the model and layer)")
    p.add_argument("--model", default=None, help="causal LM folder, cached id or smollm2 (default: the SAE's, "
                   "from cfg.json)")
    p.add_argument("--latent", default=None, help="latent(s) to clamp, comma-separated")
    p.add_argument("--factor", type=float, default=5.0, help="clamp to this multiple of each latent's max "
                   "(default: %(default)s)")
    p.add_argument("--sweep", default=None, help="comma-separated factors, e.g. 1,2,5,10: one continuation and "
                   "measurement each (scales --add amounts too)")
    p.add_argument("--value", type=float, default=None, help="clamp to this value instead (no corpus scan)")
    p.add_argument("--add", default=None, help="LATENT=AMOUNT pairs added to the latents (SAE units), comma-separated")
    p.add_argument("--ablate", default=None, help="latents set to 0, comma-separated")
    p.add_argument("--positions", choices=("all", "prompt", "generated"), default="all",
                   help="where the edit applies: every token, the prompt's, or the generated ones (default: all)")
    p.add_argument("--prompt", default="I think that", help="text to continue (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=30, help="tokens to generate (default: %(default)s)")
    p.add_argument("--sample", action="store_true", help="sample (with --temperature, --seed) instead of greedy")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for baseline and steered")
    p.add_argument("--layer", default=None, help="hooked module (default: the SAE's, from cfg.json)")
    p.add_argument("--corpus", default=None, help="text file, .jsonl or folder for the maxima (default: embedded)")
    p.add_argument("--tokens", type=int, default=50_000, help="corpus tokens scanned for the maxima "
                   "(default: %(default)s)")
    p.set_defaults(func=_steer)
