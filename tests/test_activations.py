"""sae_fast.activations: hooks by module name, corpora and token windows, collection, the sharded store."""
import json

import pytest
import torch
from hf_tiny import tiny_model_dir, tokenizer, transformers, write_corpus
from torch import nn

from sae_fast.activations import (
    ActivationStore,
    LayerCapture,
    capture,
    collect_text,
    default_corpus,
    load_model,
    middle_layer,
    read_corpus,
    resolve_layers,
    window_batches,
)
from sae_fast.activations.corpus import special_tokens


@pytest.fixture(scope="module")
def gpt2():
    return load_model(tiny_model_dir("gpt2"))


@pytest.fixture(scope="module")
def llama():
    return load_model(tiny_model_dir("llama"))


# ---------------------------------------------------------------------------- layer names
def test_resolve_layers_names_globs_and_prefix(gpt2):
    model, _ = gpt2
    assert resolve_layers(model, "h.1") == ["h.1"]
    assert resolve_layers(model, "h.*") == ["h.0", "h.1", "h.2"]          # '*' stays inside one dotted part
    assert resolve_layers(model, "h.[0-1]") == ["h.0", "h.1"]
    assert resolve_layers(model, "h.2, h.0") == ["h.0", "h.2"]            # model order, no duplicates
    assert resolve_layers(model, ["h.0", "h.*"]) == ["h.0", "h.1", "h.2"]
    assert resolve_layers(model, "h.1.**") == [n for n, _ in model.named_modules() if n.startswith("h.1.")]
    assert resolve_layers(model, "transformer.h.1") == ["h.1"]            # names written for GPT2LMHeadModel
    assert middle_layer(model) == "h.1"


def test_unknown_layer_lists_close_matches(gpt2, llama):
    with pytest.raises(ValueError, match=r"layer 'h\.7' matches no module of GPT2Model; close matches: .*h\.1"):
        resolve_layers(gpt2[0], "h.7")
    with pytest.raises(ValueError, match=r"close matches: .*layers\.1"):
        resolve_layers(llama[0], "layer.1")
    with pytest.raises(ValueError, match="at least one module"):
        resolve_layers(gpt2[0], " , ")


