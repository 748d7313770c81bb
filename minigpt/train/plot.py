"""Draw a run's curves (from its ``metrics.jsonl``) into a PNG next to the run.

Two panels: loss against optimizer step (train, and validation when present),
and validation bits-per-byte against wall-clock time, the curve that says how
much quality a minute of training buys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics JSONL file (a torn last line is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves at most one partial line
    return records


def plot_curves(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Write the loss / bits-per-byte plot of ``metrics_path`` to ``png_path``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "eval"]
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("cross-entropy (nats/token)")
    ax_loss.set_title("loss")
    ax_loss.grid(alpha=0.3)
    if train or val:
        ax_loss.legend()
    with_bpb = [r for r in val if r.get("val_bpb") is not None]
    if with_bpb:
        ax_bpb.plot(
            [r["time_s"] / 60 for r in with_bpb], [r["val_bpb"] for r in with_bpb], "o-", c="C1"
        )
    ax_bpb.set_xlabel("wall time (minutes)")
    ax_bpb.set_ylabel("validation bits per byte")
    ax_bpb.set_title("bits per byte vs wall time")
    ax_bpb.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
