"""``buildseg tune``: choose threshold x min-area x empty rule for the competition Dice or
the building F1 (``--objective dice|f1``).

Validation tiles are predicted once; the search then works on the stored probabilities.
For each threshold the connected components of every tile are labelled once, so each
min-area value is a lookup, and the "empty if max probability < t" rule only rewrites a
tile's counts (tp, fp -> 0; fn -> tp + fn). Building F1: the (truth, prediction) component
pairs and their IoUs are found once per threshold; a min-area drops predicted components
and their pairs before the one-to-one matching. The best setting is stored in the checkpoint,
where ``predict`` and :class:`Segmenter` pick it up unless overridden.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from torch.utils.data import DataLoader

from buildseg.data.datasets import GridTileDataset
from buildseg.errors import BuildsegError
from buildseg.inference.core.postprocess import PostProcess
from buildseg.inference.core.segmenter import Segmenter
from buildseg.instance_metrics import InstanceCounts, greedy_match, label_buildings, mask_pairs
from buildseg.metrics import summarize
from buildseg.settings.models import OBJECTIVES

THRESHOLDS = tuple(np.round(np.arange(0.30, 0.801, 0.05), 2))
MIN_AREAS = (0, 10, 20, 50, 100, 200, 400)
EMPTY_MAX_PROBS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class TuneRow:
    post: PostProcess
    summary: dict


def predict_tiles(segmenter: Segmenter, dataset: GridTileDataset, batch_size: int = 32,
                  maps: bool = False) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Probabilities (float32, as predict sees them) and truth masks of every tile, cropped to
    its real pixels: (H, W) footprint maps, or all (K, H, W) maps with ``maps``."""
    probs, truths = [], []
    for images, masks, valid in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        batch = segmenter.probabilities(images).mean
        for k in range(len(images)):
            h, w = valid[k].tolist()
            probs.append(batch[k, :, :h, :w].copy() if maps else batch[k, 0, :h, :w].copy())
            truths.append(masks[k, 0, :h, :w].numpy().astype(bool))
    return probs, truths


CONTACT_THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6)


def tune_contact(maps: Sequence[np.ndarray], truths: Sequence[np.ndarray], post: PostProcess, objective: str = "dice",
                 contact_index: int = 1, thresholds: Sequence[float] = CONTACT_THRESHOLDS) -> list[TuneRow]:
    """For a model with a contact channel: the watershed's contact threshold, with the rest of
    ``post`` fixed (the first stage's winner), best first by ``objective``. A contact head
    trained briefly is not calibrated (its map can stay near 0.4 everywhere), so 0.5 may
    leave no seed to split on."""
    from dataclasses import replace

    from buildseg.inference.core.postprocess import apply
    from buildseg.inference.core.split import split_mask
    from buildseg.instance_metrics import match_masks
    from buildseg.metrics import image_counts

    rows = []
    for threshold in thresholds:
        candidate = replace(post, contact_threshold=float(threshold))
        counts, buildings = [], InstanceCounts()
        for m, truth in zip(maps, truths):
            mask = apply(m[0], candidate)
            if mask.any():
                mask = split_mask(mask, m[0], m[contact_index], candidate.contact_threshold)
            counts.append(image_counts(mask, truth))
            buildings += match_masks(mask, truth).counts
        summary = summarize(np.array(counts, dtype=np.int64).reshape(-1, 3))
        b = buildings.summary()
        summary.update(f1=b["f1"], building_precision=b["precision"], building_recall=b["recall"])
        rows.append(TuneRow(candidate, summary))
    rows.sort(key=lambda r: -np.nan_to_num(r.summary[objective], nan=-1.0))
    return rows


