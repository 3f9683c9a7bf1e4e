"""The prediction job: a dataset of images -> submission CSV (+ optional PNG masks/overlays).

Images are decoded in DataLoader workers; equal-sized images are batched together (the
competition's test tiles are all 224x224); post-processing and RLE encoding run in a
background thread while the model works on the next batch. The CSV is written to a
temporary file and renamed at the end. Under torchrun each rank predicts its share and
rank 0 writes the merged CSV in input order; each rank predicts on its own GPU
(``cuda:LOCAL_RANK``, bound by :func:`buildseg.distributed.init_distributed`).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from buildseg.data.datasets import to_tensors
from buildseg.distributed import SINGLE_PROCESS, DistInfo, all_gather_object
from buildseg.errors import BuildsegError
from buildseg.formats import rle
from buildseg.formats.images import overlay, read_image, write_png
from buildseg.formats.tables import Record, write_submission
from buildseg.inference.core.segmenter import Segmenter
from buildseg.inference.jobs.scale_estimate import ScaleReport, log2_scale, resample_factor
from buildseg.inference.jobs.tile_layers import TileLayer
from buildseg.models.factory import MIN_SIZE
from buildseg.runtime.device import cpu_predict_workers, default_workers

log = logging.getLogger("buildseg")


class ImageDataset(Dataset):
    """Decodes images for prediction; with ``skip_bad`` an unreadable image becomes None.

    Tiles of known GSD (the CSV's ``gsd`` column, else ``tile_gsd``: ``predict --gsd``) are
    resampled to the model's GSD (``model_gsd``), as training saw them; each item carries the
    tile's own (height, width), to which its probabilities are restored."""

    def __init__(self, records: Sequence[Record], *, skip_bad: bool = False, in_chans: int = 3,
                 model_gsd: float | None = None, tile_gsd: float | None = None) -> None:
        self.records = list(records)
        self.skip_bad = skip_bad
        self.in_chans = in_chans
        self.model_gsd, self.tile_gsd = model_gsd, tile_gsd

    def __len__(self) -> int:
        return len(self.records)

    def gsd_known(self, record: Record) -> bool:
        return bool(record.gsd or self.tile_gsd)

    def scale(self, record: Record) -> float:
        """Model pixels per tile pixel (1: as it is)."""
        gsd = record.gsd or self.tile_gsd
        return gsd / self.model_gsd if gsd and self.model_gsd else 1.0

    def __getitem__(self, index: int):
        try:
            image = read_image(self.records[index].image_path, self.in_chans)
        except BuildsegError as exc:
            if not self.skip_bad:
                raise BuildsegError(f"{self.records[index].img_id}: {exc}") from None
            return index, None, str(exc), None
        shape = image.shape[:2]
        scale = self.scale(self.records[index])
        if abs(scale - 1.0) > 1e-6:
            image = resample(image, (max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))))
        return index, to_tensors(image, None)[0], None, shape


def resample(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) image at ``size`` (height, width): area averaging to shrink, bilinear to grow
    (the rule training's tiles of known GSD follow)."""
    import cv2

    shrink = size[0] < image.shape[0]
    out = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return out[:, :, None] if out.ndim == 2 else out


def _restored(maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Probabilities ((K,) h, w) back at the tile's own (height, width), bilinear."""
    if tuple(maps.shape[-2:]) == tuple(shape):
        return maps
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32)).reshape(1, -1, *maps.shape[-2:])
    out = torch.nn.functional.interpolate(tensor, size=tuple(shape), mode="bilinear", align_corners=False)
    return out.reshape(*maps.shape[:-2], *shape).numpy()


def _collate(items):
    return items


@dataclass
class PredictStats:
    n: int
    n_empty: int
    skipped: list[str]
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)  # seconds per pipeline stage (see profile_table)
    notes: list[str] = field(default_factory=list)  # lines for the user (the pixel-size estimate)

    @property
    def img_per_s(self) -> float:
        return self.n / max(self.seconds, 1e-9)

    def profile_table(self) -> str:
        """Per-stage seconds, share of the wall time and ms per image: where a slow run spends
        its time. The main thread waits for decoded images, runs the model and waits for the
        post-processing thread at the end; post-processing + RLE overlap the model, so its
        share is of the wall time but not part of the main thread's sum."""
        lines = [f"{'stage':<40} {'seconds':>9} {'% of wall':>9} {'ms/img':>8}"]
        for name, seconds in self.stages.items():
            lines.append(f"{name:<40} {seconds:>9.2f} {100 * seconds / max(self.seconds, 1e-9):>8.1f}% "
                         f"{1000 * seconds / max(self.n, 1):>8.2f}")
        lines.append(f"{'wall (' + str(self.n) + ' images)':<40} {self.seconds:>9.2f} {100.0:>8.1f}% "
                     f"{1000 * self.seconds / max(self.n, 1):>8.2f}")
        return "\n".join(lines)


