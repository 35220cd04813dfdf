"""Checkpoint integrity: every kind of damage to the newest checkpoint is found on --resume, which falls back
to the newest intact one (and says which and why) and ends bit-for-bit where an uninterrupted run ends; with
no intact checkpoint it refuses. Files are fsynced and honour the umask."""
import json
import os
import shutil
import struct

import pytest
import torch
from hf_tiny import tiny_model_dir, write_corpus
from safetensors.torch import load_file, save_file

from sae_fast.train import TrainConfig, Trainer
from sae_fast.train.checkpoint import CheckpointError, _sha256, list_checkpoints, read_checkpoint

LAYER = "h.1"


def _cfg(root, out, **kw):
    base = dict(model=str(tiny_model_dir("gpt2")), layer=LAYER, corpus=str(root / "corpus"), ctx_len=64,
                max_tokens=2000, eval_tokens=128, n_latents=64, k=4, batch_tokens=64, steps=20, warmup_steps=2,
                lr=1e-2, dead_tokens=320, checkpoint_every=10, log_every=5, out=str(out), cache_dir=str(root / "cache"),
                progress=False, plot=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run of 20 steps with checkpoints at 10 and 20, and its final SAE."""
    root = tmp_path_factory.mktemp("ckpt")
    write_corpus(root / "corpus")
    Trainer(_cfg(root, root / "run")).run()
    return root, load_file(str(root / "run" / "sae" / LAYER / "sae.safetensors"))


def _copy(finished_run, tmp_path):
    root, final = finished_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    (run / "summary.json").unlink()  # as if killed after the last checkpoint, before the outputs
    shutil.rmtree(run / "sae")
    return root, final, run


def _resume(root, run):
    logged = []
    trainer = Trainer(_cfg(root, run, resume=True))
    trainer.log = logged.append
    trainer.run()
    return "\n".join(logged)


def _flip(path, tensor, offset=0):
    """Flip one byte inside ``tensor``'s data in a safetensors file."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start = json.loads(raw[8:8 + n])[tensor]["data_offsets"][0]
    raw[8 + n + start + offset] ^= 0x40
    path.write_bytes(bytes(raw))


def _edit_state(ckpt, **changes):
    state = json.loads((ckpt / "state.json").read_text())
    state.update(changes)
    (ckpt / "state.json").write_text(json.dumps(state))


def _rewrite(ckpt, name, edit):
    """Change a tensor file and re-sign it in the manifest: only the value checks can find this damage."""
    path = ckpt / name
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    state = json.loads((ckpt / "state.json").read_text())
    state["files"][name] = _sha256(path)
    (ckpt / "state.json").write_text(json.dumps(state))


def _nan_row(t):
    t["W_enc"][3] = float("nan")


CORRUPTIONS = {
    "flipped byte in W_enc": (lambda c: _flip(c / LAYER / "sae.safetensors", "W_enc", 100), "does not match its checksum"),
    "flipped byte in Adam moments": (lambda c: _flip(c / "trainer.safetensors", f"{LAYER}/1/exp_avg_sq", 8),
                                     "does not match its checksum"),
    "data_position=-5000": (lambda c: _edit_state(c, data_position=-5000), "data_position=-5000 is out of range"),
    "step=1e9": (lambda c: _edit_state(c, step=1e9), "step=1000000000.0 is out of range"),
    "missing Adam entry": (lambda c: _rewrite(c, "trainer.safetensors", lambda t: t.pop(f"{LAYER}/1/exp_avg_sq")),
                           f"the Adam state {LAYER}/1/exp_avg_sq is missing"),
    "NaN row in W_enc": (lambda c: _rewrite(c, f"{LAYER}/sae.safetensors", _nan_row), f"{LAYER}/W_enc has 32 non-finite"),
    "deleted state.json": (lambda c: (c / "state.json").unlink(), "state.json is missing"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_damaged_newest_checkpoint_falls_back_to_the_intact_one(finished_run, tmp_path, kind):
    root, final, run = _copy(finished_run, tmp_path)
    newest, older = list_checkpoints(run / "checkpoints")[::-1]
    corrupt, reason = CORRUPTIONS[kind]
    corrupt(newest)
    with pytest.raises(CheckpointError, match=reason):
        read_checkpoint(newest, batch_tokens=64)
    log = _resume(root, run)
    assert f"checkpoint {newest} is damaged (" in log and reason in log, log
    assert f"falling back to {older.name}, the newest intact checkpoint" in log
    assert f"resuming from {older} (step 10/20)" in log
    # The resumed run retrains steps 11-20 from the intact checkpoint: bit-for-bit the uninterrupted run's SAE.
    resumed = load_file(str(run / "sae" / LAYER / "sae.safetensors"))
    assert all(torch.equal(resumed[k], final[k]) for k in final)


def test_no_intact_checkpoint_is_refused(finished_run, tmp_path):
    root, _, run = _copy(finished_run, tmp_path)
    newest, older = list_checkpoints(run / "checkpoints")[::-1]
    _edit_state(newest, data_position=-5000)
    _flip(older / LAYER / "sae.safetensors", "W_dec")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*checkpoints \(step_00000020: data_position"
                                              r"=-5000 is out of range .*; step_00000010: .*does not match its checksum"):
        _resume(root, run)


def test_intact_checkpoints_pass_for_every_activation(finished_run, tmp_path):
    root, _ = finished_run
    for act in ("batchtopk", "relu", "jumprelu"):
        Trainer(_cfg(root, tmp_path / act, activation=act, steps=10, cache_dir=None)).run()
        read_checkpoint(list_checkpoints(tmp_path / act / "checkpoints")[-1], batch_tokens=64)


def test_checkpoint_files_follow_the_umask(finished_run, tmp_path):
    root, _ = finished_run
    old = os.umask(0o022)
    try:
        Trainer(_cfg(root, tmp_path / "run", steps=10)).run()
    finally:
        os.umask(old)
    ckpt = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert ckpt.stat().st_mode & 0o777 == 0o755  # mkdtemp alone gives 0700
    assert (tmp_path / "run" / "sae" / LAYER).stat().st_mode & 0o777 == 0o755
    assert (ckpt / LAYER / "sae.safetensors").stat().st_mode & 0o777 == 0o644


def test_checkpoint_is_fsynced_before_the_rename(finished_run, tmp_path, monkeypatch):
    root, _ = finished_run
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    Trainer(_cfg(root, tmp_path / "run", steps=10, checkpoint_every=10)).run()
    ckpt = str(tmp_path / "run" / "checkpoints" / "step_00000010")
    i = events.index(("replace", ckpt))
    synced = {p for kind, p in events[:i] if kind == "fsync"}
    assert any(p.endswith("trainer.safetensors") for p in synced) and any(p.endswith("state.json") for p in synced)
    assert ("fsync", str(tmp_path / "run" / "checkpoints")) in events[i:]  # the rename itself, in its folder