# ---------------------------------------------------------------------------- hooks
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hook_equals_hidden_states_and_stops_early(kind, gpt2, llama):
    model, tok = gpt2 if kind == "gpt2" else llama
    blocks = "h" if kind == "gpt2" else "layers"
    inputs = tok(["The quick brown fox", "jumps over the lazy dog and more words"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    got = capture(model, f"{blocks}.0,{blocks}.1", **inputs)
    # hidden_states[i + 1] is block i's output (the last one has the final norm applied, so use the first two).
    torch.testing.assert_close(got[f"{blocks}.0"], hidden[1])
    torch.testing.assert_close(got[f"{blocks}.1"], hidden[2])
    # Stopping the forward after the last hooked block changes nothing, and never reaches the later blocks.
    ran = []
    hooks_before = [len(m._forward_hooks) for m in model.modules()]
    last = dict(model.named_modules())[f"{blocks}.2"]
    handle = last.register_forward_hook(lambda *a: ran.append(1))
    try:
        early = capture(model, f"{blocks}.1", **inputs)
        assert not ran
        full = capture(model, f"{blocks}.1", stop_early=False, **inputs)
        assert ran
    finally:
        handle.remove()
    assert torch.equal(early[f"{blocks}.1"], full[f"{blocks}.1"])
    assert [len(m._forward_hooks) for m in model.modules()] == hooks_before  # our hooks are removed


class _TupleBlock(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = out

    def forward(self, x):
        y = self.lin(x)
        return {"tuple": (y, None), "list": [y], "int": 3, "ids": y.long()}.get(self.out, y)


class _Net(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.block = _TupleBlock(out)

    def forward(self, x):
        return self.block(x)


@pytest.mark.parametrize("out", ["tuple", "list"])
def test_tuple_outputs_give_their_first_tensor(out):
    net = _Net(out)
    x = torch.randn(2, 3, 4)
    assert torch.equal(capture(net, "block", x)["block"], net.block.lin(x).detach())


@pytest.mark.parametrize("out", ["int", "ids"])
def test_non_tensor_output_is_a_clear_error(out):
    with pytest.raises(TypeError, match="layer 'block' returns a .*not a floating-point activation tensor"):
        capture(_Net(out), "block", torch.randn(2, 4))


def test_vision_model_hooks_the_same_way():
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8)
    model = transformers.ViTModel(cfg).eval()
    layer = middle_layer(model)
    acts = capture(model, layer, pixel_values=torch.randn(3, 3, 32, 32))[layer]
    assert acts.shape == (3, (32 // 8) ** 2 + 1, 32) and not acts.requires_grad
    with LayerCapture(model, layer) as cap:  # reusable across batches
        a = cap.run(pixel_values=torch.zeros(1, 3, 32, 32))[layer]
        b = cap.run(pixel_values=torch.zeros(1, 3, 32, 32))[layer]
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------- corpora and windows
def test_default_corpus_is_prose_and_code():
    docs = list(default_corpus(max_chars=200_000))
    assert len(docs) >= 4
    assert any("def " in d and "import" in d for d in docs[1::2])          # stdlib sources
    assert any("statement" in d or "expression" in d for d in docs[0::2])  # pydoc topics


def test_read_corpus_files_folders_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "beta"}) + "\n\n" + json.dumps({"text": "gamma"}))
    (tmp_path / "ignored.bin").write_bytes(b"\0\1")
    assert list(read_corpus(tmp_path)) == ["alpha text", "beta", "gamma"]
    assert list(read_corpus(tmp_path / "a.txt")) == ["alpha text"]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="'text' string"):
        list(read_corpus(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="does not exist"):
        list(read_corpus(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no"):
        list(read_corpus(tmp_path / "empty"))


def test_windows_have_special_tokens_and_masks():
    tok = tokenizer()
    prefix, suffix = special_tokens(tok)
    assert prefix == [tok.cls_token_id] and suffix == [tok.sep_token_id]
    text = " ".join(f"word{i}" for i in range(300))
    n_body = len(tok(text, add_special_tokens=False)["input_ids"])
    batches = list(window_batches(tok, [text, "short one"], ctx_len=64, batch_size=4))
    ids = torch.cat([b[0]["input_ids"][:, :64] if b[0]["input_ids"].shape[1] == 64 else
                     torch.nn.functional.pad(b[0]["input_ids"], (0, 64 - b[0]["input_ids"].shape[1]))
                     for b in batches])
    keep = torch.cat([torch.nn.functional.pad(k, (0, 64 - k.shape[1])) for _, k in batches])
    attn = torch.cat([torch.nn.functional.pad(b[0]["attention_mask"], (0, 64 - b[0]["attention_mask"].shape[1]))
                      for b in batches])
    n_short = len(tok("short one", add_special_tokens=False)["input_ids"])
    assert int(keep.sum()) == n_body + n_short                 # every text token once; no specials, no padding
    assert int(attn.sum()) == int(keep.sum()) + 2 * ids.shape[0]
    assert (ids[:, 0] == tok.cls_token_id).all()
    assert not (keep & (attn == 0)).any()
    keep_special = torch.cat([torch.nn.functional.pad(k, (0, 64 - k.shape[1])) for _, k in
                              window_batches(tok, [text, "short one"], 64, 4, exclude_special=False)])
    assert int(keep_special.sum()) == int(attn.sum())


# ---------------------------------------------------------------------------- collection
def test_collect_keeps_text_tokens_only_and_splits_eval(tmp_path, gpt2):
    model, tok = gpt2
    texts = list(read_corpus(write_corpus(tmp_path / "corpus", 3)))
    n_text = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    train, evals = collect_text(model, tok, "h.0,h.2", texts, ctx_len=48, batch_size=8, max_tokens=10**9,
                                eval_tokens=100, progress=False)
    assert evals.n_rows == 100 and train.n_rows == n_text - 100
    assert train.layers == ["h.0", "h.2"] and train.widths == {"h.0": 32, "h.2": 32}
    # Rows are exactly the hooked outputs at the kept positions of the first batch.
    inputs, keep = next(iter(window_batches(tok, texts, 48, 8)))
    with torch.no_grad():
        h0 = model(**inputs, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(evals.all()["h.0"], h0[keep][:100])
    # A token budget stops collection early.
    small, _ = collect_text(model, tok, "h.0", texts, ctx_len=48, batch_size=8, max_tokens=70, progress=False)
    assert small.n_rows == 70


def test_collect_errors_empty_corpus_nan_shape_width(gpt2):
    model, tok = gpt2
    with pytest.raises(ValueError, match="no text at all"):
        collect_text(model, tok, "h.0", [], progress=False)
    with pytest.raises(ValueError, match="no text at all"):
        collect_text(model, tok, "h.0", ["", "   "], progress=False)
    with pytest.raises(ValueError, match="expected one vector per token"):  # position embeddings: batch 1
        collect_text(model, tok, "wpe", ["some text here", "and more text"], batch_size=2, progress=False)
    with pytest.raises(ValueError, match=r"outputs width 32, but 99 is expected"):
        collect_text(model, tok, "h.0", ["some text"], expected_width=99, progress=False)
    broken, _ = load_model(tiny_model_dir("gpt2"))
    with torch.no_grad():
        broken.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'h\.1' produced NaN or inf activations"):
        collect_text(broken, tok, "h.1", ["some text"], progress=False)


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="neither a local folder nor a model in the local Hugging Face cache.*--model"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="has no config.json"):
        load_model(tmp_path)


def test_embedded_default_model_layer_3():
    model, tok = load_model()
    assert type(model).__name__ == "BertModel" and middle_layer(model) == "encoder.layer.3"
    train, evals = collect_text(model, tok, "encoder.layer.3", default_corpus(max_chars=20_000), max_tokens=300,
                                eval_tokens=20, progress=False)
    assert train.widths == {"encoder.layer.3": 384} and train.n_rows == 300 and evals.n_rows == 20


# ---------------------------------------------------------------------------- the store
def _fill(store, rows=1000, d=6, step=37):
    x = torch.arange(rows * d, dtype=torch.float32).reshape(rows, d) / 100 + 1
    for s in range(0, rows, step):
        store.add({"a": x[s:s + step], "b": -x[s:s + step, :3]})
    return store.finish(), x


@pytest.mark.parametrize("on_disk", [False, True])
def test_store_streams_every_row_once_per_epoch_in_a_new_order(tmp_path, on_disk):
    store, x = _fill(ActivationStore(["a", "b"], tmp_path / "s" if on_disk else None, shard_tokens=128))
    if on_disk:
        assert ActivationStore.open(tmp_path / "s").sizes == store.sizes
        store = ActivationStore.open(tmp_path / "s")
    assert store.sizes == [128] * 7 + [104]
    stream = store.batches(100, seed=3, group_shards=3, normalize=False)
    epochs = [torch.cat([next(stream)["a"] for _ in range(10)]) for _ in range(2)]
    for e in epochs:  # a permutation of all rows; layers stay aligned row by row
        assert torch.equal(e[e[:, 0].argsort()], x)
    assert not torch.equal(epochs[0], epochs[1])
    b = next(store.batches(50, seed=3, normalize=False))
    assert torch.equal(b["b"], -b["a"][:, :3])
    # Starting at a position continues the same stream (what a resumed run relies on), across epochs too.
    ref = store.batches(64, seed=3, group_shards=3, normalize=False)
    ref_batches = [next(ref)["a"] for _ in range(40)]
    for k in (0, 7, 15, 16, 33):
        later = store.batches(64, seed=3, start=64 * k, group_shards=3, normalize=False)
        assert torch.equal(next(later)["a"], ref_batches[k])


def test_store_memory_is_bounded_by_group_shards(tmp_path):
    store, _ = _fill(ActivationStore(["a", "b"], tmp_path / "s", shard_tokens=100))
    store = ActivationStore.open(tmp_path / "s")
    loads = []
    store.shard = lambda i, _orig=store.shard: loads.append(i) or _orig(i)
    chunks = store._chunks(seed=0, start=0, group_shards=2)
    for _ in range(5):
        chunk = next(chunks)
        assert chunk["a"].shape[0] <= 200  # one group of at most 2 shards in memory
    assert len(loads) == 10


def test_store_normalisation_and_unfinished_folders(tmp_path):
    g = torch.Generator().manual_seed(0)
    store = ActivationStore(["a"], tmp_path / "s", shard_tokens=300)
    x = 7.0 * torch.randn(1000, 16, generator=g) + 3.0
    store.add({"a": x})
    assert ActivationStore.open(tmp_path / "s") is None  # no meta.json yet: never a half-written store
    store.finish()
    scale = store.scales()["a"]
    assert scale == pytest.approx((16 / x.double().pow(2).sum(1).mean()).sqrt().item(), rel=1e-9)
    rows = next(store.batches(1000, normalize=True))["a"]
    assert rows.pow(2).sum(1).mean().item() == pytest.approx(16.0, rel=1e-4)
    assert torch.allclose((rows / scale)[rows[:, 0].argsort()], x[(x[:, 0]).argsort()], atol=1e-5)
    with pytest.raises(ValueError, match="same number of rows"):
        ActivationStore(["a", "b"]).add({"a": torch.zeros(3, 2), "b": torch.zeros(4, 2)})
    half = ActivationStore(["a"], tmp_path / "h", dtype="bfloat16")
    half.add({"a": x})
    half.finish()
    assert ActivationStore.open(tmp_path / "h").shard(0)["a"].dtype == torch.bfloat16


def test_store_reads_raw_rows_unless_asked_to_normalise():
    """all() and batches() follow one convention: the rows as recorded, times scales() with normalize=True."""
    store, x = _fill(ActivationStore(["a", "b"], shard_tokens=128))
    scales = store.scales()
    assert scales["a"] != 1.0 and scales["b"] != 1.0
    raw = next(store.batches(100, seed=1))
    assert torch.equal(raw["a"], next(store.batches(100, seed=1, normalize=False))["a"])
    scaled = next(store.batches(100, seed=1, normalize=True))
    assert torch.equal(scaled["b"], raw["b"] * scales["b"])
    assert torch.equal(store.all()["a"], x) and torch.equal(store.all(normalize=False)["b"], -x[:, :3])
    every = store.all(normalize=True)
    assert torch.equal(every["a"], x * scales["a"]) and torch.equal(every["b"], -x[:, :3] * scales["b"])


@pytest.mark.parametrize("on_disk", [False, True])
def test_store_finds_a_layer_with_or_without_its_prefix(tmp_path, on_disk):
    """scales()["layers.15"] for a store of model.layers.15 (resolve_layers' prefix rule), and the other way."""
    store = ActivationStore(["model.layers.15", "h.2"], tmp_path / "s" if on_disk else None)
    store.add({"model.layers.15": torch.full((8, 4), 3.0), "h.2": torch.ones(8, 2)})
    store.finish()
    if on_disk:
        store = ActivationStore.open(tmp_path / "s")
    scales, rows, batch = store.scales(), store.all(), next(store.batches(4))
    assert list(scales) == list(rows) == list(batch) == ["model.layers.15", "h.2"]  # resolved names, in order
    for alias, name in [("layers.15", "model.layers.15"), ("model.layers.15", "model.layers.15"),
                        ("transformer.h.2", "h.2")]:
        assert alias in scales and scales[alias] == scales[name] == scales.get(alias)
        assert torch.equal(rows[alias], rows[name]) and torch.equal(batch[alias], batch[name])
        assert store.mean_sq_norm(alias) == store.mean_sq_norm(name)
    assert scales["layers.15"] == pytest.approx(1 / 3) and store.widths["layers.15"] == 4
    assert "15" not in scales and scales.get("15") is None
    with pytest.raises(KeyError, match=r"no layer 'layers\.16' in this store; it holds: model\.layers\.15, h\.2"):
        scales["layers.16"]


def test_store_refuses_a_short_name_that_fits_two_layers():
    store = ActivationStore(["encoder.layer.3", "decoder.layer.3"])
    store.add({"encoder.layer.3": torch.ones(2, 2), "decoder.layer.3": torch.ones(2, 2)})
    store.finish()
    assert store.scales()["decoder.layer.3"] == 1.0
    with pytest.raises(KeyError, match=r"'layer\.3' fits several layers: encoder\.layer\.3, decoder\.layer\.3"):
        store.scales()["layer.3"]


def test_collect_text_stores_answer_to_the_names_given(gpt2):
    model, tok = gpt2
    train, evals = collect_text(model, tok, "transformer.h.0,h.2", ["some text here", "and more text to read"],
                                max_tokens=10, eval_tokens=4, progress=False)
    assert train.layers == ["h.0", "h.2"]
    assert train.scales()["transformer.h.0"] == train.scales()["h.0"]
    assert torch.equal(evals.all()["transformer.h.0"], evals.all()["h.0"])
