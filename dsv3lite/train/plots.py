"""PNG plots of a run, from its metrics.jsonl: loss curves, MaxVio over steps, expert load."""

from __future__ import annotations

import json
from pathlib import Path

# Figure objects, not pyplot: importing this module must not change a notebook's backend.
from matplotlib.figure import Figure


def read_metrics(path: str | Path) -> list[dict]:
    """Every JSON object of a metrics.jsonl file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_run(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write loss.png, maxvio.png and expert_load.png into out_dir; return their paths."""
    rows = read_metrics(metrics_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in rows]
    paths = []

    fig, ax = _subplots(figsize=(6, 3.5), dpi=90)
    ax.plot(steps, [r["loss"] for r in rows], label="train loss")
    if any("mtp_loss" in r for r in rows):
        ax.plot(steps, [r.get("mtp_loss") for r in rows], label="MTP loss (depth 1)", alpha=0.7)
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    if rows and rows[-1].get("unigram_entropy"):
        ax.axhline(rows[-1]["unigram_entropy"], ls="--", c="gray", label="unigram entropy")
    ax.set(xlabel="step", ylabel="nats / token", title="Loss")
    ax.legend()
    paths.append(_save(fig, out_dir / "loss.png"))

    fig, ax = _subplots(figsize=(6, 3.5), dpi=90)
    per_layer = list(zip(*[r["maxvio_per_layer"] for r in rows])) if rows else []
    for i, series in enumerate(per_layer):
        ax.plot(steps, series, label=f"MoE layer {i}", alpha=0.8)
    ax.set(xlabel="step", ylabel="MaxVio", title="Expert-load imbalance (0 = perfect)")
    if per_layer:
        ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "maxvio.png"))

    fig, ax = _subplots(figsize=(6, 3), dpi=90)
    if rows:
        load = rows[-1]["expert_load"]  # [layers][experts], fraction of the step's tokens
        im = ax.imshow(load, aspect="auto", cmap="viridis")
        fig.colorbar(im, ax=ax, label="share of routed tokens")
    ax.set(
        xlabel="expert",
        ylabel="MoE layer",
        title=f"Expert load at step {steps[-1] if steps else 0}",
    )
    paths.append(_save(fig, out_dir / "expert_load.png"))
    return paths


def _subplots(figsize, dpi):
    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: Path) -> Path:
    if fig.get_layout_engine() is None:  # the course style already lays figures out
        fig.tight_layout()
    fig.savefig(path)
    return path
