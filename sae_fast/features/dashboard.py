"""The dashboard: a static site under one folder, opened from file:// with no server and no network.

    index.html        every shown latent with its density, max, mean and top context; search by latent id
                      or by text, sort by clicking a column
    f/<latent>.html   its statistics, histogram (SVG), top contexts and quantile samples with every token
                      shaded by the latent's activation, nearest features by decoder cosine (links), and
                      logit effects when given
    prompt.html       each ``prompts`` text token by token with the features that fire on it (links)
"""
from __future__ import annotations

import html
from collections.abc import Iterable
from pathlib import Path

from .neighbours import all_neighbours
from .pages import SCRIPT, STYLE, fmt_density, histogram_svg, page, tokens_html
from .stats import HIST_EDGES, FeatureStats


def _contexts(stats: FeatureStats, latent: int, firings: list[tuple[float, int]], peak: float, before: int,
              after: int) -> str:
    rows = []
    for value, t in firings:
        pieces, acts, at = stats.context(latent, t, before, after)
        if stats.code_values is None:  # no codes kept: shade the peak token only
            acts = [value if j == at else 0.0 for j in range(len(pieces))]
        rows.append(f"<div class='row'><span class='val'>{value:.3f}</span><span class='ctx'>"
                    f"{tokens_html(pieces, acts, peak, at)}</span></div>")
    return "".join(rows) or "<p>none</p>"


def _link(latent: int, shown: set[int], depth: int) -> str:
    if latent in shown:
        return f"<a href='{'../' * depth}f/{latent}.html'>{latent}</a>"
    return str(latent)


def _feature_page(stats, latent, shown, neighbours, logits, row, before, after) -> str:
    peak = float(stats.max_activation[latent])
    parts = [f"<p><a href='../index.html'>← all features</a></p><h1>latent {latent}</h1>",
             f"<p id='stats'>density {fmt_density(float(stats.density[latent]))} "
             f"({int(stats.count[latent])} of {stats.n_tokens} tokens) · max {peak:.3f} · "
             f"mean {float(stats.mean_activation[latent]):.3f}</p>"]
    side = ["<div id='histogram'><h2>Activation histogram</h2>"
            f"{histogram_svg(stats.hist[latent].tolist(), HIST_EDGES.tolist())}</div>"]
    if neighbours is not None:
        sims, ids = neighbours
        items = "".join(f"<li>{_link(int(j), shown, 1)} <span class='val'>{float(s):.3f}</span></li>"
                        for s, j in zip(sims[latent].tolist(), ids[latent].tolist()))
        side.append(f"<div id='neighbours'><h2>Nearest features (decoder cosine)</h2><ol>{items}</ol></div>")
    if logits is not None and row is not None:
        norm = "final norm applied" if logits.final_norm else "final norm not applied"
        lists = []
        for which in ("promoted", "suppressed"):
            toks = "".join(f"<span class='tok' title='{v:+.3f}'>{html.escape(repr(t)[1:-1])}</span>"
                           for t, v in logits.tokens(row, which))
            lists.append(f"<p>{which}: {toks}</p>")
        side.append(f"<div id='logits'><h2>Logit effects ({norm})</h2>{''.join(lists)}</div>")
    parts.append(f"<div class='grid'>{''.join(side)}</div>")
    top = _contexts(stats, latent, stats.top_tokens(latent), peak, before, after)
    parts.append(f"<h2>Top activations</h2><div id='top'>{top}</div>")
    parts.append("<h2>Samples by activation quantile</h2><div id='quantiles'>")
    for lo, hi, firings in reversed(stats.quantile_samples(latent)):
        parts.append(f"<h3>interval {lo:.3f} – {hi:.3f}</h3>{_contexts(stats, latent, firings, peak, before, after)}")
    parts.append("</div>")
    return page(f"latent {latent}", "".join(parts), depth=1)


