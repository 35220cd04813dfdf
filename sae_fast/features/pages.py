"""HTML pieces of the dashboard: token runs shaded by activation, the histogram as SVG, the index script.
Everything is inline or relative, so the pages open from file:// with no server and no network."""
from __future__ import annotations

import html
import math

STYLE = """body{font-family:system-ui,sans-serif;max-width:70em;margin:1em auto;padding:0 1em;color:#222}
a{color:#0645ad}table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left;vertical-align:top}
th{cursor:pointer;background:#eee}tr:nth-child(even){background:#fafafa}
.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap;word-break:break-word;line-height:1.7}
.t{border-radius:2px}.peak{outline:1px solid #c60}.val{font-family:monospace;color:#555;padding-right:1em}
.ws{color:#999}.row{margin:2px 0}.tok{font-family:monospace;background:#eef;padding:0 3px;margin:1px}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:1em}h2{margin-top:1.2em;font-size:1.15em}
#search{width:24em;padding:4px}"""

SCRIPT = """const q=document.getElementById('search'),rows=[...document.querySelectorAll('#latents tbody tr')];
q.addEventListener('input',()=>{const s=q.value.trim().toLowerCase();let shown=0;for(const r of rows){
const hit=!s||r.dataset.id===s||r.dataset.text.includes(s);r.style.display=hit?'':'none';
shown+=hit}document.getElementById('shown').textContent=shown});
document.querySelectorAll('#latents th[data-key]').forEach(th=>th.addEventListener('click',()=>{
const k=th.dataset.key,down=th.dataset.down!=='1';th.dataset.down=down?'1':'0';
rows.sort((a,b)=>(parseFloat(a.dataset[k])-parseFloat(b.dataset[k]))*(down?-1:1));
const body=document.querySelector('#latents tbody');rows.forEach(r=>body.appendChild(r))}));
// index.html#q=TEXT searches and #sort=KEY sorts on load, so a search can be linked to (and tested headless)
const h=new URLSearchParams(location.hash.slice(1));if(h.get('sort')){
const th=document.querySelector(`#latents th[data-key="${h.get('sort')}"]`);if(th)th.click()}
if(h.get('q')){q.value=h.get('q');q.dispatchEvent(new Event('input'))}"""


def page(title: str, body: str, depth: int = 0) -> str:
    css = "../" * depth + "style.css"
    return (f"<!doctype html><html lang='en'><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<link rel='stylesheet' href='{css}'>\n<body>{body}</body></html>\n")


def tokens_html(pieces: list[str], acts: list[float], peak: float, at: int | None = None) -> str:
    """A run of tokens, each shaded by its activation relative to ``peak``; whitespace drawn visibly."""
    from .text import visible

    out = []
    for j, (piece, a) in enumerate(zip(pieces, acts)):
        shown = visible(piece)
        cls = "t" + (" peak" if j == at else "") + (" ws" if shown != piece else "")
        alpha = min(max(a / peak, 0.0), 1.0) if peak > 0 else 0.0
        style = f" style='background:rgba(255,120,0,{alpha:.2f})'" if alpha > 0 else ""
        out.append(f"<span class='{cls}'{style} title='{a:.3f}'>{html.escape(shown)}</span>")
    return "".join(out)


def histogram_svg(counts: list[int], edges: list[float], width: int = 420, height: int = 110) -> str:
    """Bars of the firing histogram over the log-spaced bins that hold firings, with their value range."""
    live = [i for i, c in enumerate(counts) if c]
    if not live:
        return "<p>never fired</p>"
    lo, hi = live[0], live[-1] + 1
    top, bins = max(counts), hi - lo
    w = width / bins
    bars = "".join(f"<rect x='{(i - lo) * w:.1f}' y='{height - 20 - (height - 25) * counts[i] / top:.1f}' "
                   f"width='{max(w - 1, 1):.1f}' height='{(height - 25) * counts[i] / top:.1f}' fill='#e8730c'>"
                   f"<title>[{edges[i]:.3g}, {edges[i + 1]:.3g}): {counts[i]}</title></rect>" for i in range(lo, hi))
    label = (f"<text x='0' y='{height - 5}' font-size='11'>{edges[lo]:.3g}</text>"
             f"<text x='{width}' y='{height - 5}' font-size='11' text-anchor='end'>{edges[hi]:.3g}</text>"
             f"<text x='{width / 2}' y='{height - 5}' font-size='11' text-anchor='middle'>activation (log scale)</text>")
    return (f"<svg class='hist' width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
            f"xmlns='http://www.w3.org/2000/svg' role='img' aria-label='activation histogram'>{bars}{label}</svg>")


def fmt_density(d: float) -> str:
    return f"{d:.3%}" if d >= 1e-4 else (f"{d:.1e}" if d > 0 and math.isfinite(d) else f"{d:g}")
