"""Run folders: one run at a time (a lock, two processes), --resume compares only what changes the trajectory
and checks it before any expensive work, a cache of another configuration is never overwritten, a finished
run says so at once, divergence stops the run, a NaN held-out set fails when collected, a full disk is one
line naming the folder."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hf_tiny import tiny_model_dir, write_corpus
from safetensors import SafetensorError

from sae_fast.activations import ActivationStore
from sae_fast.cli import main
from sae_fast.io import load_sae
from sae_fast.train import TrainConfig, Trainer, list_checkpoints
from sae_fast.train import trainer as trainer_module
from sae_fast.train.trainer import TrainingDiverged

DISK_FULL = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c")


def _cfg(corpus, out, **kw):
    base = dict(model=str(tiny_model_dir("gpt2")), layer="h.1", corpus=str(corpus), ctx_len=64, max_tokens=2000,
                eval_tokens=128, n_latents=64, k=4, batch_tokens=64, steps=10, warmup_steps=2, lr=1e-2,
                dead_tokens=320, checkpoint_every=5, log_every=5, out=str(out), progress=False, plot=False)
    return TrainConfig(**{**base, **kw})


def _args(cfg: TrainConfig) -> list[str]:
    out = ["train"]
    for key in ("model", "layer", "corpus", "ctx_len", "max_tokens", "eval_tokens", "n_latents", "k", "batch_tokens",
                "steps", "warmup_steps", "lr", "dead_tokens", "checkpoint_every", "log_every", "out"):
        out += ["--" + key.replace("_", "-"), str(getattr(cfg, key))]
    return out + ["--no-progress", "--no-plot"]


def _error(capsys) -> str:
    """stderr's one line from sae-fast (transformers' own progress bars aside)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("sae-fast train: error: "), lines
    return lines[0]


def _no_data(self):
    raise AssertionError("load_data ran: the check should have come before any expensive work")


