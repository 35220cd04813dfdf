"""sae_fast.features: the one-pass statistics and top-activating tokens (checked against a brute-force scan),
feature choice without repeated contexts, detokenised contexts, and the features on a prompt, on a tiny GPT-2
loaded through from_pretrained."""

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


def test_top_examples_match_a_brute_force_scan(setup, capsys):
    model, tok, sae = setup
    top = features.top_examples(model, tok, "h.1", sae, TEXTS, top=3, scale=1.7, batch_size=4, ctx_len=32,
                                samples=5, progress=False)
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
    # The statistics of the same pass: density, mean, histogram, and samples that are real firings.
    fires = dense > 0
    assert top.n_tokens == keep.sum()
    assert torch.equal(top.count, fires.sum(0))
    torch.testing.assert_close(top.density, fires.sum(0).double() / keep.sum())
    torch.testing.assert_close(top.mean_activation, dense.sum(0) / fires.sum(0).clamp_min(1), atol=1e-5, rtol=1e-5)
    assert torch.equal(top.hist.sum(1).long(), top.count)
    for i in fires.any(0).nonzero().squeeze(1).tolist():  # each firing in its log-spaced bin
        bins = torch.bucketize(dense[fires[:, i], i], features.HIST_EDGES[1:-1])
        assert torch.equal(top.hist[i].long(), torch.bincount(bins, minlength=48))
    seen = top.sample_tokens >= 0
    assert torch.equal(seen.sum(1), top.count.clamp_max(5))  # min(samples, firings) each
    for i, j in seen.nonzero().tolist():  # scan order is not the brute force's: match by token id and value
        t, value = top.sample_tokens[i, j], top.sample_values[i, j]
        assert ((brute_ids == top.token_ids[t]) & ((dense[:, i] - value).abs() < 1e-5)).any(), (i, j)
    buckets = top.quantile_samples(latent, buckets=2, per=2)
    assert buckets and all(lo <= hi for lo, hi, _ in buckets) and buckets[0][1] <= buckets[-1][0]
    # The token budget stops the pass; a NaN in the SAE is an error, not "did not fire".
    capsys.readouterr()
    assert features.top_examples(model, tok, "h.1", sae, TEXTS, max_tokens=7).n_tokens == 7
    assert "features:" in capsys.readouterr().err  # the progress bar, on by default
    bad = SparseAutoencoder(32, 48, "topk", k=4, seed=0)
    with torch.no_grad():
        bad.b_enc[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        features.top_examples(model, tok, "h.1", bad, TEXTS, progress=False)
    with pytest.raises(ValueError, match="no tokens to scan"):
        features.top_examples(model, tok, "h.1", sae, ["", " "], progress=False)


def test_choose_skips_latents_whose_top_contexts_repeat_and_contexts_are_detokenised():
    from hf_tiny import tokenizer

    tok = tokenizer()
    words = tok("the sink token and then something different every time", add_special_tokens=False)["input_ids"]
    wp = tok("changelog", add_special_tokens=False)["input_ids"]
    assert len(wp) > 1 and tok.convert_ids_to_tokens(wp[1]).startswith("##")
    # 6 windows; latent 0 (the strongest) fires at position 0 of each on the same token (an attention sink),
    # latent 1 fires on a different word in each window, and once mid-word on a WordPiece continuation.
    ids, doc, pos = [], [], []
    for w in range(6):
        window = [words[0], words[(w + 3) % len(words)], *wp]
        ids += window
        doc += [w] * len(window)
        pos += list(range(len(window)))
    n, top = 3, 6
    values = torch.full((n, top), -float("inf"))
    tokens = torch.full((n, top), -1)
    values[0], tokens[0] = torch.full((top,), 9.0), torch.arange(top) * 4   # same token at every window start
    values[1], tokens[1] = torch.linspace(5, 4, top), torch.arange(top) * 4 + 1
    values[1, 0], tokens[1, 0] = 6.0, 3  # the ##continuation of window 0
    count = torch.tensor([6, 6, 0])
    z = torch.zeros(n, 48, dtype=torch.int)
    stats = features.FeatureStats(24, count, count.double(), z, values, tokens, values.clone(), tokens.clone(),
                                  torch.tensor(ids), torch.tensor(doc), torch.tensor(pos), tok)
    assert stats.distinct(0) == 1 and stats.distinct(1) == 6
    assert stats.choose(3, by="max", max_density=1.0) == [1] == stats.choose(3, by="max")
    assert stats.choose(3, by="max", max_density=1.0, min_distinct=1) == [0, 1]
    assert stats.show(0).count("«") == 1  # repeats shown once
    # Mid-word context: "change«log»", not "change ##log" space-joined.
    value, text = stats.examples(1, context=3)[0]
    assert value == 6.0 and "##" not in text and text.endswith("«" + tok.decode(wp[1:2]).lstrip("#") + "»")
    assert features.visible("\n") == "↵" and features.visible("  ") == "··" and features.visible(" a\t") == " a⇥"
    with pytest.raises(ValueError, match="latent must be an integer"):
        stats.show(3)


def test_on_prompt_lists_each_token_with_its_strongest_latents(setup):
    model, tok, sae = setup
    rows = features.on_prompt(model, tok, "h.1", sae, "import os, sys", top=3)
    ids = tok("import os, sys", add_special_tokens=False)["input_ids"]
    # Detokenised, not space-joined WordPiece: the pieces read as the tokenizer's own decoding ("sy" + "s").
    assert len(rows) == len(ids) and "".join(t for t, _ in rows) == tok.decode(ids) == "import os, sys"
    assert [t for t, _ in rows][-2:] == [" sy", "s"]
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
            "--prompt", "import os", "--out", str(tmp_path / "site"), "--pages", "5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("max activation") == 2 and "neighbours:" in out and "features on 'import os'" in out
    assert "tokens/s" in out and "5 feature pages" in out
    assert len(list((tmp_path / "site" / "f").glob("*.html"))) == 5
    assert "import" in (tmp_path / "site" / "prompt.html").read_text()
    base = args[:7] + ["--tokens", "200", "--out", "-"]
    for bad, message in ((["--sae", str(tmp_path / "missing")], "sae-fast features: error"),
                         (["--latents", "48"], "--latents 48 is out of range: the SAE has 48 latents"),
                         (["--latents", "x"], "--latents must be comma-separated integers"),
                         (["--contrast", "a", "b", "c"], "--contrast takes POS NEG"),
                         (["--contrast", str(tmp_path / "corpus"), str(tmp_path / "nowhere")], "does not exist")):
        assert main(base + bad) == 2
        assert message in capsys.readouterr().err


def test_byte_level_bpe_pieces_never_show_half_characters():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["the baker sells bread"] * 20 + ["面包师卖面包"] * 3, trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe)
    ids = tok("面包师 bread 卖")["input_ids"]
    assert "\ufffd" in tok.decode(ids[-1:])  # 卖 is two byte tokens here
    pieces = features.token_pieces(tok, ids)
    assert "".join(pieces) == tok.decode(ids) and "\ufffd" not in "".join(pieces)
    assert pieces[1:] == [" bread", " ", "", "卖"]
