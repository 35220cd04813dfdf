"""Training metrics: one JSON object per line (metrics.jsonl) and a PNG of the curves."""
from __future__ import annotations

import json
from pathlib import Path

CURVES = (("loss", "loss", True), ("fvu", "FVU", True), ("l0", "L0 (active latents / token)", False),
          ("dead_pct", "dead latents (%)", False))


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


def plot_curves(metrics_path, png_path, title: str = "") -> Path:
    """Loss, FVU, L0 and dead % against training tokens, one line per layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = MetricsLog.read(metrics_path)
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
    for ax, (key, label, log) in zip(axes, CURVES):
        for layer in layers:
            pts = [(r["tokens"], r[key]) for r in rows if r["layer"] == layer and r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=layer, lw=1.2)
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
