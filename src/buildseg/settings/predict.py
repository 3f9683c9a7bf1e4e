"""``buildseg predict``: every flag, its default and which flags combine, for the three kinds
of input (tiles: a CSV or an images folder; one GeoTIFF; many scenes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from buildseg.errors import BuildsegError
from buildseg.settings.fields import Settings, model_setting, setting
from buildseg.settings.inference import (
    BLOCK,
    LAYER_FORMATS,
    OPENVINO_MODES,
    OVERLAP,
    TILE_FORMATS,
    WINDOW,
    EngineSettings,
)

TILES, GEOTIFF, SCENES, SERVICE = "tiles", "geotiff", "scenes", "service"  # the kinds of --data
MAX_CONNECTIONS = 2  # a tile service's concurrent requests: modest, a shared service is not ours
MAX_TILES = 100_000  # a tile service's AOI window: 6.6 Gpx, about 1,600 km2 at 0.5 m (hours on a CPU); more by --max-tiles
PIECE_MEGAPIXELS = 16.0  # a tile service's AOI: pieces of about 4096 x 4096 px, each one scene of the run
RUNNERS = ("local", "ray")
MATCH_IOU = 0.3  # --existing: one building in both layers (outlines from imagery and from mappers rarely agree closer)
MATCH_OVERLAP = 0.5  # --existing: or at least half of a footprint under the other layer's buildings
MAX_RETRIES = 2  # --runner ray: times a dead worker's scene is retried


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` with 0 <= I < N."""
    try:
        first, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"{text!r} is not I/N (e.g. 3/10: the 4th of 10 shards, 0-based)") from None
    if count < 1 or not 0 <= first < count:
        raise ValueError(f"{text!r}: need 0 <= I < N (I is 0-based; with SLURM use --array=0-{max(count, 1) - 1})")
    return first, count


def parse_bands(text: str) -> list[int]:
    try:
        bands = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{text!r} is not a list of 1-based band numbers, e.g. 1,2,3") from None
    if not bands or min(bands) < 1:
        raise ValueError(f"{text!r} is not a list of 1-based band numbers, e.g. 1,2,3")
    return bands


@dataclass(frozen=True)
class ServiceSettings(Settings):
    """How an imagery service is read over an area: the flags ``predict`` and ``adapt`` share
    (``train`` has them as data.* keys)."""
    aoi: str | None = setting(None, "imagery service input (XYZ/TMS template, WMTS or WMS): the area to map, any "
                              "vector file in any CRS, one or many polygons")
    zoom: int | None = setting(None, "imagery service: the zoom level (XYZ and WMS: the Web Mercator zoom; WMTS: the "
                               "tile matrix, 0 the coarsest; default: the one whose pixel size is closest to the "
                               "model's training GSD at the AOI's latitude)", low=0, high=23)
    layer: str | None = setting(None, "WMS (required) or WMTS (when the service has several): the layer to read")
    tms: bool = setting(False, "tile service: TMS row order (rows counted from the south; same as {-y})")
    tile_cache: str | None = setting(None, "tile service: GDAL's tile cache folder (default: under the user cache)")
    max_connections: int = setting(MAX_CONNECTIONS, "tile service: concurrent tile requests", low=1, high=32)
    max_tiles: int = setting(MAX_TILES, "tile service: the most 256 px tiles the AOI's window may cover at the zoom "
                             "(checked before any file is written or tile fetched); raise it for a larger area",
                             low=1, metavar="N")


