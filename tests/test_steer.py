"""sae_fast.steer: the edit is exactly x + (target - f) W_dec / scale at the hooked layer, nothing changes
when nothing is asked, and steering a causal LM changes its logits only while the context is active."""
import pytest
import torch
from hf_tiny import tiny_model_dir

from sae_fast import SparseAutoencoder
from sae_fast.activations import capture
from sae_fast.steer import steer

transformers = pytest.importorskip("transformers")
SCALE = 1.7


@pytest.fixture(scope="module")
def lm():
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("gpt2"))).eval()
    sae = SparseAutoencoder(32, 48, "topk", k=4, seed=0)
    ids = torch.tensor([[101, 2000, 2003, 1037, 3231, 102]])
    return model, sae, ids


def _codes(sae, x):
    with torch.no_grad():
        v, i = sae.encode(x.reshape(-1, 32) * SCALE)
    dense = torch.zeros(v.shape[0], sae.n_latents)
    return dense.scatter_(1, i.long(), v)


def test_clamp_add_ablate_edit_exactly(lm):
    model, sae, ids = lm
    x = capture(model, "transformer.h.1", input_ids=ids)["transformer.h.1"]
    f = _codes(sae, x)
    on = int(f[2].argmax())  # a latent active at token 2
    off = int((f == 0).all(0).nonzero()[0])  # a latent active nowhere
    with steer(model, "h.1", sae, clamp={on: 5.0, off: 2.0}, add={7: 0.5}, ablate=[int(f[3].argmax())], scale=SCALE):
        got = capture(model, "transformer.h.1", input_ids=ids)["transformer.h.1"]
    abl = int(f[3].argmax())
    delta = torch.zeros_like(f)
    delta[:, on] = 5.0 - f[:, on]
    delta[:, off] = 2.0
    delta[:, 7] += 0.5
    delta[:, abl] = -f[:, abl]
    want = x + (delta @ sae.W_dec.detach() / SCALE).reshape(x.shape)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_no_intervention_changes_nothing_and_the_hook_goes_away(lm):
    model, sae, ids = lm
    with torch.no_grad():
        base = model(input_ids=ids).logits
        x = capture(model, "transformer.h.1", input_ids=ids)["transformer.h.1"]
        never = int((_codes(sae, x) == 0).all(0).nonzero()[0])
        with steer(model, "h.1", sae, ablate=[never], add={3: 0.0}, scale=SCALE):
            same = model(input_ids=ids).logits
        with steer(model, "h.1", sae, clamp={never: 50.0}, scale=SCALE):
            steered = model(input_ids=ids).logits
            gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(same, base, atol=0, rtol=0)
    assert (steered - base).abs().max() > 1e-3
    torch.testing.assert_close(after, base, atol=0, rtol=0)
    assert gen.shape == (1, ids.shape[1] + 3)


def test_positions_limit_the_edit(lm):
    model, sae, ids = lm
    x = capture(model, "transformer.h.1", input_ids=ids)["transformer.h.1"]
    with steer(model, "h.1", sae, add={5: 3.0}, scale=SCALE, positions=slice(-1, None)):
        got = capture(model, "transformer.h.1", input_ids=ids)["transformer.h.1"]
    torch.testing.assert_close(got[:, :-1], x[:, :-1], atol=0, rtol=0)
    torch.testing.assert_close(got[:, -1], x[:, -1] + 3.0 * sae.W_dec[5].detach() / SCALE, atol=1e-5, rtol=1e-5)


def test_bad_requests_are_clear(lm):
    model, sae, _ = lm
    with pytest.raises(ValueError, match="latent 48 is not an integer in"):
        steer(model, "h.1", sae, clamp={48: 1.0})
    with pytest.raises(ValueError, match="named twice"):
        steer(model, "h.1", sae, clamp={1: 1.0}, ablate=[1])
    with pytest.raises(ValueError, match="one layer at a time"):
        steer(model, "h.*", sae, add={1: 1.0})
    with pytest.raises(ValueError, match="the SAE reads 16"):
        with steer(model, "h.1", SparseAutoencoder(16, 8, "topk", k=2), add={1: 1.0}):
            model(input_ids=torch.tensor([[101, 102]]))


def test_steer_cli_generates_plain_and_steered(tmp_path, capsys):
    from hf_tiny import write_corpus

    from sae_fast.cli import main

    sae = SparseAutoencoder(32, 48, "topk", k=4, seed=0)
    sae.save(tmp_path / "sae")
    (tmp_path / "sae" / "normalization.json").write_text('{"layer": "h.1", "scale": 1.7}')
    base = ["steer", "--model", str(tiny_model_dir("gpt2")), "--sae", str(tmp_path / "sae"),
            "--prompt", "def f(x):", "--max-new-tokens", "4"]
    corpus = str(write_corpus(tmp_path / "corpus", 3))
    x = capture(transformers.AutoModel.from_pretrained(str(tiny_model_dir("gpt2"))), "h.1",
                input_ids=torch.tensor([[101, 13366, 1042, 1006, 1060, 1007, 1024]]))["h.1"]
    fired = int(_codes(sae, x).amax(0).argmax())
    assert main(base + ["--latent", str(fired), "--corpus", corpus, "--tokens", "800"]) == 0
    out = capsys.readouterr().out
    assert f"latent {fired}: max activation" in out and f"steered (5x: {fired}=" in out
    assert "baseline:" in out and "re-measured on this text (steering off)" in out
    assert (tmp_path / "sae" / "max_activation.safetensors").is_file()  # cached beside the SAE
    assert main(base + ["--latent", "48", "--value", "1"]) == 2
    assert "latent 48 is out of range" in capsys.readouterr().err
