"""Fit a trained network's per-image heads (models/image_heads.py) on labelled tiles.

The network stays frozen: one forward pass per crop gives the pooled vector, and each head is a
small perceptron fitted on those vectors in seconds. The crops are drawn to teach what the
heads are for:

* **tile** (does the crop hold a building): crops of every tile, a share of them placed where
  the tile's mask is empty, so each source contributes its own building-free ground (fields,
  water, bare soil, roads) as negatives, and every source weighs the same in the fit whatever
  its number of tiles;
* **scale** (log2 of the crop's pixel size over the model's): tiles of known GSD resampled by a
  random factor, so the head sees each place at many pixel sizes. Enlarging (up to 8x) stands
  in for drone imagery, which few sources have: it halved the error on held-out drone places
  although an enlarged tile is blurrier than a real fine one (benchmarks/README.md). Tiles
  without a GSD teach the tile head only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch

from buildseg.errors import BuildsegError
from buildseg.formats.images import read_image
from buildseg.formats.tables import Record
from buildseg.models.card import ModelCard
from buildseg.models.factory import SegmentationModel, build_model, without_image_heads
from buildseg.models.image_heads import HIDDEN, ImageHeads, check_names, column_groups

log = logging.getLogger("buildseg")

CROP = 224  # the competition's test tile
EMPTY_SHARE = 0.35  # of the crops, placed on building-free ground where the tile has any
MIN_ZOOM = 0.125  # a scale crop is enlarged at most 8x (0.8 was measured against it: benchmarks/image_heads.py)
MAX_SHRINK = 8.0  # the most a scale crop is shrunk
MIN_SIDE = 64  # px: smaller crops are not drawn
GSD_RANGE = (0.03, 4.0)  # metres per pixel the scale crops are drawn within
TILE_INPUTS = "map"  # the tile head reads the footprint map's statistics only: encoder features made it worse on
# held-out places (benchmarks/image_heads.py); the scale head reads every encoder stage and not the map (0.60 against
# 0.61 log2 with it, the same there)


@dataclass
class HeadCrops:
    """Crops and what each head should say about them."""

    images: list[np.ndarray]  # HxWxC uint8
    has_building: np.ndarray  # (N,) bool
    log2_scale: np.ndarray  # (N,) float: log2(crop GSD / model GSD); NaN where the tile's GSD is unknown
    group: np.ndarray  # (N,) the crop's source (for balanced weights and held-out folds)


def draw_crops(records: Sequence[Record], *, model_gsd: float, per_tile: int, seed: int,
               groups: Sequence[str] | None = None, crop: int = CROP, min_zoom: float = MIN_ZOOM) -> HeadCrops:
    """``per_tile`` crops of each record: about half at the tile's own pixel size, the rest
    (tiles of known GSD) resampled by a random factor (enlarged at most 1/``min_zoom``);
    ``EMPTY_SHARE`` placed on empty ground."""
    rng = np.random.default_rng(seed)
    images, has, scale, group = [], [], [], []
    for k, record in enumerate(records):
        image = read_image(record.image_path)
        mask = record.load_mask(image.shape[:2]).astype(np.uint8)
        for _ in range(per_tile):
            factor = _shrink_factor(rng, record.gsd, min_zoom)
            im, ms = _resized(image, mask, factor)
            if min(im.shape[:2]) < MIN_SIDE:
                continue
            y, x, side = _place(rng, ms, crop)
            im, ms = _d4(rng, im[y:y + side, x:x + side], ms[y:y + side, x:x + side])
            images.append(np.ascontiguousarray(im))
            has.append(bool(ms.any()))
            scale.append(math.log2(record.gsd * factor / model_gsd) if record.gsd else math.nan)
            group.append(groups[k] if groups is not None else "all")
    return HeadCrops(images, np.array(has), np.array(scale, dtype=np.float64), np.array(group))


def _shrink_factor(rng: np.random.Generator, gsd: float | None, min_zoom: float) -> float:
    if not gsd or rng.random() < 0.5:
        return 1.0
    low = max(min_zoom, GSD_RANGE[0] / gsd)
    high = min(MAX_SHRINK, GSD_RANGE[1] / gsd)
    return 1.0 if high <= low else float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _resized(image: np.ndarray, mask: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    if factor == 1.0:
        return image, mask
    h, w = image.shape[:2]
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    interpolation = cv2.INTER_AREA if factor > 1 else cv2.INTER_LINEAR
    im = cv2.resize(image, size, interpolation=interpolation)
    ms = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA) >= 0.5
    return (im[:, :, None] if im.ndim == 2 else im), ms.astype(np.uint8)


def _place(rng: np.random.Generator, mask: np.ndarray, crop: int) -> tuple[int, int, int]:
    """(y, x, side) of a square crop: on empty ground for ``EMPTY_SHARE`` of the draws where the
    tile has some (ten tries), else anywhere."""
    h, w = mask.shape
    side = min(crop, h, w)
    tries = 10 if rng.random() < EMPTY_SHARE else 1
    for _ in range(tries):
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        if not mask[y:y + side, x:x + side].any():
            break
    return y, x, side


def _d4(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    turns = int(rng.integers(0, 4))
    image, mask = np.rot90(image, turns), np.rot90(mask, turns)
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return image, mask


def with_heads(model: SegmentationModel, names: Sequence[str]) -> SegmentationModel:
    """A copy of ``model`` (same weights, eval mode) with empty heads ``names`` to fit."""
    if model.card.arch != "unet":
        raise BuildsegError(f"per-image heads need arch unet, not {model.card.arch}")
    card = ModelCard.from_dict({**model.card.to_dict(), "image_outputs": check_names(names)})
    new = build_model(card, weights="none")
    missing, unexpected = new.load_state_dict(without_image_heads(model).state_dict(), strict=False)
    if unexpected or any(".image_heads." not in k for k in missing):
        raise BuildsegError(f"heads: the network does not rebuild from its card ({(unexpected or missing)[:3]})")
    return new.eval()


@torch.no_grad()
def pooled_vectors(model: SegmentationModel, images: Sequence[np.ndarray], *, batch: int = 16,
                   footprints: list | None = None) -> np.ndarray:
    """(N, D) pooled vectors of ``images`` (fp32): what the heads read. ``model`` has heads.
    ``footprints``, a list, receives each image's footprint probability map on the way."""
    heads = model.net.image_heads
    if heads is None:
        raise BuildsegError("pooled_vectors needs a model with heads: use with_heads(model, names)")
    seen: list[torch.Tensor] = []
    hook = heads.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().float().cpu()))
    out = [None] * len(images)
    maps = [None] * len(images)
    try:
        by_shape: dict[tuple, list[int]] = {}
        for k, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(k)
        for indices in by_shape.values():
            for start in range(0, len(indices), batch):
                part = indices[start:start + batch]
                x = torch.from_numpy(np.stack([images[k] for k in part])).permute(0, 3, 1, 2).float()
                seen.clear()
                probs = torch.sigmoid(model(x)[:, 0].float()).numpy()
                for k, row, prob in zip(part, seen[0], probs):
                    out[k], maps[k] = row.numpy(), prob
    finally:
        hook.remove()
    if footprints is not None:
        footprints.extend(maps)
    return np.stack(out)