def _prompt_page(prompts, shown) -> str:
    parts = ["<p><a href='index.html'>← all features</a></p><h1>Features on prompts</h1>"]
    for text, rows in prompts:
        peak = max((v for _, pairs in rows for _, v in pairs), default=0.0)
        run = tokens_html([t for t, _ in rows], [pairs[0][1] if pairs else 0.0 for _, pairs in rows], peak)
        table = "".join(f"<tr><td class='ctx'>{tokens_html([t], [pairs[0][1] if pairs else 0.0], peak)}</td><td>"
                        + ", ".join(f"{_link(i, shown, 0)} <span class='val'>{v:.2f}</span>" for i, v in pairs)
                        + "</td></tr>" for t, pairs in rows)
        parts.append(f"<h2>{html.escape(text[:80])}</h2><p class='ctx'>{run}</p><table class='prompt'>{table}</table>")
    return page("features on prompts", "".join(parts))


def dashboard(stats: FeatureStats, sae, out, latents: Iterable[int] | None = None, count: int = 200,
              by: str = "density", neighbours=None, n_neighbours: int = 8, logits=None,
              prompts: list[tuple[str, list]] | None = None, before: int = 12, after: int = 4,
              title: str | None = None) -> Path:
    """Write the site for ``latents`` (default: ``stats.choose(count, by)``) under folder ``out``; returns
    the index path. ``neighbours`` is all_neighbours' (sims, ids), computed here when None; ``logits`` is a
    LogitEffects for some latents; ``prompts`` is a list of (text, on_prompt rows)."""
    chosen = stats.choose(count, by) if latents is None else list(latents)
    bad = [i for i in chosen if not (isinstance(i, int) and 0 <= i < stats.n_latents)]
    if bad:
        raise ValueError(f"latents must be integers in [0, {stats.n_latents}); got {bad[:5]}")
    if neighbours is None and sae is not None and sae.n_latents > 1:
        neighbours = all_neighbours(sae, min(n_neighbours, sae.n_latents - 1))
    rows_of = {i: r for r, i in enumerate(logits.latents)} if logits is not None else {}
    out = Path(out)
    (out / "f").mkdir(parents=True, exist_ok=True)
    (out / "style.css").write_text(STYLE, encoding="utf-8")
    shown = set(chosen)
    body = []
    for i in chosen:
        (out / "f" / f"{i}.html").write_text(_feature_page(stats, i, shown, neighbours, logits, rows_of.get(i),
                                                           before, after), encoding="utf-8")
        shown_texts = [t for _, t in stats.examples(i, context=8, dedup=True)]
        first = shown_texts[:1]
        d, m = float(stats.density[i]), float(stats.max_activation[i])
        searchable = html.escape(" | ".join(shown_texts).replace("«", "").replace("»", "").lower())
        body.append(f"<tr data-id='{i}' data-density='{d}' data-max='{m}' data-mean='{float(stats.mean_activation[i])}' "
                    f"data-text='{searchable}'>"
                    f"<td><a href='f/{i}.html'>{i}</a></td><td>{fmt_density(d)}</td><td>{m:.3f}</td>"
                    f"<td>{float(stats.mean_activation[i]):.3f}</td>"
                    f"<td class='ctx'>{html.escape(first[0]) if first else ''}</td></tr>")
    extra = ""
    if prompts:
        (out / "prompt.html").write_text(_prompt_page(prompts, shown), encoding="utf-8")
        extra = " · <a id='prompts' href='prompt.html'>features on the prompts</a>"
    head = title or f"{stats.n_latents} latents, d={sae.d_in if sae is not None else '?'}"
    index = (f"<h1>{html.escape(head)}</h1><p>{len(chosen)} features shown, sorted by {by}, over {stats.n_tokens} "
             f"tokens{extra}. Click a column to sort.</p>"
             f"<p><input id='search' placeholder='latent id or text in its top context'> <span id='shown'>{len(chosen)}"
             "</span> shown</p><table id='latents'><thead><tr><th data-key='id'>latent</th>"
             "<th data-key='density'>density</th><th data-key='max'>max</th><th data-key='mean'>mean</th>"
             f"<th>top context</th></tr></thead><tbody>{''.join(body)}</tbody></table><script>{SCRIPT}</script>")
    path = out / "index.html"
    path.write_text(page("sae-fast features", index), encoding="utf-8")
    return path
