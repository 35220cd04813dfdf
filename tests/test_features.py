"""sae_fast.features: decoder neighbours, top-activating tokens (checked against a brute-force scan), and the
features on a prompt, on a tiny GPT-2 loaded through from_pretrained."""

import pytest
import torch
from hf_tiny import tiny_model_dir
from hf_tiny import tokenizer as tiny_tokenizer

from sae_fast import SparseAutoencoder, features
from sae_fast.activations import capture

transformers = pytest.importorskip("transformers")
TEXTS = [f"def f{i}(x): return x * {i}  # the {i}th helper, see docs" for i in range(9)] + [
    "Python's documentation topics and the standard library sources", "import os, sys"]


@pytest.fixture(scope="module")
def setup():
    model = transformers.AutoModel.from_pretrained(str(tiny_model_dir("gpt2"))).eval()
    tok = tiny_tokenizer()
    sae = SparseAutoencoder(32, 48, "topk", k=4, seed=0)
    return model, tok, sae


def test_decoder_neighbours_are_the_closest_directions():
    sae = SparseAutoencoder(8, 6, "topk", k=2, seed=0)
    with torch.no_grad():
        sae.W_dec[4] = sae.W_dec[1] * 3 + 0.01  # same direction as latent 1, other norm
        sae.W_dec[2] = -sae.W_dec[1]
    sims, ids = features.decoder_neighbours(sae, 1, k=5)
    assert ids[0] == 4 and 1 not in ids.tolist() and ids[-1] == 2
    unit = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    torch.testing.assert_close(sims, unit[ids] @ unit[1])
    assert (sims[:-1] >= sims[1:]).all()
    with pytest.raises(ValueError, match="latent must be an integer"):
        features.decoder_neighbours(sae, 6)


def test_top_examples_match_a_brute_force_scan(setup):
    model, tok, sae = setup
    top = features.top_examples(model, tok, "h.1", sae, TEXTS, top=3, scale=1.7, batch_size=4, ctx_len=32)
    # Brute force: every kept token's code, from one batch of all texts.
    enc = tok(TEXTS, truncation=True, max_length=32, padding=True, return_tensors="pt")
    acts = capture(model, "h.1", input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])["h.1"]
    keep = enc["attention_mask"].bool() & ~torch.isin(enc["input_ids"], torch.tensor(tok.all_special_ids))
    with torch.no_grad():
        dense = torch.zeros(keep.sum(), sae.n_latents)
        v, i = sae.encode(acts[keep] * 1.7)
        dense.scatter_(1, i.long(), v)
    assert top.token_ids.numel() == keep.sum()
    want = dense.topk(3, dim=0).values.T  # (n, 3)
    fired = want[:, 0] > 0
    assert fired.sum() >= 10  # the check covers many latents
    torch.testing.assert_close(top.values[fired].clamp_min(0), want[fired], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(top.max_activation, want[:, 0].clamp_min(0), atol=1e-5, rtol=1e-5)
    latent = int(fired.nonzero()[0])
    brute_ids = enc["input_ids"][keep]
    for value, t in zip(top.values[latent].tolist(), top.tokens[latent].tolist()):
        if value > 0:  # it points at a token with that id and that activation
            match = (brute_ids == top.token_ids[t]) & ((dense[:, latent] - value).abs() < 1e-5)
            assert match.any(), (latent, value, t)
    shown = top.show(latent)
    assert f"latent {latent}" in shown and "«" in shown


def test_on_prompt_lists_each_token_with_its_strongest_latents(setup):
    model, tok, sae = setup
    rows = features.on_prompt(model, tok, "h.1", sae, "import os, sys", top=3)
    assert [t for t, _ in rows] == [tok.decode([i]) for i in tok("import os, sys", add_special_tokens=False)["input_ids"]]
    for _, pairs in rows:
        vals = [v for _, v in pairs]
        assert 0 < len(pairs) <= 3 and vals == sorted(vals, reverse=True) and min(vals) > 0
    with pytest.raises(ValueError, match="width 32, the SAE reads 16"):
        features.on_prompt(model, tok, "h.1", SparseAutoencoder(16, 8, "topk", k=2), "x")


def test_features_cli_prints_contexts_and_writes_a_dashboard(setup, tmp_path, capsys):
    from hf_tiny import write_corpus

    from sae_fast.cli import main

    _, _, sae = setup
    sae.save(tmp_path / "sae")
    (tmp_path / "sae" / "normalization.json").write_text('{"layer": "h.1", "scale": 1.7}')
    args = ["features", "--sae", str(tmp_path / "sae"), "--model", str(tiny_model_dir("gpt2")),
            "--corpus", str(write_corpus(tmp_path / "corpus", 3)), "--tokens", "1500", "--count", "2",
            "--prompt", "import os", "--html", str(tmp_path / "f.html")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("max activation") == 2 and "neighbours:" in out and "features on 'import os'" in out
    page = (tmp_path / "f.html").read_text()
    assert page.count("<h2") == 2 and "<mark" in page
    assert main(["features", "--sae", str(tmp_path / "missing"), "--html", "-"]) == 2
    assert "sae-fast features: error" in capsys.readouterr().err
