"""Writing measured results: the text table printed, the Markdown and JSON saved, and a PNG chart (when
matplotlib is installed)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .matryoshka import ratio_rows
from .measure import PHASE_TITLE, PHASES, Result
from .peers import PATCHED
from .workloads import ADAM_LR


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def _fmt_mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}" if b >= 10 * 2**20 else f"{b / 2**20:.1f}"


def _speedup(base: float | None, ours: float | None) -> str:
    return "-" if not base or not ours else f"{base / ours:.2f}x"


def table_rows(res: Result) -> tuple[list[str], list[list[str]]]:
    floor = res.floor_ms
    head = ["row"]
    for p in PHASES:
        head += [f"{PHASE_TITLE[p]} ms", "x floor"]
    head += ["peak MiB (step)", "tokens/s (step)", "x_hat err", "status"]
    body = []
    for r in res.rows:
        cells = [r.label]
        for p in PHASES:
            ms = r.median(p)
            cells += [_fmt_ms(ms), "-" if ms is None else f"{ms / floor:.2f}"]
        mem = r.phases.get("fwd" if r.kind == "floor" else "step")  # the floor has only its GEMM
        peak = mem["peak_bytes"] if mem else None
        tok = res.workload.batch / (r.median("step") / 1e3) if r.median("step") else None
        cells += [_fmt_mib(peak), "-" if tok is None else f"{tok:,.0f}",
                  "-" if r.xhat_rel_err is None else f"{r.xhat_rel_err:.1e}",
                  r.status if not r.error else f"{r.status}: {r.error}"]
        body.append(cells)
    return head, body


def speedup_rows(res: Result) -> tuple[list[str], list[list[str]]]:
    ours = [r for r in res.rows if r.kind == "sae-fast" and r.label != "sae-fast [reference]" and r.status == "ok"]
    others = [r for r in res.rows if r.kind != "floor" and r not in ours]
    head = ["speedup (step; fwd / fwd+bwd)"] + [f"vs {o.label}" for o in others]
    body = []
    for r in ours:
        cells = [r.label]
        for o in others:
            if o.status != "ok":
                cells.append(o.status)
                continue
            fwd = _speedup(o.median("fwd"), r.median("fwd"))
            fwd_bwd = _speedup(o.median("fwd_bwd"), r.median("fwd_bwd"))
            cells.append(f"{_speedup(o.median('step'), r.median('step'))} ({fwd} / {fwd_bwd})")
        body.append(cells)
    return head, body


def patched_rows(res: Result) -> tuple[list[str], list[list[str]]]:
    """Each patched peer row against the same peer unpatched: what sae_fast.integrations gives inside it."""
    by_label = {r.label: r for r in res.rows}
    head = ["speedup of the patch (unpatched / patched)"] + [PHASE_TITLE[p] for p in PHASES]
    body = []
    for r in res.rows:
        base = by_label.get(r.label[:-len(PATCHED)]) if r.label.endswith(PATCHED) else None
        if base is None:
            continue
        if r.status != "ok" or base.status != "ok":
            body.append([r.label] + [r.status if r.status != "ok" else base.status] * len(PHASES))
            continue
        body.append([r.label] + [_speedup(base.median(p), r.median(p)) for p in PHASES])
    return head, body


def text_table(head, body) -> str:
    """Aligned columns: the first left-justified, the others right-justified; a last column named "status" is
    left as it is (free text)."""
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    status_col = len(head) - 1 if head and head[-1] == "status" else None
    lines = []
    for cells in [head] + body:
        parts = []
        for i, (c, wdt) in enumerate(zip(cells, widths)):
            if i == status_col:
                parts.append(str(c))
            elif i == 0:
                parts.append(str(c).ljust(wdt))
            else:
                parts.append(str(c).rjust(wdt))
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def markdown_table(head, body, escape: bool = True) -> str:
    """A Markdown table; ``escape`` writes a '|' inside a cell as '\\|'."""
    esc = (lambda c: str(c).replace("|", "\\|")) if escape else str
    lines = ["| " + " | ".join(esc(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(esc(c) for c in cells) + " |" for cells in body]
    return "\n".join(lines)


_ORDER = {"interleaved": "rows timed round-robin call by call (a load change hits every row alike)",
          "sequential": "rows timed one after another"}


def _title(res: Result, meta: dict) -> str:
    dev = meta["device"]
    dtype = "fp32" if res.dtype == "fp32" else "bf16 autocast, fp32 master weights"
    return (f"workload {res.workload.name}: {res.workload.describe()}, {dtype} | {dev['name']} "
            f"({dev['threads']} threads) | median of {meta['repeats']} after {meta['warmup']} warm-up calls, "
            f"{meta['order']}")


SAME_FOR_ALL = (f"every row: the same x and initial weights (unit decoder rows, tied encoder), the trainer's Adam "
                f"(lr={ADAM_LR}; torch's fused Adam where it exists, FusedAdam in the trainer-step row), no AuxK but in "
                "the trainer-step row, fresh gradients each call.")


def render_text(results: list[Result], meta: dict) -> str:
    out = [f"sae-fast bench (measured) | torch {meta['versions']['torch']} | load average at start "
           f"{meta['load_avg_start']}"]
    for res in results:
        out += ["", _title(res, meta)]
        out.append(text_table(*table_rows(res)))
        for head, body in (speedup_rows(res), patched_rows(res), ratio_rows(res)):
            if body:
                out += ["", text_table(head, body)]
        for note in res.notes:
            out.append(f"note: {note}")
    out += ["", "x floor: time / the encoder GEMM's time (fwd column of the floor row). x_hat err: max |x_hat - "
            "reference.py's x_hat| / max |x_hat|, from the first forward.", f"peak memory: {meta['memory_method']}.",
            SAME_FOR_ALL, "rows ran:"]
    for r in results[0].rows:
        out.append(f"  {r.label}: {r.settings}")
    return "\n".join(out)


def render_markdown(results: list[Result], meta: dict) -> str:
    v = meta["versions"]
    git = meta["git"]
    out = [f"# sae-fast bench: {meta['device']['name']} (measured)", "",
           f"- command: `{meta['command']}`",
           f"- date: {meta['date']}; git commit {git['commit']}{' (with uncommitted changes)' if git['dirty'] else ''}",
           "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
           f"- device: {json.dumps(meta['device'])}",
           f"- load average (1, 5, 15 min) at start {meta['load_avg_start']}, at end {meta['load_avg_end']}",
           f"- timing: median of {meta['repeats']} synchronised calls after {meta['warmup']} warm-up calls, "
           f"one process, {_ORDER[meta['order']]}",
           f"- peak memory: {meta['memory_method']}", ""]
    for res in results:
        out += [f"## {_title(res, meta)}", "", markdown_table(*table_rows(res)), ""]
        for head, body in (speedup_rows(res), patched_rows(res), ratio_rows(res)):
            if body:
                out += [markdown_table(head, body), ""]
        out += [f"- note: {n}" for n in res.notes]
    out += ["", "## What each row ran", "", SAME_FOR_ALL, ""]
    out += [f"- **{r.label}**: {r.settings}" for r in results[0].rows]
    out += ["", "`x floor` is time / the encoder GEMM's time; `x_hat err` is max |x_hat - reference.py's x_hat| / "
            "max |x_hat| from the first forward (a check that every row computes the same SAE).", ""]
    return "\n".join(out)


def save_chart(results: list[Result], meta: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    height = 1.2 + 0.55 * max(len(r.rows) for r in results) * len(results)
    fig, axes = plt.subplots(len(results), 1, figsize=(9, height), squeeze=False)
    for ax, res in zip(axes[:, 0], results):
        rows = [r for r in res.rows if r.kind != "floor"]
        labels = [r.label if r.status == "ok" else f"{r.label} ({r.status})" for r in rows]
        height = 0.8 / len(PHASES)
        for j, p in enumerate(PHASES):
            vals = [(r.median(p) or 0) / res.floor_ms for r in rows]
            ax.barh([i + j * height for i in range(len(rows))], vals, height=height, label=PHASE_TITLE[p])
        ax.set_yticks([i + height for i in range(len(rows))], labels)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.8, ls="--", label="encoder GEMM")
        ax.set_xlabel("time / encoder GEMM (lower is better)")
        ax.set_title(f"{res.workload.name}: {res.workload.describe()}, {res.dtype} | {meta['device']['name']}",
                     fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def to_json(results: list[Result], meta: dict) -> dict:
    out = []
    for res in results:
        rows = [asdict(row) for row in res.rows]
        for row in rows:
            for phase in row["phases"].values():
                phase["tokens_per_s"] = res.workload.batch / (phase["median_ms"] / 1e3)
        out.append({"workload": asdict(res.workload), "dtype": res.dtype, "interleaved": res.interleaved,
                    "notes": res.notes, "rows": rows})
    return {**meta, "workloads": out}


def save_results(results: list[Result], meta: dict, out: Path, stem: str) -> list[str]:
    """Write <stem>.json, <stem>.md and (with matplotlib) <stem>.png in ``out``; returns the names written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(to_json(results, meta), indent=1) + "\n")
    (out / f"{stem}.md").write_text(render_markdown(results, meta))
    saved = [f"{stem}.json", f"{stem}.md"]
    if save_chart(results, meta, out / f"{stem}.png"):
        saved.append(f"{stem}.png")
    return saved
