"""sae_fast.distributed on CPU with gloo, 2 processes: latent-sharded and data-parallel steps equal the
single-process steps (Adam included), layer-distributed equals training the layers one by one, and
checkpoints move between world sizes."""
import copy
import dataclasses
import os
import shutil
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sae_fast import SparseAutoencoder
from sae_fast.distributed import DataParallelSAE, LatentShardedSAE, attach_grad_sync, check_same_config
from sae_fast.distributed.latent_sharded import shard_range
from sae_fast.distributed.layers import assign_layers

WORLD = 2
CASES = [("topk", dict(k=4, k_aux=6, dead_tokens=40)), ("relu", dict(l1_coeff=0.05)),
         ("batchtopk", dict(k=3, k_aux=0)), ("jumprelu", dict(l0_coeff=0.1, jumprelu_bandwidth=0.5))]


def _spawn(fn, tmp_path, *args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(fn, args=(str(tmp_path / "pg"), *args), nprocs=WORLD, join=True)


def _init(rank, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def _sae(activation, kw):
    sae = SparseAutoencoder(d_in=12, n_latents=32, activation=activation, seed=1, **kw)
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(2))
        sae.tokens_since_fired[::3] = 1000  # some latents start dead: AuxK is live from step 0
    return sae


def _step(model, opt, x, unit_norm):
    out = model(x)
    out.loss.backward()
    if unit_norm:
        model.remove_parallel_grad_()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if unit_norm:
        model.normalize_decoder_()
    return out


def _close(a, b, what):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{what}: {m}")


def _compare_runs(make_dist, rows_of, steps=4, B=24, cases=CASES):
    """Run the single-process SAE and the distributed one side by side; compare losses and weights."""
    rank = dist.get_rank()
    for activation, kw in cases:
        unit_norm = activation in ("topk", "batchtopk")
        ref = _sae(activation, kw)
        par = make_dist(copy.deepcopy(ref))
        # eps well above float rounding: Adam's first steps are ~lr * sign(grad), which would turn a
        # rounding-level difference in a near-zero gradient into a full lr-sized one.
        opt_r = torch.optim.Adam(ref.parameters(), lr=1e-2, eps=1e-3)
        opt_p = torch.optim.Adam(par.parameters(), lr=1e-2, eps=1e-3)
        if isinstance(par, DataParallelSAE):
            attach_grad_sync(opt_p, par)
        gen, aux_seen = torch.Generator().manual_seed(5), False
        for step in range(steps):
            x = torch.randn(B, 12, generator=gen) * 2
            o_r = _step(ref, opt_r, x, unit_norm)
            o_p = _step(par, opt_p, rows_of(x, rank), unit_norm)
            for key in ("loss", "fvu", "mse", "aux_loss", "l1", "l0") + (("prefix_fvu",) if "matryoshka" in kw else ()):
                _close(getattr(o_p, key).detach(), getattr(o_r, key).detach(), f"{activation} step {step} {key}")
            aux_seen |= float(o_r.aux_loss.detach()) > 0
            for name, p in ref.named_parameters():
                mine = dict(par.named_parameters())
                got = mine.get(f"local.{name}", mine.get(f"module.{name}"))
                want = p[par.start:par.stop] if isinstance(par, LatentShardedSAE) and p.shape[0] == 32 else p
                _close(got.detach(), want.detach(), f"{activation} step {step} {name}")
            state = par.local if isinstance(par, LatentShardedSAE) else par.module
            counters = ref.tokens_since_fired
            if isinstance(par, LatentShardedSAE):
                counters = counters[par.start:par.stop]
            assert torch.equal(state.tokens_since_fired, counters), f"{activation} dead counters"
            _close(state.threshold, ref.threshold, f"{activation} threshold")
        assert aux_seen or activation != "topk", "AuxK never ran"


def _steps_worker(rank, init_file):
    _init(rank, init_file)
    _compare_runs(LatentShardedSAE, lambda x, r: x)
    _compare_runs(DataParallelSAE, lambda x, r: x.chunk(WORLD)[r])
    with pytest.raises(ValueError, match="ranks \\[1\\] were started with a different"):
        check_same_config({"n_latents": 32 + rank})
    _leave(rank)


def _leave(rank):
    """Leave the group together, then exit without interpreter teardown: torch's gloo backend aborts about
    1 process exit in 10 there (SIGABRT, "terminate called without an active exception"), after every
    check passed (the same exit as `sae-fast train` under torchrun)."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_latent_sharded_and_data_parallel_steps_equal_one_process(tmp_path):
    _spawn(_steps_worker, tmp_path)


MATRYOSHKA_CASES = [("topk", dict(k=4, k_aux=6, dead_tokens=40, matryoshka=[3, 11, 32])),
                    ("batchtopk", dict(k=3, k_aux=0, matryoshka=[3, 11, 32]))]


def _matryoshka_worker(rank, init_file):
    _init(rank, init_file)
    _compare_runs(DataParallelSAE, lambda x, r: x.chunk(WORLD)[r], cases=MATRYOSHKA_CASES)
    _leave(rank)


def test_data_parallel_matryoshka_steps_equal_one_process(tmp_path):
    # Each prefix's SSE is shared over the global variance: the losses, every prefix's FVU and the weights
    # after each step are the single-process ones.
    _spawn(_matryoshka_worker, tmp_path)


def test_clear_errors_for_shapes_the_world_cannot_split():
    with pytest.raises(ValueError, match="n_latents=30 must be divisible by the world size 4"):
        shard_range(30, 0, 4)
    with pytest.raises(ValueError, match="at least as many hooked layers as ranks: 1 layer"):
        assign_layers(["h.1"], 0, 2)
    assert assign_layers(["h.0", "h.1", "h.2"], 1, 2) == ["h.1"]


# ---------------------------------------------------------------------------- the trainer under a process group
def _tiny_cfg(tmp_path, **kw):
    from sae_fast.train import TrainConfig
    # The model folder is made once, by the test, and passed to the ranks: the configs must be identical.
    base = dict(model=os.environ["SAE_FAST_TEST_MODEL"], layer="h.1", corpus=str(tmp_path / "corpus"),
                ctx_len=64, max_tokens=1500, eval_tokens=128, n_latents=32, k=4, batch_tokens=64, steps=6,
                warmup_steps=1, lr=1e-2, dead_tokens=128, checkpoint_every=3, log_every=2, progress=False,
                plot=False, cache_dir=str(tmp_path / "cache"))
    base.update(kw)
    return TrainConfig(**base)


def _trainer_worker(rank, init_file, tmp_path, port):
    from sae_fast.train import Trainer
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    tmp_path = type(tmp_path)(tmp_path)
    latent = _tiny_cfg(tmp_path, distributed="latent", out=str(tmp_path / "latent"))
    Trainer(latent).run()
    for resumed in ("resume2",):  # back to the step-3 checkpoint, resumed on 2 ranks (on 1 in the test)
        if rank == 0:
            shutil.copytree(tmp_path / "latent" / "sae", tmp_path / "straight" / "sae")
            shutil.rmtree(tmp_path / "latent" / "checkpoints" / "step_00000006")
        dist.barrier()
        Trainer(dataclasses.replace(latent, resume=True)).run()
        if rank == 0:
            shutil.copytree(tmp_path / "latent" / "sae", tmp_path / resumed / "sae")
    Trainer(_tiny_cfg(tmp_path, distributed="data", out=str(tmp_path / "data"), activation="relu",
                      l1_coeff=0.05)).run()
    Trainer(_tiny_cfg(tmp_path, distributed="layers", layer="h.0,h.1", out=str(tmp_path / "layers"),
                      cache_dir=str(tmp_path / "cache2"))).run()
    _leave(rank)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close_trained(a, b, what):
    """The trainer's Adam has eps=1e-8: its first steps are ~lr * sign(grad), so a rounding-level difference
    in a near-zero gradient can move that one weight by up to ~lr. Allow a few such weights; a wrong step
    (a missing gradient sum, a wrong denominator) moves most of them (exact steps: the test above)."""
    off = ~torch.isclose(a, b, atol=2e-5, rtol=1e-4)
    assert off.float().mean() <= 0.01 and (a - b).abs().max() < 0.05, \
        f"{what}: {int(off.sum())} of {off.numel()} differ, max {(a - b).abs().max():.3g}"


def _weights(run, layer="h.1"):
    return SparseAutoencoder.load(run / "sae" / layer).state_dict()


def test_trainer_modes_equal_one_process_and_checkpoints_move_between_world_sizes(tmp_path):
    from hf_tiny import tiny_model_dir, write_corpus

    from sae_fast.train import Trainer
    write_corpus(tmp_path / "corpus")
    os.environ["SAE_FAST_TEST_MODEL"] = str(tiny_model_dir("gpt2"))  # the spawned ranks inherit it
    _spawn(_trainer_worker, tmp_path, tmp_path, _free_port())
    # One process: the same runs, and the latent run's step-3 checkpoint resumed.
    Trainer(_tiny_cfg(tmp_path, out=str(tmp_path / "one"))).run()
    shutil.rmtree(tmp_path / "latent" / "checkpoints" / "step_00000006")
    Trainer(_tiny_cfg(tmp_path, distributed="none", out=str(tmp_path / "latent"), resume=True)).run()
    Trainer(_tiny_cfg(tmp_path, out=str(tmp_path / "one_relu"), activation="relu", l1_coeff=0.05)).run()
    Trainer(_tiny_cfg(tmp_path, layer="h.0,h.1", out=str(tmp_path / "one_layers"), cache_dir=str(tmp_path / "cache2"))).run()
    one = _weights(tmp_path / "one")
    for run in ("straight", "resume2", "latent"):  # latent: resumed on one process
        got = _weights(tmp_path / run)
        for k in one:
            _close_trained(got[k].float(), one[k].float(), f"{run} {k}")
    got, want = _weights(tmp_path / "data"), _weights(tmp_path / "one_relu")
    for k in want:
        _close_trained(got[k].float(), want[k].float(), f"data {k}")
    for layer in ("h.0", "h.1"):  # layer-distributed: the same SAEs as one process training both layers
        got, want = _weights(tmp_path / "layers", layer), _weights(tmp_path / "one_layers", layer)
        for k in want:
            assert torch.equal(got[k], want[k]), f"layers {layer} {k}"
    rows = [r for r in (tmp_path / "layers" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 and not list((tmp_path / "layers").glob("metrics.rank*"))


def _cli_ranks(tmp_path, *extra):
    import subprocess
    import sys

    from hf_tiny import tiny_model_dir, write_corpus
    args = [sys.executable, "-m", "sae_fast.cli", "train", "--model", str(tiny_model_dir()), "--layer", "h.1",
            "--corpus", str(write_corpus(tmp_path / "corpus")), "--ctx-len", "64", "--max-tokens", "1500",
            "--eval-tokens", "0", "--n-latents", "32", "--k", "4", "--batch-tokens", "64", "--no-plot",
            "--no-progress", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), *extra]
    port = _free_port()
    return [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(
        os.environ, RANK=str(r), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1", PYTHONUNBUFFERED="")) for r in range(WORLD)]  # buffered, as under torchrun


def test_a_finished_run_exits_zero_on_every_rank_with_rank_0s_summary(tmp_path):
    procs = _cli_ranks(tmp_path, "--distributed", "latent", "--steps", "4", "--checkpoint-every", "2")
    outs = [p.communicate(timeout=180)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "trained 4 steps" in outs[0] and "trained" not in outs[1], outs


def test_a_killed_rank_ends_the_others_with_a_clear_error(tmp_path):
    import signal
    import time
    procs = _cli_ranks(tmp_path, "--distributed", "latent", "--steps", "100000", "--checkpoint-every", "5",
                       "--dist-timeout", "60")
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "checkpoints" / "step_00000005").is_dir():
            assert time.time() < deadline and procs[0].poll() is None, procs[0].stdout.read().decode()
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        out = procs[0].communicate(timeout=60)[0].decode()  # well within --dist-timeout: the socket closes
        assert procs[0].returncode == 3, out
        assert "a collective with the other ranks failed" in out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.parametrize("n,d,activation", [(32, 12, "topk"), (48, 7, "jumprelu"), (40, 600, "relu")])
def test_shard_init_is_the_rows_of_the_single_process_init(n, d, activation, monkeypatch):
    from sae_fast.distributed import latent_sharded
    from sae_fast.distributed.latent_sharded import shard_init_state
    from sae_fast.sae import SAEConfig
    monkeypatch.setattr(latent_sharded, "INIT_CHUNK_VALUES", 64)  # 16-row chunks: several per shard
    cfg = SAEConfig(d_in=d, n_latents=n, activation=activation, k=4)
    full = SparseAutoencoder(cfg=cfg, seed=3).state_dict()
    for world in (1, 2, 4):
        for rank in range(world):
            start, stop = shard_range(n, rank, world)
            got = shard_init_state(cfg, 3, start, stop)
            for k, v in got.items():
                want = full[k] if k == "b_dec" else full[k][start:stop]
                assert torch.equal(v, want), (world, rank, k)
