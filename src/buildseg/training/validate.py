"""Validation: predict grid tiles, count tp/fp/fn and buildings per tile, score with the
competition Dice and the building F1 (IoU >= 0.5; buildings cut by a tile border count as
the parts inside each tile).

Under torchrun every rank scores its own share of the tiles and the counts are summed, so
the score is the same as on one process.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from buildseg.data.datasets import GridTileDataset
from buildseg.distributed import SINGLE_PROCESS, DistInfo, all_reduce
from buildseg.instance_metrics import InstanceCounts, match_masks
from buildseg.metrics import summarize
from buildseg.runtime.device import autocast


@torch.no_grad()
def tile_counts(
    model: nn.Module,
    dataset: GridTileDataset,
    device: torch.device,
    precision: str,
    batch_size: int,
    threshold: float = 0.5,
    channels_last: bool = True,
    dist_info: DistInfo = SINGLE_PROCESS,
    num_workers: int = 0,
) -> np.ndarray:
    """(n_tiles, 7) float64: pixel tp, fp, fn and buildings n_true, n_pred, n_matched, matched
    IoU sum per tile, identical on every rank."""
    was_training = model.training
    model.eval()
    counts = torch.zeros((len(dataset), 7), dtype=torch.float64)
    indices = list(range(dist_info.rank, len(dataset), dist_info.world_size))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        generator=torch.Generator())  # does not draw from the global RNG
    logit_threshold = float(np.log(threshold / (1 - threshold)))
    position = 0
    for images, masks, valid in loader:
        images = images.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(images)
        pred = (logits.float() > logit_threshold).cpu()
        truth = masks.bool()
        for k in range(len(images)):
            h, w = valid[k].tolist()
            p, g = pred[k, 0, :h, :w], truth[k, 0, :h, :w]
            tp = int((p & g).sum())
            b = match_masks(p.numpy(), g.numpy()).counts
            counts[indices[position]] = torch.tensor([tp, int(p.sum()) - tp, int(g.sum()) - tp, b.n_true, b.n_pred,
                                                      b.n_matched, b.iou_sum], dtype=torch.float64)
            position += 1
    model.train(was_training)
    return all_reduce(counts, dist_info).numpy()


def validate(model, dataset, device, precision, batch_size, threshold=0.5, channels_last=True, dist_info=SINGLE_PROCESS, num_workers=0):
    """Summary dict over the validation tiles: the pixel metrics (``dice``, ``n_scored``,
    ``iou``, ...) and the building ones (``f1``, ``building_precision``, ``building_recall``,
    ``mean_iou``)."""
    counts = tile_counts(model, dataset, device, precision, batch_size, threshold, channels_last, dist_info, num_workers)
    n_true, n_pred, n_matched, iou_sum = counts[:, 3:].sum(axis=0)
    buildings = InstanceCounts(int(n_true), int(n_pred), int(n_matched), float(iou_sum)).summary()
    return {**summarize(counts[:, :3].astype(np.int64)), "f1": buildings["f1"],
            "building_precision": buildings["precision"], "building_recall": buildings["recall"],
            "mean_iou": buildings["mean_iou"], "dice_by_source": dice_by_source(counts, dataset)}


def dice_by_source(counts: np.ndarray, dataset) -> dict[str, float]:
    """The competition Dice of each source's tiles, when the validation tiles have more than one
    source (a corpus of many places: the mean hides the place the model fails on)."""
    sources = np.array(dataset.tile_sources()) if hasattr(dataset, "tile_sources") else np.array([""])
    if len(set(sources.tolist())) < 2:
        return {}
    return {str(s): float(summarize(counts[sources == s, :3].astype(np.int64))["dice"]) for s in sorted(set(sources.tolist()))}
