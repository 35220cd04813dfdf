"""The README's snippets run as written (at a smaller token budget)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from sae_fast import SparseAutoencoder
from sae_fast.activations import save_normalization

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(section: str) -> str:
    text = README.read_text()
    start = text.index(f"## {section}\n")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_read_features_snippet_runs_as_written(tmp_path, monkeypatch):
    code = python_block("Read features and steer with them")
    assert "max_tokens=20_000" in code
    code = code.replace("max_tokens=20_000", "max_tokens=1_500")  # seconds, not tens of seconds, in CI
    folder = tmp_path / "sae-fast-out" / "sae" / "encoder.layer.3"  # what `sae-fast train` writes
    SparseAutoencoder(384, 256, "topk", k=8, seed=0).save(folder)
    save_normalization(folder, "encoder.layer.3", 0.5, 384)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["layer"] == "encoder.layer.3" and scope["scale"] == 0.5
    assert 0 <= scope["latent"] < 256 and float(scope["top"].max_activation[scope["latent"]]) > 0
    assert isinstance(scope["out"].last_hidden_state, torch.Tensor)