@dataclass(frozen=True)
class PredictSettings(EngineSettings, ServiceSettings):
    COMMAND = "predict"

    checkpoint: list[str] | None = setting(None, "checkpoint .pt or run folder; repeat to ensemble (required except "
                                           "with --merge)", repeat=True)
    model: str | None = model_setting()
    data: str | None = setting(None, "test CSV (img_id,img_path) or folder with images/; a GeoTIFF (a path, an https:// "
                               "or s3:// URL or a GDAL /vsi path); or many scenes: a folder of GeoTIFFs, a CSV with a "
                               "'path' column (paths or URLs), or a STAC ItemCollection/Catalog JSON; or an imagery "
                               "service with --aoi: an XYZ/TMS URL template https://host/{z}/{x}/{y}.png, a WMTS "
                               "GetCapabilities URL or a WMS URL (with --layer)")
    out: str | None = setting(None, "submission CSV to write (GeoTIFF input: the mask COG; many scenes: the output "
                              "folder)")
    stac_asset: str | None = setting(None, "STAC input: the item asset holding the image (default: the item's only "
                                     "GeoTIFF asset, else 'visual')")
    shard: tuple[int, int] | None = setting(None, "many scenes: predict only every N-th scene from the I-th (0-based; an "
                                            "array job's index, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT); the "
                                            "last shard to finish merges", parse=parse_shard, metavar="I/N")
    merge: str | None = setting(None, "only merge OUT_DIR's finished scenes into its layer and manifest (after array "
                                "jobs); no model needed", metavar="OUT_DIR")
    runner: str = setting("local", "many scenes: local (this process, or torchrun's ranks) or ray (a pool of Ray "
                          "workers, one model each, scenes handed out largest first, a dead worker's scene retried)",
                          choices=RUNNERS)
    ray_address: str | None = setting(None, "--runner ray: the cluster to join (default: start a local Ray for the run)")
    ray_workers: int | None = setting(None, "--runner ray: workers (default: one per GPU, else one per 2 CPU cores of "
                                      "the cluster)", low=1)
    max_retries: int = setting(MAX_RETRIES, "--runner ray: times a scene is retried when its worker dies", low=0)
    ray_split_megapixels: float | None = setting(None, "--runner ray: cut scenes larger than this into pieces of about "
                                                 "this size, predicted on several workers and joined as block borders "
                                                 "are (default: auto, scenes over a quarter of one worker's share of all "
                                                 "the pixels, in 64 Mpx pieces; 0: never split)", low=0, metavar="MPX")
    threshold: float | None = setting(None, "probability threshold (default: the checkpoint's, else 0.5)", low=0,
                                      high=1, low_open=True, high_open=True)
    min_area: int | None = setting(None, "remove components smaller than this many pixels", low=0)
    ds_ensemble: bool | None = setting(None, "average all deep-supervision heads (default: the checkpoint's setting)")
    empty_vote: int = setting(0, "tile is empty if at least K ensemble members see nothing (0: off; K <= number of "
                              "checkpoints)", low=0)
    window: int = setting(WINDOW, "sliding-window size for larger images", low=32)
    overlap: float = setting(OVERLAP, "sliding-window overlap", low=0, high=1, high_open=True)
    num_workers: int = setting(-1, "image-decoding workers (-1: from the CPU count)", low=-1)
    masks_dir: str | None = setting(None, "also write PNG masks here")
    overlays_dir: str | None = setting(None, "also write overlay PNGs here")
    skip_bad: bool = setting(False, "write -1 for unreadable images instead of stopping")
    threads: int | None = setting(None, "the engine's compute threads (default: the engine's own, all cores this "
                                  "process may use)", low=1)
    engine_mode: str = setting("auto", "openvino: latency (the whole batch in one request on every core) or throughput "
                               "(the batch split over OpenVINO's streams, all in flight); auto: the one measured faster "
                               "on this many cores, latency where not measured", choices=OPENVINO_MODES)
    profile: bool = setting(False, "print seconds per pipeline stage (decode wait, model, post-processing, CSV) and the "
                            "engine's threads")
    footprints: str | None = setting(None, "GeoTIFF input: also write building footprints here; the format follows "
                                     "the extension: .gpkg, .parquet, .fgb, .geojson")
    geojson: str | None = setting(None, "GeoTIFF input: footprints as GeoJSON (same as --footprints FILE.geojson)")
    format: str | None = setting(None, "tiles (CSV/folder input): csv (the submission, default), spacenet (SpaceNet's "
                                 "proposal CSV) or coco (COCO instance JSON at --out); many scenes: the footprint "
                                 "layer format (default gpkg)", choices=(*TILE_FORMATS, *LAYER_FORMATS))
    block: int = setting(BLOCK, "GeoTIFF input: pixels per processing block", low=64)
    simplify: float | None = setting(None, "GeoTIFF input: footprint simplification tolerance in CRS units (default: "
                                     "one pixel; 0: off)", low=0)
    allow_gaps: bool = setting(False, "tile service: a tile that still fails after GDAL's retries is a gap (never a "
                               "building; listed in manifest.json under areas, and counted) instead of stopping the "
                               "run")
    piece_megapixels: float = setting(PIECE_MEGAPIXELS, "tile service: the AOI is cut into pieces of whole blocks of "
                                      "about this size, each a scene of a many-scene run (done-records, resume, "
                                      "--shard, --runner ray, --merge); the layer does not depend on it", low=0,
                                      low_open=True, metavar="MPX")
    existing: str | None = setting(None, "GeoTIFF or many scenes: buildings already mapped (any vector file, any CRS, "
                                   "e.g. an OpenStreetMap extract); each footprint gets status new|mapped, the existing "
                                   "ones nothing supports go to a separate unconfirmed layer, and the new ones to a "
                                   "GeoJSON for editors")
    existing_layer: str | None = setting(None, "--existing: the layer to read from a multi-layer file (GeoPackage)")
    match_iou: float = setting(MATCH_IOU, "--existing: a footprint is mapped when an existing building has at least "
                               "this IoU with it", low=0, high=1, low_open=True)
    match_overlap: float = setting(MATCH_OVERLAP, "--existing: ... or when existing buildings cover at least this share "
                                   "of its area", low=0, high=1, low_open=True)
    only_new: bool = setting(False, "--existing: write only the new footprints to the layer")
    min_area_m2: float = setting(0.0, "GeoTIFF input: drop footprints smaller than this ground area", low=0)
    regularize: bool = setting(False, "GeoTIFF input: right-angle footprints (buildingregulariser)")
    gsd: float | None = setting(None, "GeoTIFF input: metres per pixel to predict at (default: the GSD the model was "
                                "trained at); CSV/folder tiles, which carry none: the tiles' own metres per pixel, "
                                "so they are resampled to the model's GSD and their masks back to the tiles' size (a "
                                "CSV's gsd column does the same per tile)", low=0, low_open=True)
    gsd_estimate: bool = setting(False, "CSV/folder tiles without a GSD (no --gsd, no gsd column), with a model that "
                                 "has a scale head (buildings 1.1): resample each tile to the model's pixel size by "
                                 "the model's estimate of its own (printed either way); pays on tiles 2x or more "
                                 "from the model's GSD (drones), costs near it")
    native_resolution: bool = setting(False, "GeoTIFF input: predict at the raster's own pixel size, ignoring the "
                                      "training GSD")
    bands: list[int] | None = setting(None, "GeoTIFF input: 1-based bands to read, e.g. 1,2,3 (default: the training "
                                      "bands)", parse=parse_bands)
    stretch: str = setting("percentile", "GeoTIFF input that is not 8-bit: per-band 2-98 percentile stretch to 0-255, "
                           "or clip", choices=("percentile", "none"))
    progress: bool = setting(True, "progress bars")

    def check(self) -> None:
        if self.merge:
            if self.checkpoint or self.data or self.out:
                raise BuildsegError("--merge OUT_DIR works from the folder's done-records alone: drop --checkpoint, "
                                    "--data and --out")
            return
        for flag in ("checkpoint", "data", "out"):
            if not getattr(self, flag):
                raise BuildsegError(f"predict needs --{flag} (or --merge OUT_DIR to merge finished scenes)")
        if self.ray_split_megapixels is not None and self.runner != "ray":
            raise BuildsegError("--ray-split-megapixels applies to --runner ray (the local runner predicts a scene in "
                                "one process); add --runner ray or drop it")
        if self.runner == "ray" and self.shard:
            raise BuildsegError("--shard splits scenes over array jobs; --runner ray hands them out itself: use one "
                                "of them")
        if self.footprints and self.geojson:
            raise BuildsegError("give either --footprints or --geojson (the same thing, GeoJSON only), not both")
        if not self.existing and (self.only_new or self.existing_layer):
            raise BuildsegError("--only-new and --existing-layer compare with mapped buildings: add --existing FILE")

    def check_input(self, kind: str) -> None:
        """The rules that depend on what --data turned out to be (TILES, GEOTIFF or SCENES)."""
        if kind not in (SCENES, SERVICE) and (self.shard or self.runner != "local") or kind != SCENES and self.stac_asset:
            flag = "--stac-asset" if kind != SCENES and self.stac_asset else "--shard" if self.shard else "--runner"
            raise BuildsegError(f"{flag} applies to many scenes (a folder or list of GeoTIFFs, a STAC catalogue, or a "
                                f"tile service's area); --data {self.data} is not one")
        if kind != TILES and self.gsd_estimate:
            raise BuildsegError(f"--gsd-estimate applies to CSV/folder tiles, which carry no GSD; --data {self.data} "
                                "says its own pixel size: drop --gsd-estimate")
        if kind == TILES and (self.bands or self.native_resolution or self.footprints or self.geojson):
            raise BuildsegError("--bands, --native-resolution, --footprints and --geojson apply to GeoTIFF "
                                f"input; --data {self.data} is not a GeoTIFF or a folder/list of them")
        if kind == SERVICE:
            from buildseg.formats.tile_services import check_template, service_kind

            if service_kind(self.data) == "xyz":
                check_template(self.data)
            elif service_kind(self.data) == "wms" and not self.layer:
                raise BuildsegError(f"--data {self.data} is a WMS: name the layer to read with --layer NAME (see its "
                                    "GetCapabilities)")
            if not self.aoi:
                raise BuildsegError(f"--data {self.data} is a tile service: give the area to map with --aoi FILE")
            if not Path(self.aoi).exists():
                raise BuildsegError(f"--aoi {self.aoi} not found (any vector file of the area to map)")
        elif (self.aoi or self.zoom is not None or self.tms or self.tile_cache or self.allow_gaps or self.layer
              or self.piece_megapixels != PIECE_MEGAPIXELS or self.max_tiles != MAX_TILES):
            raise BuildsegError(f"--aoi, --zoom, --layer, --tms, --tile-cache, --allow-gaps, --max-tiles and --piece-megapixels apply to "
                                f"a tile service URL template (https://host/{{z}}/{{x}}/{{y}}.png), a WMTS or a WMS; "
                                f"--data {self.data} is not one")
        if self.existing and (kind == TILES or (kind == GEOTIFF and not (self.footprints or self.geojson))):
            raise BuildsegError("--existing compares footprints: it needs GeoTIFF input with --footprints FILE (or "
                                "many scenes)")
        if self.existing and not Path(self.existing).exists():
            raise BuildsegError(f"--existing {self.existing} not found (a vector file of mapped buildings)")
        if kind != TILES and self.empty_vote:
            raise BuildsegError("--empty-vote blanks whole tiles (CSV/folder input); a GeoTIFF scene is not a tile: "
                                "drop --empty-vote")
        if self.format in TILE_FORMATS and kind != TILES:
            raise BuildsegError(f"--format {self.format} is for tiles (CSV/folder input); scenes write masks and "
                                f"footprint layers: use --format {'|'.join(LAYER_FORMATS)} or --footprints FILE")
        if self.format in LAYER_FORMATS and kind not in (SCENES, SERVICE):
            raise BuildsegError(f"--format {self.format} is the footprint layer format of many scenes; for tiles use "
                                f"--format {'|'.join(TILE_FORMATS)}, for one GeoTIFF --footprints FILE.{self.format}")

    def segmenter_options(self) -> dict:
        """``Segmenter.from_checkpoint``'s keywords (the checkpoint aside)."""
        return dict(device=self.device, precision=self.precision, tta=self.tta, threshold=self.threshold,
                    min_area=self.min_area, ds_ensemble=self.ds_ensemble, window=self.window, overlap=self.overlap,
                    empty_vote=self.empty_vote, engine=self.engine, threads=self.threads, engine_mode=self.engine_mode)
