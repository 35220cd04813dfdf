"""features.dashboard: the static site (index, feature pages, prompt page) with every link resolving, and
the same site in a real headless browser (Debian's chromium; skipped where it is not installed)."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hf_tiny import tiny_model_dir, write_corpus

from sae_fast import SparseAutoencoder, features
from sae_fast.activations import load_model, read_corpus

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("site")
    model, tok = load_model(tiny_model_dir("gpt2"), auto_class="AutoModelForCausalLM")
    sae = SparseAutoencoder(32, 48, "topk", k=4, seed=0)
    stats = features.top_examples(model, tok, "h.1", sae, read_corpus(write_corpus(tmp / "corpus", 3)),
                                  max_tokens=800, progress=False)
    chosen = stats.choose(6)
    logits = features.logit_effects(model, sae, chosen, tokenizer=tok)
    prompts = [("import os, sys", features.on_prompt(model, tok, "h.1", sae, "import os, sys"))]
    index = features.dashboard(stats, sae, tmp / "out", chosen, logits=logits, prompts=prompts)
    return index, chosen, stats


def links(path: Path) -> list[str]:
    return re.findall(r"(?:href|src)='([^']+)'", path.read_text(encoding="utf-8"))


def test_site_pages_and_links(site):
    index, chosen, stats = site
    out = index.parent
    pages = sorted((out / "f").glob("*.html"))
    assert sorted(int(p.stem) for p in pages) == sorted(chosen)
    for page in [index, out / "prompt.html", *pages]:
        for link in links(page):
            assert not link.startswith(("http:", "https:", "//")), (page, link)  # no network
            assert (page.parent / link.split("#")[0]).resolve().is_file(), (page, link)
    html = (out / "f" / f"{chosen[0]}.html").read_text(encoding="utf-8")
    for part in ("<svg class='hist'", "id='top'", "id='quantiles'", "id='neighbours'", "Logit effects (final norm",
                 f"density {features.pages.fmt_density(float(stats.density[chosen[0]]))}"):
        assert part in html, part
    # Whole contexts shaded: more tokens than the peaks carry a background (codes of every token were kept).
    assert html.count("background:rgba") > html.count("class='t peak")
    index_html = index.read_text(encoding="utf-8")
    assert index_html.count("<tr data-id=") == len(chosen) and "href='prompt.html'" in index_html
    with pytest.raises(ValueError, match=r"latents must be integers in \[0, 48\)"):
        features.dashboard(stats, None, out / "bad", [48])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def browse(url: str, tmp: Path, *extra: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp / 'profile'}",
           "--window-size=1100,900", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (CI installs it: apt-get install chromium)")
def test_site_in_a_headless_browser(site, tmp_path):
    index, chosen, stats = site
    # Search by text: the hash runs the index's own script, so the DOM shows what a reader would see.
    word = next(w for w in re.findall(r"[a-z]{4,}", stats.examples(chosen[0], 8, dedup=True)[0][1]))
    dom = browse(f"{index.as_uri()}#q={word}", tmp_path, "--dump-dom")
    rows = re.findall(r'<tr data-id="(\d+)"[^>]*?( style="display: none;")?>', dom)
    assert len(rows) == len(chosen) and int(re.search(r'id="shown">(\d+)<', dom).group(1)) >= 1
    assert all(bool(hidden) != (word in t) for (_, hidden), t in
               zip(rows, re.findall(r'data-text="([^"]*)"', dom))), word
    dom = browse(f"{index.as_uri()}#sort=max", tmp_path, "--dump-dom")  # sorted by max, largest first
    maxes = [float(m) for m in re.findall(r'data-max="([^"]+)"', dom)]
    assert maxes == sorted(maxes, reverse=True)
    page = index.parent / "f" / f"{chosen[0]}.html"
    dom = browse(page.as_uri(), tmp_path, "--dump-dom")
    assert "<rect" in dom and "Top activations" in dom and dom.count('class="t') > 10
    shot = tmp_path / "feature.png"
    browse(page.as_uri(), tmp_path, f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000
