"""Random crops of the target imagery's pixels, never its labels.

TARGET is anything ``buildseg predict`` reads: a test CSV (``img_id,img_path``; other
columns such as ``mask_rle`` are never parsed), an images folder, one GeoTIFF (path, URL or
GDAL ``/vsi`` path), many scenes (a folder or list of GeoTIFFs, a STAC catalogue) or an
imagery service over an ``--aoi`` (its VRT, :func:`service_target`). Images
are read whole and cropped; GeoTIFF scenes are read window by window on the run's grid (its
GSD and bands) through the stretch prediction uses, so the student sees what ``predict``
will feed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from buildseg.errors import BuildsegError


@dataclass(frozen=True)
class TargetImage:
    path: Path


@dataclass(frozen=True)
class TargetScene:
    location: str  # path, URL or /vsi path of a GeoTIFF


def service_target(data: str | Path, service, *, folder: Path, gsd: float | None) -> str | Path:
    """``data``, or, for an imagery service, the VRT of its area (``service``: settings with
    ``aoi`` and the service flags; ``data/service_area.py``), written under ``folder``."""
    from buildseg.formats.tile_services import service_kind

    aoi = getattr(service, "aoi", None)
    if not service_kind(str(data)):
        if aoi:
            raise BuildsegError(f"--aoi applies to an imagery service; --data {data} is not one")
        return data
    if not aoi:
        raise BuildsegError(f"--data {data} is an imagery service: give the area to adapt to with --aoi FILE")
    from buildseg.data.service_area import ServiceOptions, prepare_area

    return str(prepare_area(str(data), aoi, folder, gsd=gsd, options=ServiceOptions.of(service)).vrt)


def target_sources(data: str | Path, *, stac_asset: str | None = None) -> list[TargetImage | TargetScene]:
    """The images or scenes of ``data``, in ``predict``'s order of interpretation."""
    from buildseg.data.scene_sources import is_scene_collection, list_scene_sources
    from buildseg.formats.locations import is_remote, location_suffix

    text = str(data)
    if location_suffix(text) in (".tif", ".tiff", ".vrt") and (is_remote(text) or Path(text).is_file()):
        return [TargetScene(text)]
    if is_scene_collection(text):
        return [TargetScene(str(s.location)) for s in list_scene_sources(text, stac_asset)]
    from buildseg.formats.tables import load_records

    return [TargetImage(Path(r.image_path)) for r in load_records(text, masks=False)]


class TargetCrops(torch.utils.data.Dataset):
    """``samples`` random ``crop`` x ``crop`` uint8 crops (C, H, W) per epoch: item ``k`` of
    epoch ``e`` is drawn from the seed (seed, e, k), so a resumed run sees the same crops.

    Images smaller than the crop are padded with zeros (and are mostly padding: fine for
    pseudo-labels, which the loss weights per pixel). Unreadable images raise the
    library's clear error naming the file.
    """

    def __init__(self, sources: Sequence[TargetImage | TargetScene], *, crop: int, samples: int, seed: int,
                 in_chans: int, gsd: float | None = None, bands: list[int] | None = None) -> None:
        if not sources:
            raise BuildsegError("the target has no images: give a CSV/folder of images or GeoTIFF scenes")
        self.sources, self.crop, self.samples, self.seed = list(sources), int(crop), int(samples), int(seed)
        self.in_chans, self.gsd = in_chans, gsd
        self.bands = bands or list(range(1, in_chans + 1))
        self.epoch = 0
        self._scenes: dict[str, tuple] = {}  # location -> (src, grid, stretch), opened once per process
        self._last: tuple[Path, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> torch.Tensor:
        seed = int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0])
        rng = np.random.default_rng(seed)
        source = self.sources[int(rng.integers(len(self.sources)))]
        image = self._scene_crop(source, rng) if isinstance(source, TargetScene) else self._image_crop(source, rng)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))

    def _image_crop(self, source: TargetImage, rng: np.random.Generator) -> np.ndarray:
        from buildseg.formats.images import read_image

        if self._last is None or self._last[0] != source.path:
            self._last = (source.path, read_image(source.path, self.in_chans))
        full = self._last[1]
        c = self.crop
        y = int(rng.integers(0, max(0, full.shape[0] - c) + 1))
        x = int(rng.integers(0, max(0, full.shape[1] - c) + 1))
        window = full[y : y + c, x : x + c]
        out = np.zeros((c, c, full.shape[2]), dtype=np.uint8)
        out[: window.shape[0], : window.shape[1]] = window
        return out

    def _scene_crop(self, source: TargetScene, rng: np.random.Generator) -> np.ndarray:
        from buildseg.formats.rasters import check_bands, open_raster, raster_stretch, read_window, scene_grid

        if source.location not in self._scenes:
            src = open_raster(source.location)
            check_bands(src, self.bands, source.location)
            self._scenes[source.location] = (src, scene_grid(src, self.gsd, source.location),
                                             raster_stretch(src, self.bands))
        src, grid, stretch = self._scenes[source.location]
        c = self.crop
        row = int(rng.integers(0, max(0, grid.height - c) + 1))
        col = int(rng.integers(0, max(0, grid.width - c) + 1))
        image, _ = read_window(src, self.bands, grid, row, col, c, c, stretch, fill_is_nodata=False)
        return image

    def __getstate__(self) -> dict:  # raster handles do not travel to loader workers
        return {**self.__dict__, "_scenes": {}, "_last": None}
