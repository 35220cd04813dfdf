"""Checkpoints and final SAEs of distributed runs, in the ordinary single-process format.

Saving gathers on rank 0 (latent shards concatenated in rank order, layer-distributed SAEs collected
from their ranks), rank 0 writes the usual atomic checkpoint folder (train/checkpoint.py) and every rank
waits at a barrier, so all ranks leave the step together. Loading reads and checks that folder on every
rank (``train.checkpoint.newest_intact``) and keeps the rank's part: its latent rows (of the weights,
the dead-latent counters and the Adam moments) or its layers. So a checkpoint moves between world sizes
and modes, including to and from one process. The gather holds the whole SAE and its Adam moments on
rank 0 (open: per-rank shard files for dictionaries too big for one host).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..sae import SparseAutoencoder
from ..train.checkpoint import Checkpoint, CheckpointError, save_checkpoint
from .data_parallel import DataParallelSAE
from .latent_sharded import LATENT_BUFFERS, LATENT_PARAMS, LatentShardedSAE


class _OptimizerState:
    """What save_checkpoint reads from an optimizer: ``state_dict()["state"]``."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return {"state": self._state}


def local_module(sae) -> SparseAutoencoder:
    if isinstance(sae, LatentShardedSAE):
        return sae.local
    return sae.module if isinstance(sae, DataParallelSAE) else sae


def _gather_rows(t: torch.Tensor, group=None) -> torch.Tensor | None:
    """Every rank's rows of ``t`` concatenated in rank order, on rank 0 (None on the others)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    t = t.detach().contiguous().cpu() if dist.get_backend(group) == "gloo" else t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(world)] if rank == 0 else None
    dist.gather(t, parts, dst=0, group=group)
    return torch.cat(parts, 0).cpu() if rank == 0 else None


def _gather_latent(sae: LatentShardedSAE, opt) -> tuple[SparseAutoencoder | None, dict | None]:
    rank = sae.rank
    full = {}
    for k, v in sae.local.state_dict().items():
        full[k] = _gather_rows(v, sae.group) if k in LATENT_PARAMS + LATENT_BUFFERS else v.detach().cpu()
    names = [n for n, _ in sae.local.named_parameters()]
    state = {}
    for i, st in opt.state_dict()["state"].items():
        state[i] = {}
        for key, value in st.items():
            rows = names[i] in LATENT_PARAMS and isinstance(value, torch.Tensor) and value.dim() > 0
            state[i][key] = _gather_rows(value, sae.group) if rows else value
    if rank:
        return None, None
    weights = {k: v for k, v in full.items() if k not in ("tokens_since_fired", "threshold")}
    buffers = {k: full[k] for k in ("tokens_since_fired", "threshold")}
    return SparseAutoencoder.from_weights(sae.cfg, weights, buffers=buffers), state


def gather_full(saes: dict, opts: dict | None, mode: str, group=None):
    """On rank 0: ({layer: whole SparseAutoencoder}, {layer: optimizer-like}) of all layers; ({}, {})
    elsewhere. A collective: every rank calls it at the same point."""
    rank = dist.get_rank(group)
    if mode == "latent":
        out_s, out_o = {}, {}
        for n, sae in saes.items():
            full, state = _gather_latent(sae, opts[n] if opts else _OptimizerState({}))
            if rank == 0:
                out_s[n], out_o[n] = full, _OptimizerState(state)
        return out_s, out_o
    if mode == "data":  # identical on every rank
        if rank:
            return {}, {}
        return {n: local_module(s) for n, s in saes.items()}, dict(opts or {})
    mine = {n: (local_module(s).cfg, {k: v.detach().cpu() for k, v in local_module(s).state_dict().items()},
                opts[n].state_dict()["state"] if opts else {}) for n, s in saes.items()}
    got = [None] * dist.get_world_size(group) if rank == 0 else None
    dist.gather_object(mine, got, dst=0, group=group)
    if rank:
        return {}, {}
    out_s, out_o = {}, {}
    for part in got:
        for n, (cfg, state, ostate) in part.items():
            weights = {k: v for k, v in state.items() if k not in ("tokens_since_fired", "threshold")}
            buffers = {k: state[k] for k in ("tokens_since_fired", "threshold")}
            out_s[n] = SparseAutoencoder.from_weights(cfg, weights, buffers=buffers)
            out_o[n] = _OptimizerState(ostate)
    return out_s, out_o


def save_distributed_checkpoint(root, step, state, saes, opts, scales, keep, mode: str, group=None):
    """The ordinary checkpoint of the whole run, written by rank 0 once every rank reached ``step``."""
    full_saes, full_opts = gather_full(saes, opts, mode, group)
    if mode == "layers":  # each rank summed the metrics of its own layers since the last log row
        sums = [None] * dist.get_world_size(group)
        dist.all_gather_object(sums, state["log_sums"], group=group)
        state = {**state, "log_sums": {k: v for part in sums for k, v in part.items()}}
    path = None
    if dist.get_rank(group) == 0:
        order = [n for n in scales if n in full_saes]  # the layers in the run's order
        path = save_checkpoint(root, step, state, {n: full_saes[n] for n in order},
                               {n: full_opts[n] for n in order}, scales, keep)
    dist.barrier(group=group)
    return path


def _rows(name: str, t: torch.Tensor, sae) -> torch.Tensor:
    if not isinstance(sae, LatentShardedSAE) or name not in LATENT_PARAMS + LATENT_BUFFERS or t.dim() == 0:
        return t
    return t[sae.start:sae.stop]


def restore_distributed(ckpt: Checkpoint, saes: dict, opts: dict) -> dict:
    """Put this rank's part of a checked checkpoint (``train.checkpoint.newest_intact``; any world size
    wrote it) into the run: its latent rows or its layers. Returns the checkpoint's meta."""
    missing = sorted(set(saes) - set(ckpt.saes))
    if missing:
        raise CheckpointError(f"checkpoint {ckpt.path} has layers {sorted(ckpt.saes)}, this run hooks {missing} too")
    for layer, sae in saes.items():
        target, saved = local_module(sae), ckpt.saes[layer]
        if saved.cfg != sae.cfg:
            raise CheckpointError(f"checkpoint {ckpt.path} holds a different SAE for {layer!r}: {saved.cfg} vs {sae.cfg}")
        target.load_state_dict({k: _rows(k, v, sae) for k, v in saved.state_dict().items()})
        names = [n for n, _ in target.named_parameters()]
        state = {i: {key: _rows(names[i], t, sae) for key, t in entry.items()} for i, entry in ckpt.adam[layer].items()}
        sd = opts[layer].state_dict()
        sd["state"] = state  # load_state_dict moves each tensor to its parameter's device and dtype
        opts[layer].load_state_dict(sd)
    torch.set_rng_state(ckpt.rng)
    return ckpt.meta
