"""The trainer's view of a distributed run: ``plan_for(trainer)`` gives the few hooks Trainer calls
(data loading, which layers, making SAEs and wrapping optimizers, checkpoints, metrics, the final write). With
``distributed="none"`` they are the single-process behaviour unchanged.

Under torchrun the process group comes from the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...): NCCL
when the run is on CUDA (one device per LOCAL_RANK), gloo on CPU, with ``dist_timeout`` seconds as the
group's timeout, so a rank that dies or stalls makes the others fail with an error instead of waiting
forever. Every rank must be given the same configuration (checked: a hash is all_gathered).
"""
from __future__ import annotations

import dataclasses
import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..sae import SparseAutoencoder
from ..train.checkpoint import restore, save_checkpoint
from .checkpoint import gather_full, restore_distributed, save_distributed_checkpoint
from .collectives import check_same_config
from .data_parallel import DataParallelSAE, attach_grad_sync
from .latent_sharded import LatentShardedSAE, shard_range
from .layers import assign_layers

MODES = ("none", "data", "latent", "layers")
_LOCAL_FIELDS = ("progress", "device")  # may differ per rank


class SingleProcess:
    """The hooks for an ordinary run."""
    mode, rank, world, writes_files = "none", 0, 1, True

    def load_data(self, load):
        return load()

    def own_layers(self, layers):
        return list(layers)

    def make_sae(self, cfg, device, seed):
        return SparseAutoencoder(cfg=cfg, device=device, seed=seed)

    def optimizer(self, opt, sae):
        return opt

    def save_checkpoint(self, *args):
        return save_checkpoint(*args)

    def restore(self, ckpt, saes, opts):
        return restore(ckpt, saes, opts)

    def metrics_path(self, path: Path) -> Path:
        return path

    def finish(self, finish, saes, *args):
        return finish(saes, *args)


def init_process_group(device: torch.device, timeout_s: float, mode: str) -> None:
    """Join torchrun's process group (a no-op when the caller already initialised one)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError(f"--distributed {mode} runs under torchrun (RANK and WORLD_SIZE are not set): "
                         f"torchrun --nproc-per-node N -m sae_fast.cli train --distributed {mode} ...")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


class Distributed(SingleProcess):
    """The hooks for ``mode`` in data | latent | layers on the current process group."""

    def __init__(self, trainer):
        cfg = trainer.cfg
        self.mode = cfg.distributed
        if trainer.device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", 0))
            trainer.device = torch.device("cuda", local)
            torch.cuda.set_device(trainer.device)
        init_process_group(trainer.device, cfg.dist_timeout, self.mode)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.writes_files = self.rank == 0
        self.out = Path(trainer.out)
        check_same_config({k: v for k, v in cfg.to_dict().items() if k not in _LOCAL_FIELDS}, "training configuration")
        micro = cfg.batch_tokens // cfg.grad_accum
        if self.mode == "data" and micro < self.world:
            raise ValueError(f"--distributed data needs at least one token per rank in a micro-batch: "
                             f"batch_tokens / grad_accum = {micro} on {self.world} ranks")
        if self.mode == "latent" and cfg.n_latents:
            shard_range(cfg.n_latents, self.rank, self.world)  # the clear error before any data work
        if self.rank:  # one progress bar and one log, from rank 0
            trainer.cfg = dataclasses.replace(cfg, progress=False)
            trainer.log = lambda *a, **k: None

    def load_data(self, load):
        if self.rank == 0:
            data = load()
            dist.barrier()
        else:  # rank 0 collects (into --cache-dir, which the others then reuse) before the others read
            dist.barrier()
            data = load()
        return data

    def own_layers(self, layers):
        return assign_layers(list(layers), self.rank, self.world) if self.mode == "layers" else list(layers)

    def make_sae(self, cfg, device, seed):
        if self.mode == "latent":  # only this rank's rows are ever made
            return LatentShardedSAE(cfg=cfg, seed=seed, device=device)
        sae = SparseAutoencoder(cfg=cfg, device=device, seed=seed)
        return DataParallelSAE(sae, takes_global_batch=True) if self.mode == "data" else sae

    def optimizer(self, opt, sae):
        if self.mode == "data":
            attach_grad_sync(opt, sae)
        return opt

    def save_checkpoint(self, root, step, state, saes, opts, scales, keep):
        return save_distributed_checkpoint(root, step, state, saes, opts, scales, keep, self.mode)

    def restore(self, ckpt, saes, opts):
        return restore_distributed(ckpt, saes, opts)

    def metrics_path(self, path: Path) -> Path:
        if self.rank == 0:
            return path
        if self.mode == "layers":  # rank 0 merges these into metrics.jsonl at the end
            return path.with_name(f"{path.stem}.rank{self.rank}{path.suffix}")
        return Path(os.devnull)  # the same global rows as rank 0's

    def finish(self, finish, saes, evals, scales, step, total):
        """Rank 0 writes the whole SAEs as ordinary folders (and evaluates them); all ranks return its summary."""
        full, _ = gather_full(saes, None, self.mode)
        summary = None
        if self.rank == 0:
            if self.mode == "layers":
                self._merge_metrics(self.out / "metrics.jsonl", list(scales))
            summary = finish({n: full[n] for n in scales if n in full}, evals, scales, step, total)
        box = [summary]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _merge_metrics(self, path: Path, order: list[str]) -> None:
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
        for r in range(1, self.world):
            part = path.with_name(f"{path.stem}.rank{r}{path.suffix}")
            if part.is_file():
                rows += [json.loads(x) for x in part.read_text().splitlines() if x.strip()]
                part.unlink()
        rows.sort(key=lambda row: (row.get("step", 0), order.index(row["layer"]) if row.get("layer") in order else 0))
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def plan_for(trainer):
    """The hooks for ``trainer.cfg.distributed``."""
    mode = trainer.cfg.distributed
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {MODES}; got {mode!r}")
    return SingleProcess() if mode == "none" else Distributed(trainer)
