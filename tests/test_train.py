"""sae_fast.train and `sae-fast train`: config/CLI, schedules, the loop, outputs, resume after kill -9, backends."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hf_tiny import tiny_model_dir, write_corpus
from safetensors.torch import load_file

from sae_fast import SparseAutoencoder, ops
from sae_fast.cli import main
from sae_fast.io import load_sae
from sae_fast.train import TrainConfig, Trainer, list_checkpoints
from sae_fast.train.config import add_dataclass_arguments, config_from_args, field_docs
from sae_fast.train.schedule import lr_factor, sparsity_factor

FUSED = "cpu" if "cpu" in ops.available_backends() else "torch"


def _tiny_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(model=str(tiny_model_dir("gpt2")), layer="h.1", corpus=str(write_corpus(tmp_path / "corpus")),
                ctx_len=64, max_tokens=3000, eval_tokens=256, n_latents=64, k=4, batch_tokens=64, steps=60,
                warmup_steps=5, lr=1e-2, dead_tokens=640, checkpoint_every=25, log_every=10, out=str(tmp_path / "run"),
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------- config and CLI
def test_field_docstrings_are_the_help_text(capsys):
    docs = field_docs(TrainConfig)
    assert set(docs) == {f for f in TrainConfig.__dataclass_fields__}  # every field documented
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("batch_tokens", "dead_tokens", "cache_dir", "layer"):
        assert docs[name] in text
    assert "--no-normalize" in text and "{topk,batchtopk,relu,jumprelu}" in text


def test_cli_flags_build_the_config():
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainConfig)
    cfg = config_from_args(TrainConfig, parser.parse_args(
        ["--layer", "h.*", "--k", "8", "--lr", "3e-4", "--no-normalize", "--activation", "relu", "--steps", "7"]))
    assert (cfg.layer, cfg.k, cfg.lr, cfg.normalize, cfg.activation, cfg.steps) == ("h.*", 8, 3e-4, False, "relu", 7)
    assert config_from_args(TrainConfig, parser.parse_args([])) == TrainConfig()
    with pytest.raises(SystemExit):
        parser.parse_args(["--activation", "tanh"])
    with pytest.raises(ValueError, match="divisible by --grad-accum"):
        TrainConfig(batch_tokens=100, grad_accum=3)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        TrainConfig(k=0)


def test_schedules():
    total, warm = 100, 10
    f = [lr_factor(s, total, warm, 0.2) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[79] == 1.0
    assert f[80] == pytest.approx(1.0) and f[99] == pytest.approx(1 / 20) and all(a >= b for a, b in zip(f[80:], f[81:]))
    cos = [lr_factor(s, total, 0, 0.2, "cosine") for s in range(total)]
    assert cos[0] == 1.0 and cos[99] < 0.01
    assert [lr_factor(s, total, 0, 0.2, "none") for s in (0, 99)] == [1.0, 1.0]
    assert [sparsity_factor(s, 100, 0.05) for s in (0, 4, 50)] == [0.2, 1.0, 1.0]
    assert sparsity_factor(0, 100, 0.0) == 1.0


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["train", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "neither a local folder nor a model in the local Hugging Face cache" in capsys.readouterr().err
    model = str(tiny_model_dir("gpt2"))
    corpus = str(write_corpus(tmp_path / "c", 2))
    assert main(["train", "--model", model, "--layer", "h.9", "--corpus", corpus, "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "layer 'h.9' matches no module of GPT2Model; close matches: h, h.0, h.1, h.2" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert main(["train", "--model", model, "--corpus", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "nothing to train on" in capsys.readouterr().err
    assert main(["train", "--activation", "relu", "--export", "sparsify", "--out", str(tmp_path / "o")]) == 2
    assert "--export sparsify needs --activation topk" in capsys.readouterr().err
    assert main(["train", "--export", "onnx", "--out", str(tmp_path / "o")]) == 2
    assert "export must be none, saelens or sparsify" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the loop and its outputs
def test_train_writes_run_folder_and_learns(tmp_path, capsys):
    cfg = _tiny_cfg(tmp_path, layer="h.*", steps=80, export="sparsify")
    summary = Trainer(cfg).run()
    run = Path(cfg.out)
    assert set(summary["layers"]) == {"h.0", "h.1", "h.2"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["layer"] == "h.1"] == list(range(10, 81, 10))
    for layer in ("h.0", "h.1", "h.2"):
        fvu = [r["fvu"] for r in rows if r["layer"] == layer]
        assert fvu[-1] < 0.7 * fvu[0], (layer, fvu)
        sae = SparseAutoencoder.load(run / "sae" / layer)
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)  # unit-norm decoder (TopK)
        norm = json.loads((run / "sae" / layer / "normalization.json").read_text())
        assert norm["scale"] == pytest.approx(summary["layers"][layer]["activation_scale"])
        assert 0 < summary["layers"][layer]["fvu"] < 1 and summary["layers"][layer]["l0"] == pytest.approx(4.0)
        # The export reads raw activations: the activation scale is folded into its weights.
        exported = load_sae(run / "export" / "sparsify" / layer)
        scale = norm["scale"]
        torch.testing.assert_close(exported.W_enc, sae.W_enc * scale)
        torch.testing.assert_close(exported.W_dec, sae.W_dec / scale)
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000075", "step_00000080"]
    assert json.loads((run / "summary.json").read_text())["steps"] == 80


def test_dead_latents_feed_auxk(tmp_path):
    # A tiny dead window makes latents count as dead quickly; AuxK then has a non-zero loss.
    cfg = _tiny_cfg(tmp_path, n_latents=256, k=2, dead_tokens=64, steps=30, log_every=5, plot=False)
    Trainer(cfg).run()
    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert any(r["dead_pct"] > 0 for r in rows) and any(r["aux_loss"] > 0 for r in rows)
    assert all(r["loss"] == pytest.approx(r["fvu"] + r["aux_loss"] / 32, rel=1e-4) for r in rows)


@pytest.mark.parametrize("activation", ["batchtopk", "relu", "jumprelu"])
def test_other_activations_train(tmp_path, activation):
    cfg = _tiny_cfg(tmp_path, activation=activation, l1_coeff=0.05, l0_coeff=0.01, steps=40, plot=False)
    summary = Trainer(cfg).run()["layers"]["h.1"]
    assert 0 < summary["fvu"] < 1 and summary["l0"] > 0
    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["fvu"] < rows[0]["fvu"]
    sae = SparseAutoencoder.load(Path(cfg.out) / "sae" / "h.1")
    assert sae.cfg.activation == activation


def test_bf16_autocast_trains_fp32_masters_like_fp32(tmp_path, monkeypatch):
    """--dtype bf16: the SAE runs under bf16 autocast over its fp32 weights; it learns as the fp32 run does."""
    fvu, seen = {}, set()
    forward = SparseAutoencoder.forward

    def spy(self, x):
        seen.add((dtype, torch.is_autocast_enabled("cpu") and self.training))
        return forward(self, x)

    monkeypatch.setattr(SparseAutoencoder, "forward", spy)
    for dtype in ("fp32", "bf16"):
        cfg = _tiny_cfg(tmp_path / dtype, dtype=dtype, plot=False)
        fvu[dtype] = Trainer(cfg).run()["layers"]["h.1"]["fvu"]
        assert SparseAutoencoder.load(Path(cfg.out) / "sae" / "h.1").W_enc.dtype == torch.float32
    # Training steps autocast only for bf16; the held-out evaluation never does.
    assert ("fp32", True) not in seen and ("bf16", True) in seen and ("bf16", False) in seen
    assert fvu["bf16"] < 0.6 and abs(fvu["bf16"] - fvu["fp32"]) < 0.05, fvu


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    # ReLU's loss (MSE + L1) is a mean over tokens, so two half-batches give the full batch's gradient.
    common = dict(activation="relu", l1_coeff=0.01, steps=6, plot=False, normalize=True)
    a = Trainer(_tiny_cfg(tmp_path, out=str(tmp_path / "a"), grad_accum=1, **common)).run()
    b = Trainer(_tiny_cfg(tmp_path, out=str(tmp_path / "b"), grad_accum=2, **common)).run()
    wa = load_file(str(tmp_path / "a" / "sae" / "h.1" / "sae.safetensors"))
    wb = load_file(str(tmp_path / "b" / "sae" / "h.1" / "sae.safetensors"))
    for k in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(wa[k], wb[k], atol=2e-5, rtol=1e-4)
    assert a["layers"]["h.1"]["fvu"] == pytest.approx(b["layers"]["h.1"]["fvu"], rel=1e-3)


# ---------------------------------------------------------------------------- resume after kill -9
def _train_process(cfg_args, out):
    # One thread each: tiny problems gain nothing from more, and three runs share the machine's cores.
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "sae_fast.cli", "train", *cfg_args, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def test_resume_after_kill_9_follows_the_same_trajectory(tmp_path):
    model, corpus = tiny_model_dir("gpt2"), write_corpus(tmp_path / "corpus")
    args = ["--model", str(model), "--layer", "h.1", "--corpus", str(corpus), "--ctx-len", "64",
            "--max-tokens", "3000", "--eval-tokens", "256", "--n-latents", "64", "--k", "4", "--batch-tokens", "64",
            "--steps", "600", "--warmup-steps", "20", "--dead-tokens", "320", "--checkpoint-every", "10",
            "--log-every", "7", "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--no-plot"]
    # The run that is killed: kill -9 once it has written a checkpoint past step 60.
    proc = _train_process(args, tmp_path / "killed")
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = list_checkpoints(ckpts)
        if done and int(done[-1].name.split("_")[1]) >= 60:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed:\n" + proc.stdout.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = int(list_checkpoints(ckpts)[-1].name.split("_")[1])
    assert killed_at < 600
    # Resume it, and run the same configuration without interruption.
    resumed = _train_process(args + ["--resume"], tmp_path / "killed")
    straight = _train_process(args, tmp_path / "straight")
    out_r, out_s = resumed.communicate(timeout=300)[0].decode(), straight.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, out_r
    assert straight.returncode == 0, out_s
    assert "resuming from" in out_r and "reusing" in out_r  # the activation cache was reused too
    # Bit-for-bit the same SAE, and the same metrics rows (apart from the wall-clock speed).
    a = load_file(str(tmp_path / "killed" / "sae" / "h.1" / "sae.safetensors"))
    b = load_file(str(tmp_path / "straight" / "sae" / "h.1" / "sae.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def rows(run):
        out = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "tok_per_s"} for r in out]

    assert rows("killed") == rows("straight")
    assert json.loads((tmp_path / "killed" / "summary.json").read_text())["layers"] == \
        json.loads((tmp_path / "straight" / "summary.json").read_text())["layers"]


def test_resume_refuses_a_changed_config(tmp_path):
    Trainer(_tiny_cfg(tmp_path, steps=30, plot=False)).run()
    with pytest.raises(ValueError, match=r"different configuration than the checkpoint \(k: 4 -> 5"):
        Trainer(_tiny_cfg(tmp_path, steps=30, k=5, resume=True, plot=False)).run()


# ---------------------------------------------------------------------------- the embedded default
def test_reference_and_fused_backends_reach_the_same_fvu(tmp_path):
    """The default model and corpus at reduced size: same seed and data, FVU within 1% across backends."""
    common = dict(max_tokens=12_000, eval_tokens=2048, n_latents=768, k=16, batch_tokens=256, steps=120,
                  warmup_steps=10, checkpoint_every=1000, cache_dir=str(tmp_path / "cache"), progress=False, plot=False)
    fvu = {}
    for backend in ("reference", FUSED):
        summary = Trainer(TrainConfig(out=str(tmp_path / backend), backend=backend, **common)).run()
        assert summary["backend"] == backend
        fvu[backend] = summary["layers"]["encoder.layer.3"]["fvu"]
    assert fvu["reference"] < 0.5
    assert abs(fvu[FUSED] - fvu["reference"]) / fvu["reference"] < 0.01, fvu


# ---------------------------------------------------------------------------- the fused step
def test_fused_step_is_the_default_and_resumes_across_fused_and_unfused(tmp_path):
    """Checkpoints hold torch.optim.Adam's state either way: a run continues across --fused-step and
    --no-fused-step and lands where an all-fused run does (up to float rounding through Adam)."""
    logs = []
    common = dict(steps=30, checkpoint_every=10, keep_checkpoints=5, plot=False, dead_tokens=128)

    def run(out, **kw):
        trainer = Trainer(_tiny_cfg(tmp_path, out=str(tmp_path / out), **common, **kw))
        trainer.log = logs.append
        return trainer.run()

    run("straight")
    assert "step: fused (sae_fast.optim.FusedAdam)" in logs
    want = load_file(str(tmp_path / "straight" / "sae" / "h.1" / "sae.safetensors"))
    for first, then in ((False, True), (True, False)):
        out = f"mixed-{first}"
        logs.clear()
        run(out, fused_step=first)
        assert ("step: unfused (--no-fused-step)" in logs) != first
        for later in list_checkpoints(tmp_path / out / "checkpoints")[1:]:  # back to step 10
            shutil.rmtree(later)
        run(out, fused_step=then, resume=True)
        assert any("resuming from" in line and "step_00000010" in line for line in logs)
        got = load_file(str(tmp_path / out / "sae" / "h.1" / "sae.safetensors"))
        for k in ("W_enc", "W_dec", "b_enc", "b_dec"):
            torch.testing.assert_close(got[k], want[k], atol=1e-3, rtol=1e-3, msg=f"{k}, fused {first} -> {then}")


# ---------------------------------------------------------------------------- Matryoshka
def test_matryoshka_trains_and_reports_each_prefix(tmp_path, capsys):
    cfg = _tiny_cfg(tmp_path, matryoshka="8,24,64", steps=40, plot=False)
    assert cfg.matryoshka_widths == [8, 24, 64]
    flags = ["--model", cfg.model, "--layer", "h.1", "--corpus", cfg.corpus, "--ctx-len", "64", "--max-tokens", "3000",
             "--eval-tokens", "256", "--n-latents", "64", "--k", "4", "--batch-tokens", "64", "--steps", "40",
             "--lr", "1e-2", "--out", cfg.out, "--no-progress", "--no-plot", "--matryoshka", "8,24,64"]
    assert main(["train", *flags]) == 0
    printed = capsys.readouterr().out
    assert "step: fused (sae_fast.optim.FusedAdam)" in printed
    assert "FVU of each Matryoshka prefix: 8 latents " in printed
    summary = json.loads((Path(cfg.out) / "summary.json").read_text())["layers"]["h.1"]
    p = summary["prefix_fvu"]
    assert list(p) == ["8", "24", "64"] and p["64"] == pytest.approx(summary["fvu"], rel=1e-5)
    assert p["8"] > p["24"] > p["64"] > 0
    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] > r["fvu"] for r in rows)  # the inner prefixes' FVUs are in the loss
    assert SparseAutoencoder.load(Path(cfg.out) / "sae" / "h.1").cfg.matryoshka == [8, 24, 64]


@pytest.mark.parametrize("kw,match", [
    (dict(matryoshka="8,x"), "comma-separated integers"),
    (dict(matryoshka="24,8,64"), "strictly increasing"),
    (dict(matryoshka="8,32", n_latents=64), "last width must be --n-latents 64"),
    (dict(matryoshka="8,64", activation="relu"), "needs --activation topk or batchtopk"),
    (dict(matryoshka="8,64", distributed="latent"), "does not run under --distributed latent"),
])
def test_matryoshka_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_matryoshka_width_against_the_layer(tmp_path):
    with pytest.raises(ValueError, match="last width must be the 256 latents of layer 'h.1'"):
        Trainer(_tiny_cfg(tmp_path, n_latents=None, expansion=8, matryoshka="8,64", plot=False)).run()
