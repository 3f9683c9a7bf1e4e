"""The competition metric and its companions, computed from per-image pixel counts.

Competition Dice, per image: ``(2|P∩G| + 1e-7) / (|P| + |G| + 1e-7)``. An image that is
empty in both prediction and truth is *dropped* from the mean (it does not score 1); the
score is the plain mean over the remaining images. One false-positive pixel on an empty
tile therefore costs a full 0 for that tile.

Everything here works from four integers per image (tp, fp, fn, pixels), so validation
can stream tiles through :class:`Scoreboard` and distributed ranks can sum their counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SMOOTH = 1e-7


def image_counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of one binary image pair."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(truth, dtype=bool)
    tp = int(np.count_nonzero(p & g))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(g)) - tp


def dice_per_image(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Competition Dice of each image; NaN where prediction and truth are both empty."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    sizes = 2 * tp + fp + fn  # |P| + |G|
    dice = (2 * tp + SMOOTH) / (sizes + SMOOTH)
    return np.where(sizes > 0, dice, np.nan)


def competition_dice(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[float, int]:
    """(score, number of images scored). The score is NaN when every image was dropped."""
    dice = dice_per_image(tp, fp, fn)
    scored = ~np.isnan(dice)
    n_scored = int(scored.sum())
    return (float(dice[scored].mean()) if n_scored else float("nan")), n_scored


@dataclass
class Scoreboard:
    """Accumulates per-image counts and summarises them with the competition's rules."""

    tp: list[int] = field(default_factory=list)
    fp: list[int] = field(default_factory=list)
    fn: list[int] = field(default_factory=list)

    def add(self, pred: np.ndarray, truth: np.ndarray) -> None:
        tp, fp, fn = image_counts(pred, truth)
        self.add_counts(tp, fp, fn)

    def add_counts(self, tp: int, fp: int, fn: int) -> None:
        self.tp.append(int(tp))
        self.fp.append(int(fp))
        self.fn.append(int(fn))

    def __len__(self) -> int:
        return len(self.tp)

    def counts(self) -> np.ndarray:
        """An (n, 3) int64 array of tp, fp, fn per image."""
        return np.array([self.tp, self.fp, self.fn], dtype=np.int64).T.reshape(-1, 3)

    def summary(self) -> dict[str, float | int]:
        return summarize(self.counts())


def summarize(counts: np.ndarray) -> dict[str, float | int]:
    """All metrics from an (n, 3) array of per-image (tp, fp, fn).

    ``dice``/``n_scored``: the competition score. ``iou``, ``precision``, ``recall``:
    per-image means over the images where each is defined (IoU drops both-empty images
    like Dice; precision needs a non-empty prediction, recall a non-empty truth).
    ``micro_iou``: total tp / total (tp + fp + fn). ``empty_fp_rate``: share of
    truth-empty images with any predicted pixel, the costliest error under this metric.
    """
    counts = np.asarray(counts, dtype=np.int64).reshape(-1, 3)
    tp, fp, fn = (counts[:, i].astype(np.float64) for i in range(3))
    dice, n_scored = competition_dice(tp, fp, fn)
    union = tp + fp + fn
    n_pred, n_true = tp + fp, tp + fn

    def mean_where(values: np.ndarray, ok: np.ndarray) -> float:
        return float(values[ok].mean()) if ok.any() else float("nan")

    with np.errstate(invalid="ignore", divide="ignore"):
        iou = mean_where((tp + SMOOTH) / (union + SMOOTH), union > 0)
        precision = mean_where(tp / n_pred, n_pred > 0)
        recall = mean_where(tp / n_true, n_true > 0)
    empty_truth = n_true == 0
    total_union = union.sum()
    return {
        "dice": dice,
        "n_scored": n_scored,
        "n": int(len(counts)),
        "iou": iou,
        "precision": precision,
        "recall": recall,
        "micro_iou": float(tp.sum() / total_union) if total_union > 0 else float("nan"),
        "n_empty_truth": int(empty_truth.sum()),
        "empty_fp_rate": mean_where((n_pred > 0).astype(np.float64), empty_truth),
    }
