"""The prediction job: a dataset of images -> submission CSV (+ optional PNG masks/overlays).

Images are decoded in DataLoader workers; equal-sized images are batched together (the
competition's test tiles are all 224x224); post-processing and RLE encoding run in a
background thread while the model works on the next batch. The CSV is written to a
temporary file and renamed at the end. Under torchrun each rank predicts its share and
rank 0 writes the merged CSV in input order.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from buildseg.data.datasets import to_tensors
from buildseg.errors import BuildsegError
from buildseg.formats import rle
from buildseg.formats.images import overlay, read_rgb, write_png
from buildseg.formats.tables import Record, write_submission
from buildseg.inference.segmenter import Segmenter
from buildseg.training.hardware import default_workers

log = logging.getLogger("buildseg")


class ImageDataset(Dataset):
    """Decodes images for prediction; with ``skip_bad`` an unreadable image becomes None."""

    def __init__(self, records: Sequence[Record], skip_bad: bool = False) -> None:
        self.records = list(records)
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        try:
            image = read_rgb(self.records[index].image_path)
        except BuildsegError as exc:
            if not self.skip_bad:
                raise BuildsegError(f"{self.records[index].img_id}: {exc}") from None
            return index, None, str(exc)
        return index, to_tensors(image, None)[0], None


def _collate(items):
    return items


@dataclass
class PredictStats:
    n: int
    n_empty: int
    skipped: list[str]
    seconds: float

    @property
    def img_per_s(self) -> float:
        return self.n / max(self.seconds, 1e-9)


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
    rank: int = 0,
    world_size: int = 1,
) -> tuple[list[str], PredictStats]:
    """RLE strings in ``records`` order (on rank 0 under torchrun) and timing statistics."""
    started = time.monotonic()
    mine = list(range(rank, len(records), world_size))
    dataset = ImageDataset([records[i] for i in mine], skip_bad)
    workers = default_workers(num_workers)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                        pin_memory=segmenter.device.type == "cuda")
    results: dict[int, str] = {}
    skipped: list[str] = []

    def finish(local_index: int, image: torch.Tensor, prob: np.ndarray, members: list[np.ndarray] | None) -> None:
        record = dataset.records[local_index]
        mask = segmenter.finish(prob, members)
        results[mine[local_index]] = rle.encode(mask)
        if masks_dir is not None:
            write_png(Path(masks_dir) / f"{record.img_id}.png", mask * 255)
        if overlays_dir is not None:
            write_png(Path(overlays_dir) / f"{record.img_id}.png", overlay(image.numpy().transpose(1, 2, 0)[:, :, :3], mask))

    bar = tqdm(total=len(dataset), desc="predict", unit="img", disable=not progress)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = []
        for items in loader:
            groups: dict[tuple[int, ...], list] = {}
            for index, image, error in items:
                if image is None:
                    skipped.append(dataset.records[index].img_id)
                    log.warning("skipping %s (written as -1): %s", dataset.records[index].img_id, error)
                    results[mine[index]] = rle.EMPTY
                    continue
                groups.setdefault(tuple(image.shape), []).append((index, image))
            for shape, group in groups.items():
                images = [img for _, img in group]
                if max(shape[-2:]) > segmenter.window:  # large images: window by window
                    for (index, image) in group:
                        prob = segmenter.predict_proba(image.numpy().transpose(1, 2, 0))
                        pending.append(pool.submit(finish, index, image, prob, None))
                    continue
                members = segmenter.member_probs(torch.stack(images))
                mean = torch.stack(members).mean(0).numpy()
                member_np = [m.numpy() for m in members] if segmenter.empty_vote else None
                for k, (index, image) in enumerate(group):
                    pending.append(pool.submit(finish, index, image, mean[k], None if member_np is None else [m[k] for m in member_np]))
            bar.update(len(items))
            bar.set_postfix(img_s=f"{bar.n / max(1e-9, time.monotonic() - started):.1f}")
            done = [f for f in pending if f.done()]
            for f in done:
                f.result()  # surface errors from the worker thread
            pending = [f for f in pending if not f.done()]
        for f in pending:
            f.result()
    bar.close()
    ordered = _gather(results, len(records), world_size)
    if out_csv is not None and rank == 0:
        write_submission(out_csv, [r.img_id for r in records], ordered)
    seconds = time.monotonic() - started
    n_empty = sum(1 for r in ordered if r == rle.EMPTY)
    return ordered, PredictStats(len(records), n_empty, skipped, seconds)


def _gather(results: dict[int, str], total: int, world_size: int) -> list[str]:
    if world_size > 1:
        import torch.distributed as dist

        parts: list[dict[int, str] | None] = [None] * world_size
        dist.all_gather_object(parts, results)
        merged: dict[int, str] = {}
        for part in parts:
            merged.update(part or {})
        results = merged
    missing = [i for i in range(total) if i not in results]
    assert not missing, f"internal: {len(missing)} images were not predicted"
    return [results[i] for i in range(total)]


def distributed_context() -> tuple[int, int]:
    """(rank, world_size) under torchrun, joining a gloo/nccl group; (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")  # object gathering only: gloo works everywhere
    return dist.get_rank(), world
