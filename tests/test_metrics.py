import math

import numpy as np
import pytest

from buildseg.metrics import Scoreboard, image_counts, summarize
from conftest import random_mask


def brute_force_dice(preds, truths):
    """The competition's own formulation, image by image."""
    scores = []
    for p, g in zip(preds, truths):
        if g.sum() > 0 or p.sum() > 0:
            scores.append((2.0 * np.sum(p * g) + 1e-7) / (np.sum(p) + np.sum(g) + 1e-7))
    return float(np.mean(scores)) if scores else math.nan, len(scores)


def test_matches_brute_force_on_random_masks():
    rng = np.random.default_rng(0)
    for _trial in range(30):
        shape = tuple(rng.integers(1, 40, 2))
        preds = [random_mask(rng, shape) for _ in range(12)]
        truths = [random_mask(rng, shape) for _ in range(12)]
        board = Scoreboard()
        for p, g in zip(preds, truths):
            board.add(p, g)
        summary = board.summary()
        expected, n_scored = brute_force_dice(preds, truths)
        assert summary["n_scored"] == n_scored and summary["n"] == 12
        assert summary["dice"] == pytest.approx(expected, rel=1e-12) or (math.isnan(expected) and math.isnan(summary["dice"]))

        ious = [(np.sum(p & g) + 1e-7) / (np.sum(p | g) + 1e-7) for p, g in zip(preds, truths) if (p | g).any()]
        assert summary["iou"] == pytest.approx(np.mean(ious)) if ious else math.isnan(summary["iou"])
        precisions = [np.sum(p & g) / p.sum() for p, g in zip(preds, truths) if p.sum()]
        recalls = [np.sum(p & g) / g.sum() for p, g in zip(preds, truths) if g.sum()]
        if precisions:
            assert summary["precision"] == pytest.approx(np.mean(precisions))
        if recalls:
            assert summary["recall"] == pytest.approx(np.mean(recalls))
        union = sum(np.sum(p | g) for p, g in zip(preds, truths))
        if union:
            assert summary["micro_iou"] == pytest.approx(sum(np.sum(p & g) for p, g in zip(preds, truths)) / union)


def test_both_empty_is_dropped_not_one():
    empty = np.zeros((4, 4), np.uint8)
    full = np.ones((4, 4), np.uint8)
    counts = np.array([image_counts(empty, empty), image_counts(full, full)])
    assert summarize(counts)["dice"] == pytest.approx(1.0)
    assert summarize(counts)["n_scored"] == 1
    # a single false-positive pixel on an empty tile costs a full 0 for that tile
    speck = empty.copy()
    speck[0, 0] = 1
    counts = np.array([image_counts(speck, empty), image_counts(full, full)])
    assert summarize(counts)["dice"] == pytest.approx(0.5)
    assert summarize(counts)["empty_fp_rate"] == 1.0


def test_all_empty_gives_nan_with_zero_scored():
    empty = np.zeros((3, 3), np.uint8)
    summary = summarize(np.array([image_counts(empty, empty)] * 3))
    assert math.isnan(summary["dice"]) and summary["n_scored"] == 0 and summary["empty_fp_rate"] == 0.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        image_counts(np.zeros((2, 2)), np.zeros((3, 3)))
