"""Run logs: JSONL events, a per-epoch CSV, a PNG of the training curves, and TensorBoard
scalars when the ``tensorboard`` package is installed (``pip install buildseg[tensorboard]``)."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("buildseg")

# event keys written to TensorBoard, under the tag "<group>/<key>"
_SCALARS = {
    "step": ("train", ("loss", "lr", "img_s", "data_wait")),
    "epoch": ("epoch", ("train_loss", "val_dice", "val_iou", "val_f1", "val_empty_fp_rate", "train_img_s", "data_wait", "lr")),
}


def tensorboard_writer(log_dir: Path) -> Any | None:
    """A SummaryWriter, or None (with one log line) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: no TensorBoard logs (pip install tensorboard); "
                 "metrics.jsonl and history.csv have the same figures")
        return None
    return SummaryWriter(log_dir=str(log_dir))


class RunLog:
    """Everything the run reports, written by the main process only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self.events = run_dir / "metrics.jsonl"
        self.history_csv = run_dir / "history.csv"
        self.curves_png = run_dir / "curves.png"
        self.tensorboard_dir = run_dir / "tensorboard"
        self._want_tensorboard = tensorboard and enabled
        self._writer: Any | None = None

    def event(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.events, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self._tensorboard(record)

    def _tensorboard(self, record: dict[str, Any]) -> None:
        if record.get("kind") not in _SCALARS or not self._want_tensorboard:
            return
        if self._writer is None:
            self._writer = tensorboard_writer(self.tensorboard_dir)
            if self._writer is None:
                self._want_tensorboard = False
                return
        group, keys = _SCALARS[record["kind"]]
        step = int(record["step"])
        for key in keys:
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(f"{group}/{key}", value, step)
        for key, value in record.get("parts", {}).items():
            self._writer.add_scalar(f"train/loss_{key}", value, step)
        if record["kind"] == "epoch":
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def write_history(self, history: list[dict[str, Any]]) -> None:
        if not self.enabled or not history:
            return
        from buildseg.atomic import atomic_open

        keys = list(dict.fromkeys(k for row in history for k in row))
        with atomic_open(self.history_csv, "w", newline="", encoding="utf-8") as handle:
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
    f1 = [row.get("val_f1", math.nan) for row in history]
    if not all(math.isnan(v) for v in f1):
        ax_dice.plot(epochs, f1, marker="s", color="tab:purple", label="val building F1 (IoU 0.5)")
    ax_dice.set_xlabel("epoch")
    ax_dice.set_ylim(0, 1)
    ax_dice.legend()
    fig.tight_layout()
    from buildseg.atomic import atomic_open

    with atomic_open(path, "wb") as handle:  # a kill mid-write leaves the previous plot
        fig.savefig(handle, dpi=90, format="png")
    plt.close(fig)
