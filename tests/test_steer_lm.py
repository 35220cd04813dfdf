"""Steering a causal LM: the real SmolLM2 (zero intervention = identical logits; a clamp changes the
generated tokens and is measured), positions prompt/generated on a tiny Llama, and `sae-fast steer`'s
bad input refused before any model is loaded."""
from __future__ import annotations

import pytest
import torch

from sae_fast import SparseAutoencoder
from sae_fast.activations import load_model
from sae_fast.activations.corpus import encode_prompt
from sae_fast.cli import main
from sae_fast.sae import save_sae
from sae_fast.steer import steer
from sae_fast.steer_effect import (
    generate,
    latent_on_text,
    promoted_logprob_change,
    promoted_tokens,
    require_causal_lm,
)
from tests.hf_tiny import tiny_model_dir


def test_smollm2_zero_intervention_is_identical_and_a_clamp_changes_the_text(smollm2):
    model, tok = smollm2
    sae = SparseAutoencoder(576, 128, "topk", k=8, seed=0).eval()
    inputs = encode_prompt(tok, "The capital of France is")
    assert inputs["input_ids"][0, 0] == tok.bos_token_id
    with torch.no_grad():
        clean = model(**inputs).logits
        with steer(model, "layers.15", sae, scale=0.05):
            same = model(**inputs).logits
    assert torch.equal(clean, same)
    base = generate(model, tok, inputs, None, max_new_tokens=4)
    edit = dict(layer="layers.15", sae=sae, clamp={3: 400.0}, scale=0.05)
    new = generate(model, tok, inputs, edit, max_new_tokens=4)
    assert not torch.equal(base, new)
    assert "Paris" in tok.decode(base[0])
    # the clamp pushes the residual along latent 3's decoder row: its promoted tokens gain probability
    assert promoted_logprob_change(model, inputs, base, edit, promoted_tokens(model, sae, 3, 10)) > 0
    m = latent_on_text(model, "layers.15", sae, inputs, base, 3, 0.05)
    assert m["tokens"] == 4 and m["mean"] >= 0


def test_positions_prompt_and_generated_split_the_edit():
    model, tok = load_model(tiny_model_dir("llama-lm", layers=3, width=32), auto_class="AutoModelForCausalLM")
    sae = SparseAutoencoder(32, 64, "topk", k=4, seed=0).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    seen = {}
    layer = dict(model.named_modules())["model.layers.2"]  # after the steered one
    handle = layer.register_forward_hook(lambda m, a, out: seen.__setitem__("x", out[0] if isinstance(out, tuple)
                                                                             else out))
    outs = {}
    try:
        with torch.no_grad():
            model(input_ids=ids)
            clean = seen["x"].clone()
            for where in ("prompt", "generated", "all"):
                with steer(model, "layers.1", sae, add={0: 3.0}, positions=where, prompt_len=3):
                    model(input_ids=ids[:, :3])   # the prompt pass, then one token at a time as generate does
                    first = seen["x"].clone()
                    model(input_ids=ids[:, 3:4])
                    later = seen["x"].clone()
                outs[where] = (first, later)
    finally:
        handle.remove()
    changed = lambda a, b: not torch.allclose(a, b)  # noqa: E731
    assert changed(outs["prompt"][0], clean[:, :3]) and not changed(outs["generated"][0], clean[:, :3])
    assert changed(outs["all"][0], clean[:, :3]) and changed(outs["all"][1], outs["prompt"][1])
    assert changed(outs["generated"][1], outs["prompt"][1])  # the 4th position: edited only by "generated"
    with pytest.raises(ValueError, match="prompt_len"):
        steer(model, "layers.1", sae, add={0: 1.0}, positions="prompt")


def test_steering_refuses_an_encoder_only_model():
    model, _ = load_model(tiny_model_dir("llama", layers=2, width=32))
    with pytest.raises(ValueError, match="not a causal LM"):
        require_causal_lm(model)


@pytest.mark.parametrize("argv, message", [
    (["--latent", "999"], "out of range"),
    ([], "name what to steer"),
    (["--latent", "1", "--model", "gpt2"], "was trained on 'smollm2'"),
    (["--latent", "1", "--layer", "layers.3"], "was trained on layer 'layers.15'"),
    (["--add", "1=x"], "LATENT=AMOUNT"),
])
def test_steer_cli_refuses_bad_input_clearly(tmp_path, capsys, argv, message):
    folder = tmp_path / "sae"
    save_sae(SparseAutoencoder(576, 64, "topk", k=4, seed=0), folder, metadata={"model": "smollm2", "hook": "layers.15"})
    assert main(["steer", "--sae", str(folder), *argv]) == 2
    assert message in capsys.readouterr().err


def test_steer_cli_refuses_an_sae_recorded_on_the_embedded_encoder(tmp_path, capsys):
    folder = tmp_path / "sae"
    save_sae(SparseAutoencoder(384, 64, "topk", k=4, seed=0), folder,
             metadata={"model": "minilm", "hook": "encoder.layer.3"})
    assert main(["steer", "--sae", str(folder), "--latent", "1"]) == 2
    assert "not a causal language model" in capsys.readouterr().err
