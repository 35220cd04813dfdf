"""sae_fast.evaluate against a brute-force computation on a tiny random Llama: one window at a time, the
layer's output edited by hand, cross-entropy and KL from torch.nn.functional, FVU from the stacked rows."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sae_fast import SparseAutoencoder
from sae_fast.activations import load_model, window_batches
from sae_fast.activations.hooks import capture
from sae_fast.evaluate import evaluate
from tests.hf_tiny import tiny_model_dir

TEXTS = ["The cat sat on the mat. " * 6, "def f(x):\n    return x + 1\n" * 4, "Short one.", "A B C D E F G " * 5]


def _run_with(model, layer_module, new, **inputs):
    handle = layer_module.register_forward_hook(lambda m, a, out: (new,) + tuple(out[1:]) if isinstance(out, tuple)
                                                else new)
    try:
        return model(**inputs).logits
    finally:
        handle.remove()


@torch.no_grad()
def brute_force(model, tok, sae, scale, ctx_len):
    layer = dict(model.named_modules())["model.layers.1"]
    windows = []
    for inputs, keep in window_batches(tok, TEXTS, ctx_len, 64):
        for r in range(inputs["input_ids"].shape[0]):
            n = int(inputs["attention_mask"][r].sum())
            windows.append((inputs["input_ids"][r:r + 1, :n], keep[r:r + 1, :n]))
    xs, mean_rows = [], []
    for ids, keep in windows:
        x = capture(model, "model.layers.1", input_ids=ids)["model.layers.1"]
        mean_rows.append(x[keep])
    mean = torch.cat(mean_rows).double().mean(0)
    nll = {"clean": [], "spliced": [], "zero": [], "mean": []}
    kls, xhats = [], []
    for ids, keep in windows:
        x = capture(model, "model.layers.1", input_ids=ids)["model.layers.1"]
        clean = model(input_ids=ids).logits[0, :-1]
        targets = ids[0, 1:]
        nll["clean"] += F.cross_entropy(clean, targets, reduction="none").tolist()
        for kind in ("spliced", "zero", "mean"):
            new = x.clone()
            for t in range(ids.shape[1]):
                if not keep[0, t]:
                    continue
                if kind == "spliced":
                    new[0, t] = sae(x[0, t:t + 1] * scale).x_hat[0] / scale
                    xs.append(x[0, t] * scale)
                    xhats.append(new[0, t] * scale)
                else:
                    new[0, t] = 0 if kind == "zero" else mean.float()
            logits = _run_with(model, layer, new, input_ids=ids)[0, :-1]
            nll[kind] += F.cross_entropy(logits, targets, reduction="none").tolist()
            if kind == "spliced":
                kls += F.kl_div(F.log_softmax(logits, -1), F.log_softmax(clean, -1), log_target=True,
                                reduction="none").sum(-1).tolist()
    X, Xh = torch.stack(xs).double(), torch.stack(xhats).double()
    ce = {k: sum(v) / len(v) for k, v in nll.items()}
    per_token = sorted(((X - Xh).pow(2).sum(-1)).tolist(), reverse=True)
    return {"ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "ce_zero": ce["zero"], "ce_mean": ce["mean"],
            "kl": sum(kls) / len(kls), "fvu": float((X - Xh).pow(2).sum() / (X - X.mean(0)).pow(2).sum()),
            "tokens": X.shape[0], "predicted_tokens": len(nll["clean"]),
            "top1pct_error_share": sum(per_token[:max(1, len(per_token) // 100)]) / sum(per_token),
            "ce_recovered_zero": (ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"])}


def test_evaluate_matches_brute_force_on_a_tiny_llama():
    torch.manual_seed(0)
    model, tok = load_model(tiny_model_dir("llama-lm", layers=3, width=32), auto_class="AutoModelForCausalLM")
    sae = SparseAutoencoder(32, 64, "topk", k=4, seed=0).eval()
    got = evaluate(model, tok, "layers.1", sae, iter(TEXTS), scale=0.7, ctx_len=24, batch_size=3,
                   max_tokens=10**6, sink_factor=0.0, progress=False)
    want = brute_force(model, tok, sae, 0.7, 24)
    for key, value in want.items():  # CE of a random model is ~log(vocab) for all four: compare absolutely
        tol = dict(rel=0, abs=1e-6) if key.startswith("ce_") and "recovered" not in key else dict(rel=1e-5, abs=1e-9)
        assert got[key] == pytest.approx(value, **tol), key
    assert got["kl"] >= 0 and math.isfinite(got["kl"]) and got["special_excluded"] > 0
    assert got["delta_lm_loss"] == pytest.approx(got["ce_spliced"] - got["ce_clean"])


def test_evaluate_refuses_ce_on_an_encoder_and_reports_reconstruction():
    model, tok = load_model(tiny_model_dir("llama", layers=2, width=32))
    sae = SparseAutoencoder(32, 64, "topk", k=4, seed=0).eval()
    with pytest.raises(ValueError, match="not a causal LM"):
        evaluate(model, tok, "layers.1", sae, TEXTS, lm=True, progress=False)
    got = evaluate(model, tok, "layers.1", sae, TEXTS, progress=False, ctx_len=24)
    assert "ce_clean" not in got and 0 < got["fvu"] and got["l0"] == 4
    with pytest.raises(ValueError, match="the SAE reads 48"):
        evaluate(model, tok, "layers.1", SparseAutoencoder(48, 64, "topk", k=4), TEXTS, progress=False)