def predict_records(
    segmenter: Segmenter,
    records: Sequence[Record],
    out_csv: str | Path | None,
    batch_size: int = 32,
    num_workers: int = -1,
    masks_dir: str | Path | None = None,
    overlays_dir: str | Path | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    dist: DistInfo = SINGLE_PROCESS,
    layer: TileLayer | None = None,
    tile_gsd: float | None = None,
    gsd_estimate: bool = False,
) -> tuple[list[str], PredictStats]:
    """RLE strings in ``records`` order (on rank 0 under torchrun) and timing statistics.

    ``layer``: also write the buildings as a tile layer (COCO JSON or a SpaceNet CSV,
    ``tile_layers.py``) at the layer's path. One process only. ``tile_gsd``: metres per pixel
    of tiles whose record has none (``ImageDataset``: resampled to the model's GSD and back).
    ``gsd_estimate``: tiles of unknown GSD are resampled by the model's scale head where it has
    one (``scale_estimate.py``; the estimate is reported either way).

    On any failure the PNG masks and overlays this call wrote are removed again and no CSV
    is written, so a failed run leaves nothing half-done behind.
    """
    written: list[Path] = []
    try:
        if layer is not None and dist.world_size > 1:
            raise BuildsegError("--format coco/spacenet runs in one process; drop torchrun for it")
        ordered, stats = _predict(segmenter, records, out_csv, batch_size, num_workers, masks_dir, overlays_dir,
                                  skip_bad, progress, dist, written, layer, tile_gsd, gsd_estimate)
        if layer is not None:
            layer.write(records)
        return ordered, stats
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


STAGES = ("wait for decoded images (main thread)", "model (main thread)", "post-processing + RLE (background thread)",
          "wait for post-processing (main thread)", "write CSV")  # what --profile times


def _predict(segmenter, records, out_csv, batch_size, num_workers, masks_dir, overlays_dir, skip_bad, progress,
             dist: DistInfo, written: list[Path], layer: TileLayer | None = None,
             tile_gsd: float | None = None, gsd_estimate: bool = False) -> tuple[list[str], PredictStats]:
    started = time.monotonic()
    mine = list(range(dist.rank, len(records), dist.world_size))
    dataset, loader = _loader(segmenter, [records[i] for i in mine], batch_size=batch_size, num_workers=num_workers,
                              skip_bad=skip_bad, tile_gsd=tile_gsd)
    results, skipped = {}, []
    rules, bar = segmenter.rules, tqdm(total=len(dataset), desc="predict", unit="img", disable=not progress)
    scales = ScaleReport(segmenter.input.get("gsd"), act=gsd_estimate) if "scale" in segmenter.targets else None
    stages = dict.fromkeys(STAGES, 0.0)

    def finish(local_index: int, image: torch.Tensor, prob: np.ndarray, members: list[np.ndarray] | None) -> None:
        began = time.monotonic()
        try:
            mask = rules(prob, members)
            results[mine[local_index]] = rle.encode(mask)
            if layer is not None:
                layer.add(mine[local_index], mask, prob[0] if prob.ndim == 3 else prob)
            _write_pngs(dataset.records[local_index].img_id, image, mask, masks_dir=masks_dir,
                        overlays_dir=overlays_dir, written=written)
        finally:
            stages["post-processing + RLE (background thread)"] += time.monotonic() - began

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = []
        batches = iter(loader)
        while True:
            began = time.monotonic()
            items = next(batches, None)
            stages["wait for decoded images (main thread)"] += time.monotonic() - began
            if items is None:
                break
            began = time.monotonic()
            for index, image, error, _ in items:
                if image is None:
                    skipped.append(dataset.records[index].img_id)
                    log.warning("skipping %s (written as -1): %s", dataset.records[index].img_id, error)
                    results[mine[index]] = rle.EMPTY
            pending += [pool.submit(finish, index, image, *maps)
                        for index, image, maps in _predicted(segmenter, items, dataset, scales)]
            stages["model (main thread)"] += time.monotonic() - began
            bar.update(len(items))
            bar.set_postfix(img_s=f"{bar.n / max(1e-9, time.monotonic() - started):.1f}")
            for f in [f for f in pending if f.done()]:
                f.result()  # surface errors from the worker thread
            pending = [f for f in pending if not f.done()]
        began = time.monotonic()
        for f in pending:
            f.result()
        stages["wait for post-processing (main thread)"] += time.monotonic() - began
    bar.close()
    ordered = _gather(results, len(records), dist)
    began = time.monotonic()
    if out_csv is not None and dist.is_main:
        write_submission(out_csv, [r.img_id for r in records], ordered)
    stages["write CSV"] = time.monotonic() - began
    n_empty = sum(1 for r in ordered if r == rle.EMPTY)
    notes = [scales.line()] if scales and scales.line() else []
    return ordered, PredictStats(len(records), n_empty, skipped, time.monotonic() - started, stages, notes)