# ---------------------------------------------------------------------------- one run per folder
def test_second_run_in_the_same_folder_fails_at_once_and_a_stale_lock_is_taken_over(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from sae_fast.train.runfolder import RunLock\n"
                               f"with RunLock({str(run)!r}):\n    print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = _args(_cfg(corpus, run))
        t0 = time.perf_counter()
        assert main(args) == 1
        err = _error(capsys)
        assert time.perf_counter() - t0 < 5
        assert f"--out {run} is in use by another sae-fast run (pid {holder.pid})" in err
        assert not (run / "checkpoints").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    # The holder was killed -9: its lock is stale, and the next run takes it over.
    assert main(_args(_cfg(corpus, run))) == 0
    assert f"taking over the lock of {run} from pid {holder.pid}, which is no longer running" in capsys.readouterr().out


# ---------------------------------------------------------------------------- --resume
def test_resume_ignores_the_out_spelling_and_export_and_says_finished_at_once(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Trainer(_cfg(corpus, "relrun")).run()
    monkeypatch.setattr(Trainer, "load_data", _no_data)
    for out in ("./relrun", str(tmp_path / "relrun")):
        summary = Trainer(_cfg(corpus, out, resume=True, export="saelens")).run()
        assert summary["finished_before"] and summary["steps"] == 10
    # The --export it did not have is written from the final checkpoint, scale folded in.
    exported, sae = load_sae(tmp_path / "relrun" / "export" / "saelens" / "h.1"), load_sae(tmp_path / "relrun" / "sae" / "h.1")
    scale = json.loads((tmp_path / "relrun" / "sae" / "h.1" / "normalization.json").read_text())["scale"]
    torch.testing.assert_close(exported.W_enc, sae.W_enc * scale)
    (tmp_path / "relrun").rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(_args(_cfg(corpus, "moved")) + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "has already finished (10 steps): nothing to resume" in out
    assert "SAE: moved/sae/h.1 (SparseAutoencoder.load)" in out and "<layer>" not in out


def test_resume_with_a_changed_config_is_refused_before_the_activations(corpus, tmp_path, monkeypatch):
    Trainer(_cfg(corpus, tmp_path / "run", steps=10)).run()
    monkeypatch.setattr(Trainer, "load_data", _no_data)
    with pytest.raises(ValueError, match=r"different configuration than the checkpoint \(max_tokens: 2000 -> 2500\)"):
        Trainer(_cfg(corpus, tmp_path / "run", max_tokens=2500, resume=True)).run()


def test_a_cache_of_another_configuration_is_never_overwritten(corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    Trainer(_cfg(corpus, tmp_path / "a", cache_dir=str(cache))).run()
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    monkeypatch.setattr(trainer_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=r"--cache-dir .*cache holds the activations of another configuration "
                                         r"\(max_tokens: 2000 \(cache\) vs 2500 \(this run\)\)"):
        Trainer(_cfg(corpus, tmp_path / "b", cache_dir=str(cache), max_tokens=2500)).run()
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == before


def test_export_path_is_printed(corpus, tmp_path, capsys):
    assert main(_args(_cfg(corpus, tmp_path / "run")) + ["--export", "saelens"]) == 0
    out = capsys.readouterr().out
    assert f"SAE: {tmp_path / 'run' / 'sae' / 'h.1'}" in out
    assert f"export (saelens): {tmp_path / 'run' / 'export' / 'saelens'}" in out


# ---------------------------------------------------------------------------- divergence and non-finite data
def test_divergence_stops_at_the_first_check_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    real = trainer_module.lr_factor
    monkeypatch.setattr(trainer_module, "lr_factor", lambda step, *a: 1e35 if step >= 12 else real(step, *a))
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 15 \(layer h.1: loss nan.*The last good "
                                               r"checkpoint, .*step_00000010, is kept"):
        Trainer(_cfg(corpus, tmp_path / "run", steps=40)).run()
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000005", "step_00000010"]


def test_huge_lr_exits_non_zero_naming_the_step_and_cause(corpus, tmp_path, capsys):
    assert main(_args(_cfg(corpus, tmp_path / "run", lr=1e30, steps=40))) == 1
    err = _error(capsys)
    assert "training diverged at step 5" in err and "--lr 1e+30 is far too high" in err
    assert not (tmp_path / "run" / "sae").exists()


def test_nan_in_the_held_out_set_fails_before_training(corpus, tmp_path, monkeypatch):
    def nan_data(self):
        train, evals = ActivationStore(["h.1"]), ActivationStore(["h.1"])
        train.add({"h.1": torch.randn(256, 8)})
        x = torch.randn(64, 8)
        x[5, 2] = float("nan")
        evals.add({"h.1": x})
        return train.finish(), evals.finish()

    monkeypatch.setattr(Trainer, "load_data", nan_data)
    with pytest.raises(ValueError, match="held-out activations of layer 'h.1' have 1 non-finite values"):
        Trainer(_cfg(corpus, tmp_path / "run")).run()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------- a full disk
def test_disk_full_on_a_checkpoint_is_one_line_naming_the_folder(corpus, tmp_path, monkeypatch, capsys):
    def full(*a, **k):
        raise SafetensorError(DISK_FULL)

    monkeypatch.setattr("sae_fast.train.checkpoint.save_file", full)
    assert main(_args(_cfg(corpus, tmp_path / "run"))) == 1
    err = _error(capsys)
    assert f"no space left on the disk of {tmp_path / 'run' / 'checkpoints'}" in err
    assert not list((tmp_path / "run" / "checkpoints").iterdir())  # no half-written checkpoint left behind


def test_disk_full_on_the_cache_is_one_line_naming_the_folder(corpus, tmp_path, monkeypatch, capsys):
    def full(*a, **k):
        raise SafetensorError(DISK_FULL)

    monkeypatch.setattr("sae_fast.activations.store.save_file", full)
    assert main(_args(_cfg(corpus, tmp_path / "run")) + ["--cache-dir", str(tmp_path / "cache")]) == 1
    err = _error(capsys)
    assert f"no space left on the disk of {tmp_path / 'cache'}" in err
