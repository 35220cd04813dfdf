"""features.contrast (effect sizes and rates equal to a brute-force computation, token and text level) and
features.cross_lingual (counts by the definition, against the shuffled control), on a tiny GPT-2."""
import pytest
import torch
from hf_tiny import tiny_model_dir
from hf_tiny import tokenizer as tiny_tokenizer

from sae_fast import SparseAutoencoder, features
from sae_fast.activations import capture
from sae_fast.features.contrast import error_code_sets

transformers = pytest.importorskip("transformers")
POS = ["raise ValueError('bad value')", "assert x == 1, 'wrong'", "except KeyError: raise", "error: no such file"]
NEG = ["the cat sleeps on the sofa", "x = y + 1", "for i in range(3): print(i)", "a quiet river at dawn"]


@pytest.fixture(scope="module")
def setup():
    model = transformers.AutoModel.from_pretrained(str(tiny_model_dir("gpt2"))).eval()
    return model, tiny_tokenizer(), SparseAutoencoder(32, 40, "topk", k=4, seed=3)


def dense_codes(model, tok, sae, texts):
    """One (tokens, n) code matrix per text, special tokens left out."""
    out = []
    for text in texts:
        enc = tok([text], return_tensors="pt")
        acts = capture(model, "h.1", input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])["h.1"][0]
        keep = ~torch.isin(enc["input_ids"][0], torch.tensor(tok.all_special_ids))
        with torch.no_grad():
            v, i = sae.encode(acts[keep])
        out.append(torch.zeros(int(keep.sum()), sae.n_latents).scatter_(1, i.long(), v))
    return out


@pytest.mark.parametrize("level", ["token", "text"])
def test_contrast_matches_brute_force(setup, level):
    model, tok, sae = setup
    found = features.contrast(model, tok, "h.1", sae, POS, NEG, level=level, min_specificity=0.6, min_rate=0.0,
                              progress=False)
    units = {}
    for name, texts in (("pos", POS), ("neg", NEG)):
        codes = dense_codes(model, tok, sae, texts)
        units[name] = torch.cat(codes) if level == "token" else torch.stack([c.max(0).values for c in codes])
    p, q = units["pos"].double(), units["neg"].double()
    d = (p.mean(0) - q.mean(0)) / ((p.var(0, unbiased=False) + q.var(0, unbiased=False)) / 2).clamp_min(1e-12).sqrt()
    rate_p, rate_n = (p > 0).double().mean(0), (q > 0).double().mean(0)
    torch.testing.assert_close(found.effect, d.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(found.rate_pos, rate_p.float())
    spec = rate_p / (rate_p + rate_n).clamp_min(1e-12)
    want = [i for i in torch.argsort(d, descending=True).tolist() if spec[i] >= 0.6 and d[i] > 0]
    assert set(found.latents) == set(want) and len(want) >= 2  # near-equal effects may swap: compare sets
    ranked = found.effect[found.latents]
    assert (ranked[:-1] >= ranked[1:]).all()
    assert found.positives.n_tokens == sum(len(c) for c in dense_codes(model, tok, sae, POS))
    assert f"latent {want[0]}: d=" in found.show()
    with pytest.raises(ValueError, match="negatives: no tokens to scan"):
        features.contrast(model, tok, "h.1", sae, POS, [""], progress=False)
    with pytest.raises(ValueError, match="level must be"):
        features.contrast(model, tok, "h.1", sae, POS, NEG, level="doc")


def test_error_code_demo_sets():
    pos, neg = error_code_sets(per_set=20)
    assert len(pos) == len(neg) == 20
    assert all("raise " in t or "Traceback" in t for t in pos)
    assert not any(m in t for t in neg for m in ("raise", "Error", "except", "Traceback"))


def test_cross_lingual_counts_by_the_definition(setup):
    model, tok, sae = setup
    langs, concepts = features.parallel_sentences()
    assert langs == ["en", "fr", "de", "zh"] and len(concepts) >= 30
    assert all(c[lang].strip() for c in concepts for lang in langs)
    # Two "languages" with the same sentence: every specific latent of a sentence is shared by construction.
    texts = ["the cat sleeps", "a red apple", "the river flows", "import os", "two plus two", "rain today"]
    mine = [{"concept": t, "x": t, "y": t} for t in texts]
    found = features.cross_lingual(model, tok, "h.1", sae, concepts=mine, languages=["x", "y"], max_other=0.2,
                                   shuffles=10)
    fired = [(c.sum(0) > 0) for c in dense_codes(model, tok, sae, texts)]  # (n,) per sentence
    total = 2 * torch.stack(fired).sum(0)
    specific = (total - 2) <= 0.2 * (12 - 2)
    want = sum(int((f & specific).sum()) for f in fired)
    assert found.count == want > 0 and len(found.best) == want
    assert found.count > sum(found.shuffled) / len(found.shuffled)
    b = found.best[0]
    assert set(b["tokens"]) == {"x", "y"} and b["tokens"]["x"] == b["tokens"]["y"]
    assert "pairs fire in every language" in found.show()
    with pytest.raises(ValueError, match="lack a sentence"):
        features.cross_lingual(model, tok, "h.1", sae, concepts=mine, languages=["x", "z"])


def test_cli_contrast_languages_and_logits(setup, tmp_path, capsys):
    import json

    from sae_fast.cli import main

    _, _, sae = setup
    sae.save(tmp_path / "sae")
    (tmp_path / "sae" / "normalization.json").write_text('{"layer": "h.1", "scale": 1.0}')
    for name, texts in (("pos.jsonl", POS), ("neg.jsonl", NEG)):
        (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    base = ["features", "--sae", str(tmp_path / "sae"), "--model", str(tiny_model_dir("gpt2")), "--tokens", "300"]
    assert main(base + ["--contrast", str(tmp_path / "pos.jsonl"), str(tmp_path / "neg.jsonl"), "--level", "text",
                        "--out", str(tmp_path / "site")]) == 0
    out = capsys.readouterr().out
    assert "features firing more on the positives (text level)" in out and "dashboard:" in out
    assert main(base + ["--languages", "--count", "2"]) == 0
    assert "36 concepts in en, fr, de, zh" in capsys.readouterr().out
    assert main(base + ["--logits", "--count", "1", "--pages", "2", "--out", str(tmp_path / "lsite")]) == 0
    assert "promotes:" in capsys.readouterr().out
    page = next((tmp_path / "lsite" / "f").glob("*.html")).read_text(encoding="utf-8")
    assert "Logit effects (final norm applied)" in page