def _loader(segmenter, records, *, batch_size: int, num_workers: int, skip_bad: bool, tile_gsd: float | None):
    """(this process's dataset, its DataLoader): images decoded in workers, resampled to the
    model's GSD where the tile's is known."""
    dataset = ImageDataset(records, skip_bad=skip_bad, in_chans=segmenter.in_chans, model_gsd=segmenter.input.get("gsd"),
                           tile_gsd=tile_gsd)
    workers = default_workers(num_workers) if segmenter.device.type == "cuda" else cpu_predict_workers(num_workers)
    return dataset, DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                               pin_memory=segmenter.device.type == "cuda")


@dataclass
class _Predicted:
    """One tile of a batch: the image its maps are of, and the tile's own size to restore."""

    index: int
    image: torch.Tensor
    shape: tuple[int, int]
    prob: np.ndarray
    members: list[np.ndarray] | None


def _predicted(segmenter, items, dataset: ImageDataset, scales: ScaleReport | None):
    """(index, image, (probabilities, members)) of a batch's readable images, images of one
    shape predicted together (a large image is windowed inside ``probabilities``); with
    ``scales``, the tiles of unknown GSD that the model estimates far from its own are predicted
    again at their estimated sizes, tiles of one size together (``scale_estimate.py``)."""
    groups: dict[tuple[int, ...], list] = {}
    for index, image, _, shape in items:
        if image is not None:
            groups.setdefault(tuple(image.shape), []).append((index, image, shape))
    for group in groups.values():
        maps = segmenter.probabilities(torch.stack([img for _, img, _ in group]))
        done = [_Predicted(index, image, shape, *maps.image(k)) for k, (index, image, shape) in enumerate(group)]
        if scales is not None:
            _at_estimated_scales(segmenter, [t for t in done if not dataset.gsd_known(dataset.records[t.index])], scales)
        for t in done:
            prob, members, image = t.prob, t.members, t.image
            if tuple(image.shape[-2:]) != tuple(t.shape):  # resampled to the model's GSD: back to the tile's size
                prob = _restored(prob, t.shape)
                members = None if members is None else [_restored(m, t.shape) for m in members]
                image = torch.from_numpy(resample(image.numpy().transpose(1, 2, 0), t.shape).transpose(2, 0, 1).copy())
            yield t.index, image, (prob, members)


def _at_estimated_scales(segmenter, tiles: list[_Predicted], scales: ScaleReport) -> None:
    """Each tile's maps replaced by those at the pixel size its first pass estimates (kept
    inside the dead band), with the image they are of; the resampled tiles of one size go
    through the model as one batch."""
    again: dict[tuple[int, int], list[_Predicted]] = {}
    for t in tiles:
        estimate = log2_scale(t.prob, segmenter.targets)
        if estimate is None:
            continue
        factor = resample_factor(estimate) if scales.act else 1.0
        scales.add(estimate, factor)
        if factor == 1.0:
            continue
        h, w = t.image.shape[-2:]
        size = (max(MIN_SIZE, round(h * factor)), max(MIN_SIZE, round(w * factor)))
        t.image = torch.from_numpy(np.ascontiguousarray(resample(t.image.numpy().transpose(1, 2, 0), size).transpose(2, 0, 1)))
        again.setdefault(size, []).append(t)
    for group in again.values():
        maps = segmenter.probabilities(torch.stack([t.image for t in group]))
        for k, t in enumerate(group):
            t.prob, t.members = maps.image(k)


def _write_pngs(img_id: str, image: torch.Tensor, mask: np.ndarray, *, masks_dir, overlays_dir, written: list[Path]):
    """The tile's mask PNG and overlay PNG where asked for (each path noted in ``written``)."""
    if masks_dir is not None:
        written.append(Path(masks_dir) / f"{img_id}.png")
        write_png(written[-1], mask * 255)
    if overlays_dir is not None:
        written.append(Path(overlays_dir) / f"{img_id}.png")
        rgb = image.numpy().transpose(1, 2, 0)
        rgb = rgb[:, :, :3] if rgb.shape[2] >= 3 else np.repeat(rgb[:, :, :1], 3, axis=2)
        write_png(written[-1], overlay(np.ascontiguousarray(rgb), mask))


def _gather(results: dict[int, str], total: int, dist: DistInfo) -> list[str]:
    merged: dict[int, str] = {}
    for part in all_gather_object(results, dist):
        merged.update(part or {})
    missing = [i for i in range(total) if i not in merged]
    assert not missing, f"internal: {len(missing)} images were not predicted"
    return [merged[i] for i in range(total)]