def fit_head(vectors: np.ndarray, target: np.ndarray, *, kind: str, weights: np.ndarray | None = None,
             columns: np.ndarray | None = None, seed: int = 0, steps: int = 400, decay: float = 1e-3,
             hidden: int = HIDDEN) -> dict[str, torch.Tensor]:
    """One head's tensors, fitted full-batch (Adam): ``kind`` tile is a logistic output
    (binary cross-entropy), scale a regression (Huber loss, in log2 units). ``columns`` (bool,
    one per vector entry) restricts the head to those inputs; the others get zero weights."""
    keep = ~np.isnan(target)
    if keep.sum() < 8:
        raise BuildsegError(f"the {kind} head needs at least 8 crops with a target, got {int(keep.sum())}")
    used = np.ones(vectors.shape[1], dtype=bool) if columns is None else np.asarray(columns, dtype=bool)
    fitted = _fit(vectors[keep][:, used], target[keep], weights=None if weights is None else weights[keep], kind=kind,
                  seed=seed, steps=steps, decay=decay, hidden=hidden)
    full = {"mean": torch.zeros(len(used)), "std": torch.ones(len(used)), "w1": torch.zeros(hidden, len(used)),
            "b1": fitted["b1"], "w2": fitted["w2"], "b2": fitted["b2"]}
    index = torch.from_numpy(np.flatnonzero(used))
    full["mean"][index], full["std"][index], full["w1"][:, index] = fitted["mean"], fitted["std"], fitted["w1"]
    return full


