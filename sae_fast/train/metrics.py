"""Training metrics: one JSON object per line (metrics.jsonl) and a PNG of the curves."""
from __future__ import annotations

import json
from pathlib import Path

CURVES = (("loss", "loss", True), ("fvu", "FVU (dots: held-out)", True), ("l0", "L0 (active latents / token)", False),
          ("dead_pct", "dead latents (%)", False), ("lr", "learning rate", False))


class MetricsLog:
    """Append-only JSONL. Opening it for a resumed run first drops rows past the checkpoint's step, so the
    file reads as if the run had never stopped."""

    def __init__(self, path, resume_step: int | None = None):
        self.path = Path(path)
        rows = self.read(self.path) if resume_step is not None else []
        kept = [r for r in rows if r.get("step", 0) <= resume_step] if resume_step is not None else []
        with self.path.open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    @staticmethod
    def read(path) -> list[dict]:
        path = Path(path)
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut short by a kill
                break
        return rows


def plot_curves(metrics_path, png_path, title: str = "", held_out: dict | None = None, show_loss: bool = True) -> Path:
    """FVU (with the held-out FVU of ``held_out`` {layer: fvu} as a dot at the end), L0, dead % and the
    learning rate against training tokens, one line per layer; the loss too with ``show_loss`` (for TopK it
    is the FVU curve again plus a small AuxK term, so the trainer turns it off there)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = MetricsLog.read(metrics_path)
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    curves = [c for c in CURVES if c[0] != "loss" or show_loss]
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4))
    for ax, (key, label, log) in zip(axes, curves):
        for layer in layers:
            pts = [(r["tokens"], r[key]) for r in rows if r["layer"] == layer and r.get(key) is not None]
            if pts:
                line, = ax.plot(*zip(*pts), label=layer, lw=1.2)
                if key == "fvu" and held_out and held_out.get(layer) is not None:
                    ax.plot([pts[-1][0]], [held_out[layer]], "o", color=line.get_color())
        ax.set_title(label)
        ax.set_xlabel("training tokens")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if len(layers) > 1:
        axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
