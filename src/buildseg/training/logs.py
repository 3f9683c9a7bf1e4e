"""Run logs: JSONL events, a per-epoch CSV and a PNG of the training curves."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self.events = run_dir / "metrics.jsonl"
        self.history_csv = run_dir / "history.csv"
        self.curves_png = run_dir / "curves.png"

    def event(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.events, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def write_history(self, history: list[dict[str, Any]]) -> None:
        if not self.enabled or not history:
            return
        keys = list(dict.fromkeys(k for row in history for k in row))
        with open(self.history_csv, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)
        plot_curves(history, self.curves_png)


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    dice = [row.get("val_dice", math.nan) for row in history]
    ax_dice.plot(epochs, dice, marker="o", color="tab:green", label="val competition Dice")
    ax_dice.set_xlabel("epoch")
    ax_dice.set_ylim(0, 1)
    ax_dice.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