def _component_counts(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per component of ``pred``: (area, pixels also in truth)."""
    n, labels = cv2.connectedComponents(pred.astype(np.uint8), connectivity=8)
    area = np.bincount(labels.ravel(), minlength=n)[1:]
    hits = np.bincount(labels.ravel(), weights=truth.ravel(), minlength=n)[1:]
    return area, hits


def _building_counts(prob: np.ndarray, truth_labels: tuple[np.ndarray, int], threshold: float,
                     min_areas: Sequence[int]) -> np.ndarray:
    """(len(min_areas), 4): n_true, n_pred, n_matched, IoU sum of one tile per min-area."""
    t_labels, n_t = truth_labels
    p_labels, n_p = label_buildings(prob > threshold)
    pairs = mask_pairs(t_labels, n_t, p_labels, n_p)
    area = np.bincount(p_labels.ravel(), minlength=n_p + 1)[1:]
    out = np.zeros((len(min_areas), 4))
    for k, min_area in enumerate(min_areas):
        keep = area >= max(min_area, 1)
        matches = greedy_match([q for q in pairs if keep[q[1]]])
        out[k] = (n_t, int(keep.sum()), len(matches), sum(m.iou for m in matches))
    return out




def search(
    probs: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    thresholds: Sequence[float] = THRESHOLDS,
    min_areas: Sequence[int] = MIN_AREAS,
    empty_max_probs: Sequence[float] = EMPTY_MAX_PROBS,
    objective: str = "dice",
) -> list[TuneRow]:
    """Every combination scored with the competition Dice and the building F1, best first by ``objective``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: use one of {OBJECTIVES}")
    truth_sizes = np.array([t.sum() for t in truths], dtype=np.int64)
    truth_labels = [label_buildings(t) for t in truths]
    max_probs = np.array([float(p.max()) if p.size else 0.0 for p in probs])
    rows = []
    for threshold in thresholds:
        comps = [_component_counts(p > threshold, t) for p, t in zip(probs, truths)]
        buildings = np.stack([_building_counts(p, tl, threshold, min_areas) for p, tl in zip(probs, truth_labels)])
        for m, min_area in enumerate(min_areas):
            tp = np.array([int(hits[area >= max(min_area, 1)].sum()) for area, hits in comps])
            pred = np.array([int(area[area >= max(min_area, 1)].sum()) for area, _ in comps])
            for empty_p in empty_max_probs:
                empty = max_probs < empty_p
                tp_e = np.where(empty, 0, tp)
                fp_e = np.where(empty, 0, pred - tp)
                fn_e = truth_sizes - tp_e
                b = buildings[:, m].copy()
                b[empty, 1:] = 0  # an emptied tile predicts no building
                n_true, n_pred, n_matched, iou_sum = b.sum(axis=0)
                summary = summarize(np.stack([tp_e, fp_e, fn_e], axis=1))
                building = InstanceCounts(int(n_true), int(n_pred), int(n_matched), float(iou_sum)).summary()
                summary.update(f1=building["f1"], building_precision=building["precision"],
                               building_recall=building["recall"])
                post = PostProcess(threshold=float(threshold), min_area=int(min_area), empty_max_prob=float(empty_p))
                rows.append(TuneRow(post, summary))
    rows.sort(key=lambda r: (-np.nan_to_num(r.summary[objective], nan=-1.0), r.post.min_area, r.post.empty_max_prob))
    return rows


def format_table(rows: list[TuneRow], default: TuneRow, top: int = 5) -> str:
    lines = ["| setting | threshold | min_area | empty if max prob < | Dice | building F1 | n scored | empty-tile FP rate |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in [("default", default)] + [(f"#{i + 1}", r) for i, r in enumerate(rows[:top])]:
        s = row.summary
        lines.append(f"| {name} | {row.post.threshold:.2f} | {row.post.min_area} | {row.post.empty_max_prob:.2f} | "
                     f"{s['dice']:.4f} | {s['f1']:.4f} | {s['n_scored']} | {s['empty_fp_rate']:.3f} |")
    return "\n".join(lines)


def default_row(probs, truths) -> TuneRow:
    return search(probs, truths, thresholds=(0.5,), min_areas=(0,), empty_max_probs=(0.0,))[0]


__all__ = ["search", "predict_tiles", "format_table", "default_row", "store_in_checkpoint", "TuneRow"]


def store_in_checkpoint(path, post: PostProcess) -> None:
    """Write ``post`` into the checkpoint (atomically), where predict will find it."""
    from buildseg.runtime.checkpoint import load_checkpoint, save_atomic

    payload = load_checkpoint(path)
    payload["postprocess"] = post.to_dict()
    save_atomic(payload, path)


@dataclass
class TuneResult:
    rows: list[TuneRow]  # stage 1 (threshold x min-area x empty rule), best first
    default: TuneRow  # threshold 0.5, nothing removed
    contact_rows: list[TuneRow] | None  # stage 2 for models with a contact channel, best first
    best: PostProcess  # what to store


def tune_segmenter(segmenter: Segmenter, dataset, objective: str = "dice", batch_size: int = 32) -> TuneResult:
    """Both stages on ``dataset``'s tiles: the footprint post-processing, then (contact models)
    the watershed's contact threshold."""
    maps, truths = predict_tiles(segmenter, dataset, batch_size, maps=True)
    probs = [m[0] for m in maps]
    rows = search(probs, truths, objective=objective)
    contact_rows = None
    best = rows[0].post
    if "contact" in segmenter.targets and segmenter.split:
        contact_rows = tune_contact(maps, truths, best, objective, segmenter.targets.index("contact"))
        best = contact_rows[0].post
    return TuneResult(rows, default_row(probs, truths), contact_rows, best)


def run_tune(settings) -> list[str]:
    """``buildseg tune``: search on the labelled tiles of ``settings.data`` (a
    :class:`~buildseg.settings.models.TuneSettings`), write ``--json``, store the best setting
    in every checkpoint unless ``save`` is off; the lines to print. Unwritable checkpoints and
    bad data stop it before any prediction."""
    import json
    import os

    from buildseg.atomic import atomic_open
    from buildseg.data.datasets import GridTileDataset
    from buildseg.formats.tables import load_records
    from buildseg.runtime.checkpoint import checkpoint_paths

    paths = checkpoint_paths(settings.checkpoint)
    if settings.out:
        from buildseg.outputs import FOLDER, check_outputs

        check_outputs((settings.out, "--out", FOLDER))
    elif settings.save:
        for path in paths:
            if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):
                raise BuildsegError(f"cannot store the tuned setting in {path}: not writable; copy it somewhere "
                                    "writable or pass --no-save")
    records = load_records(settings.data, require_masks=True)
    segmenter = Segmenter.from_checkpoint(paths, device=settings.device, precision=settings.precision, tta=settings.tta,
                                          engine=settings.engine)
    dataset = GridTileDataset(records, tile=settings.tile, in_chans=segmenter.in_chans)
    tuned = tune_segmenter(segmenter, dataset, settings.objective, settings.batch_size)
    objective, best = settings.objective, tuned.best
    lines = [f"{len(dataset)} validation tiles, {len(tuned.rows)} settings, best by {objective}\n",
             format_table(tuned.rows, tuned.default)]
    if tuned.contact_rows:
        lines.append("\nwatershed split of touching buildings: " + ", ".join(
            f"contact < {r.post.contact_threshold:.1f}: {objective} {r.summary[objective]:.4f}"
            for r in sorted(tuned.contact_rows, key=lambda r: r.post.contact_threshold)))
    if settings.json:
        with atomic_open(settings.json, "w") as handle:
            handle.write(json.dumps([{**r.post.to_dict(), **r.summary} for r in tuned.rows], indent=1))
    if settings.out:
        from buildseg.runtime.checkpoint import load_checkpoint, save_atomic

        payload = load_checkpoint(paths[0])
        payload["postprocess"] = best.to_dict()
        Path(settings.out).mkdir(parents=True, exist_ok=True)
        target = save_atomic({k: v for k, v in payload.items() if k not in ("format", "schema")},
                             Path(settings.out) / "best.pt")
        lines.append(f"wrote {target} with threshold={best.threshold} min_area={best.min_area} empty_max_prob="
                     f"{best.empty_max_prob}: predict with --checkpoint {settings.out}")
    elif settings.save:
        for path in paths:
            store_in_checkpoint(path, best)
            lines.append(f"stored threshold={best.threshold} min_area={best.min_area} empty_max_prob="
                         f"{best.empty_max_prob}{f' contact_threshold={best.contact_threshold}' if tuned.contact_rows else ''}"
                         f" in {path}")
    return lines
