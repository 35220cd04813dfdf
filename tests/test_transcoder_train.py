"""Transcoders end to end: both ends of a module from one forward (hooks), `sae-fast train --transcode`
(cache, outputs, export), and the spliced evaluation with a transcoder's prediction in place of the output."""
import json
import math
import shutil

import pytest
import torch
from hf_tiny import tiny_model_dir, write_corpus
from safetensors.torch import load_file

from sae_fast import SparseAutoencoder, ops
from sae_fast.activations import load_model
from sae_fast.activations.hooks import TARGET_SUFFIX, capture
from sae_fast.cli import main
from sae_fast.cli.common import load_sae_for_model
from sae_fast.evaluate import evaluate
from sae_fast.train import TrainConfig, Trainer, list_checkpoints

TEXTS = ["The cat sat on the mat. " * 6, "def f(x):\n    return x + 1\n" * 4, "A B C D E F G " * 5]


def test_capture_gives_both_ends_of_a_module_in_one_forward():
    model, tok = load_model(tiny_model_dir("llama-lm", layers=2, width=32), auto_class="AutoModelForCausalLM")
    ids = tok("hello world, twice", return_tensors="pt")
    mlp = model.model.layers[1].mlp
    seen = {}
    h = mlp.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
    calls = []
    h2 = model.model.register_forward_pre_hook(lambda m, a, kw: calls.append(1), with_kwargs=True)
    try:
        acts = capture(model, "model.layers.1.mlp", transcode=True, **ids)
    finally:
        h.remove()
        h2.remove()
    assert len(calls) == 1 and set(acts) == {"model.layers.1.mlp", "model.layers.1.mlp" + TARGET_SUFFIX}
    assert torch.equal(acts["model.layers.1.mlp"], seen["x"]) and torch.equal(acts["model.layers.1.mlp:out"], seen["y"])


def _cfg(tmp_path, **kw):
    base = dict(model=str(tiny_model_dir("llama-lm", layers=2, width=32)), layer="layers.1.mlp",
                corpus=str(write_corpus(tmp_path / "corpus")), ctx_len=64, max_tokens=3000, eval_tokens=256,
                n_latents=64, k=4, batch_tokens=64, steps=40, warmup_steps=5, lr=1e-2, dead_tokens=640,
                checkpoint_every=20, log_every=10, out=str(tmp_path / "run"), progress=False, plot=False,
                transcode=True, skip_connection=True, backend="cpu" if "cpu" in ops.available_backends() else None)
    base.update(kw)
    return TrainConfig(**base)


def test_train_transcode_writes_a_transcoder_that_beats_the_mean(tmp_path, capsys):
    cfg = _cfg(tmp_path, cache_dir=str(tmp_path / "cache"), export="sparsify")
    trainer = Trainer(cfg)
    logs = []
    trainer.log = logs.append
    summary = trainer.run()
    m = summary["layers"]["layers.1.mlp"]
    assert m["d_in"] == m["d_out"] == 32 and 0 < m["fvu"] < 0.9  # the target's FVU, well below the mean's 1
    if "cpu" in ops.available_backends():
        assert "step: fused (sae_fast.optim.FusedAdam)" in logs
    folder = tmp_path / "run" / "sae" / "layers.1.mlp"
    sae = SparseAutoencoder.load(folder)
    assert sae.cfg.transcode and sae.cfg.skip_connection and sae.W_skip.any()
    norm = json.loads((folder / "normalization.json").read_text())
    assert norm["target_scale"] == pytest.approx(m["target_scale"]) and norm["scale"] == m["activation_scale"]
    spliced = m["spliced"]  # the model has an LM head: the prediction replaced the MLP's output
    assert math.isfinite(spliced["ce_spliced"]) and spliced["kl"] >= 0 and spliced["fvu"] < 1 and spliced["transcoder"]
    assert SparseAutoencoder.load(tmp_path / "run" / "export" / "sparsify" / "layers.1.mlp").cfg.transcode
    # sae-fast eval splices it in again from the folder; features/steer (a layer's output) refuse it
    assert main(["eval", "--sae", str(folder), "--corpus", cfg.corpus, "--tokens", "128", "--ctx-len", "32"]) == 0
    assert "recovers" in capsys.readouterr().out
    with pytest.raises(ValueError, match="holds a transcoder"):
        load_sae_for_model(folder, None, None)
    # the cache holds both ends; an SAE run on it is another configuration, refused
    meta = json.loads((tmp_path / "cache" / "train" / "meta.json").read_text())
    assert meta["layers"] == ["layers.1.mlp", "layers.1.mlp:out"] and meta["fingerprint"]["transcode"]
    with pytest.raises(ValueError, match="transcode"):
        Trainer(_cfg(tmp_path, cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run2"), transcode=False,
                     skip_connection=False)).run()


