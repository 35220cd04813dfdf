"""Training past one device on torch.distributed (torchrun; NCCL on GPUs, gloo on CPUs).

    data_parallel.py    every rank holds the SAE and encodes its rows; global loss denominators, summed grads
    wrapper.py          the SAE attributes both wrappers forward to the SAE (or shard) they hold
    latent_sharded.py   every rank owns n / world latents; top-k merged with an all_gather of B x k
    layers.py           every rank trains the SAEs of its own hooked layers
    checkpoint.py       gathering shards into one ordinary checkpoint, and splitting it for any world size
    collectives.py      the autograd-aware collectives and the cross-rank top-k merge
"""
from .collectives import Replicate, SumShards, check_same_config, merge_top
from .data_parallel import DataParallelSAE, attach_grad_sync, sync_gradients
from .latent_sharded import LatentShardedSAE

__all__ = ["DataParallelSAE", "LatentShardedSAE", "attach_grad_sync", "sync_gradients", "SumShards", "Replicate",
           "merge_top", "check_same_config"]