def _fit(vectors: np.ndarray, target: np.ndarray, *, weights: np.ndarray | None, kind: str, seed: int, steps: int,
         decay: float, hidden: int) -> dict[str, torch.Tensor]:
    z = torch.from_numpy(vectors).float()
    y = torch.from_numpy(target.astype(np.float32))
    w = torch.from_numpy((np.ones(len(target)) if weights is None else weights).astype(np.float32))
    w = w / w.mean()
    mean, std = z.mean(0), z.std(0).clamp(min=1e-4)
    generator = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(hidden, z.shape[1], generator=generator) / math.sqrt(z.shape[1])).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = (torch.randn(1, hidden, generator=generator) / math.sqrt(hidden)).requires_grad_()
    b2 = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.Adam([w1, b1, w2, b2], lr=1e-2, weight_decay=0.0)
    zs = (z - mean) / std
    for _ in range(steps):
        optimiser.zero_grad()
        out = (torch.relu(zs @ w1.T + b1) @ w2.T + b2)[:, 0]
        if kind == "tile":
            loss = torch.nn.functional.binary_cross_entropy_with_logits(out, y, weight=w)
        else:
            loss = (torch.nn.functional.huber_loss(out, y, reduction="none", delta=0.5) * w).mean()
        loss = loss + decay * (w1.square().sum() + w2.square().sum())
        loss.backward()
        optimiser.step()
    return {"mean": mean, "std": std, "w1": w1.detach(), "b1": b1.detach(), "w2": w2.detach(), "b2": b2.detach()}


def balanced_weights(group: np.ndarray, has_building: np.ndarray | None = None) -> np.ndarray:
    """Weights that give every group (source) the same total, and within it, with
    ``has_building``, crops with and without buildings the same total."""
    weights = np.zeros(len(group))
    for name in np.unique(group):
        members = group == name
        if has_building is None:
            weights[members] = 1.0 / members.sum()
            continue
        for value in (True, False):
            part = members & (has_building == value)
            if part.any():
                weights[part] = 0.5 / part.sum()
    return weights * len(group) / weights.sum()


def fit_heads(model: SegmentationModel, crops: HeadCrops, names: Sequence[str], *, seed: int = 0) -> SegmentationModel:
    """``model`` with heads ``names`` fitted on ``crops`` (a new model; ``model`` is unchanged)."""
    fitted = with_heads(model, names)
    vectors = pooled_vectors(fitted, crops.images)
    heads: ImageHeads = fitted.net.image_heads
    groups = column_groups(fitted.net.encoder.feature_info.channels())
    for name in heads.names:
        columns = None
        if name == "tile":
            target = crops.has_building.astype(np.float64)
            weights = balanced_weights(crops.group, crops.has_building)
            columns = np.zeros(vectors.shape[1], dtype=bool)
            columns[groups[TILE_INPUTS]] = True
        else:
            target, weights = crops.log2_scale, balanced_weights(crops.group)
            columns = np.ones(vectors.shape[1], dtype=bool)
            columns[groups["map"]] = False
        heads.set_head(name, fit_head(vectors, target, kind=name, weights=weights, columns=columns, seed=seed))
        log.info("head %s fitted on %d crops", name, int((~np.isnan(target)).sum()))
    return fitted


def heads_payload(model: SegmentationModel, base: dict, *, tile_threshold: float | None = None) -> dict:
    """A checkpoint payload of ``model`` (with its fitted heads) that keeps everything else of
    ``base`` (the checkpoint the network came from); ``tile_threshold`` joins its post-processing."""
    payload = {**base, "model_card": model.card.to_dict(), "model": model.state_dict()}
    if tile_threshold is not None:
        payload["postprocess"] = {**(base.get("postprocess") or {}), "tile_threshold": float(tile_threshold)}
    return payload