def test_train_transcode_to_another_width_runs_unfused(tmp_path):
    """gate_proj reads 32 and writes 64: d_out != d_in, the fused kernel's one width does not fit."""
    trainer = Trainer(_cfg(tmp_path, layer="layers.1.mlp.gate_proj", steps=20, eval_tokens=0, skip_connection=False))
    logs = []
    trainer.log = logs.append
    m = trainer.run()["layers"]["layers.1.mlp.gate_proj"]
    assert (m["d_in"], m["d_out"]) == (32, 64)
    assert any("step: unfused (a transcoder with d_out != d_in" in line for line in logs)


def test_config_refuses_what_transcoders_do_not_combine_with():
    with pytest.raises(ValueError, match="--skip-connection needs --transcode"):
        TrainConfig(skip_connection=True)
    with pytest.raises(ValueError, match="--matryoshka is not supported"):
        TrainConfig(transcode=True, n_latents=64, matryoshka="16,64")


@torch.no_grad()
def test_spliced_eval_replaces_the_module_output_with_the_prediction():
    """down_proj is linear: a skip transcoder whose W_skip is its weight (scaled: inputs x 0.7, targets x 1.3)
    and no active latent predicts it exactly, so spliced = clean; with W_skip = 0 spliced = the zero ablation,
    and with b_dec = the mean output the mean ablation."""
    model, tok = load_model(tiny_model_dir("llama-lm", layers=3, width=32), auto_class="AutoModelForCausalLM")
    W = model.model.layers[1].mlp.down_proj.weight  # (32, 64)
    sae = SparseAutoencoder(64, 48, "relu", transcode=True, d_out=32, skip_connection=True, seed=0).eval()
    sae.b_enc.fill_(-1e4)  # nothing fires
    sae.W_skip.copy_(W * (1.3 / 0.7))
    kw = dict(scale=0.7, target_scale=1.3, ctx_len=24, batch_size=2, max_tokens=10**6, sink_factor=0.0,
              progress=False)
    exact = evaluate(model, tok, "layers.1.mlp.down_proj", sae, iter(TEXTS), **kw)
    assert exact["ce_spliced"] == pytest.approx(exact["ce_clean"], abs=1e-5) and exact["kl"] < 1e-6
    assert exact["fvu"] < 1e-6 and exact["l0"] == 0
    sae.W_skip.zero_()
    mean = evaluate(model, tok, "layers.1.mlp.down_proj", sae, iter(TEXTS), **kw)
    assert mean["ce_spliced"] == pytest.approx(mean["ce_zero"], abs=1e-5)  # predicts 0: the zero ablation
    from sae_fast.evaluate import layer_mean
    mu = layer_mean(model, tok, "model.layers.1.mlp.down_proj", iter(TEXTS), ctx_len=24, batch_size=2,
                    max_tokens=10**6, sink_factor=0.0)
    sae.b_dec.copy_(mu.float() * 1.3)
    ablated = evaluate(model, tok, "layers.1.mlp.down_proj", sae, iter(TEXTS), **kw)
    assert ablated["ce_spliced"] == pytest.approx(ablated["ce_mean"], abs=1e-5)
    assert ablated["fvu"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="reads width 64 and outputs 32, the SAE reads 32"):
        evaluate(model, tok, "layers.1.mlp.down_proj", SparseAutoencoder(32, 48, "relu", transcode=True), TEXTS,
                 progress=False)


def test_resume_continues_a_transcoder_exactly(tmp_path):
    """W_skip's Adam state is in the checkpoint: back to step 20 and resumed (fused), the run lands where it did."""
    common = dict(steps=40, checkpoint_every=20, keep_checkpoints=5, eval_tokens=0, cache_dir=str(tmp_path / "c"))
    Trainer(_cfg(tmp_path, **common)).run()
    folder = tmp_path / "run" / "sae" / "layers.1.mlp"
    want = load_file(str(folder / "sae.safetensors"))
    for later in list_checkpoints(tmp_path / "run" / "checkpoints")[1:]:
        shutil.rmtree(later)
    (tmp_path / "run" / "summary.json").unlink()
    Trainer(_cfg(tmp_path, resume=True, **common)).run()
    got = load_file(str(folder / "sae.safetensors"))
    for k in ("W_enc", "W_dec", "W_skip", "b_enc", "b_dec"):
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=k)


def test_a_checkpoint_from_before_transcoders_resumes():
    """A config saved before the transcode fields existed lacks them: their defaults are no change."""
    from sae_fast.train.runfolder import trajectory_changes
    now = TrainConfig().to_dict()
    old = {k: v for k, v in now.items() if k not in ("transcode", "skip_connection")}
    assert trajectory_changes(old, now) == []
    assert trajectory_changes(old, TrainConfig(transcode=True).to_dict()) == ["transcode: False -> True"]
