"""Predicting from an XYZ/TMS tile service over an area of interest: the tiles are served on
127.0.0.1 by the test; the footprints equal those of the same mosaic written as a GeoTIFF;
the AOI may be in any CRS; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest

gpd = pytest.importorskip("geopandas")
rasterio = pytest.importorskip("rasterio")
from PIL import Image  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402
from shapely.geometry import box  # noqa: E402

from buildseg.cli import main  # noqa: E402
from buildseg.formats import tile_services as ts  # noqa: E402
from buildseg.formats.tile_services import public_url  # noqa: E402
from buildseg.inference.jobs.conflate import read_layer  # noqa: E402
from buildseg.inference.jobs.geotiff import predict_geotiff  # noqa: E402
from buildseg.inference.jobs.tile_service import plan_area  # noqa: E402
from buildseg.settings.predict import PredictSettings  # noqa: E402
from test_footprints import bright_segmenter, houses  # noqa: E402

ZOOM = 19
X0, Y0 = 2**18 + 40, 2**18 - 300  # a little north of the equator
COLS, ROWS = 3, 2


class Tiles(http.server.SimpleHTTPRequestHandler):
    """z/x/y PNG files; ``/wmts/WMTSCapabilities.xml`` (GoogleMapsCompatible, RESTful URLs to
    the same files); ``/wms?...REQUEST=GetMap`` cut from the mosaic by BBOX; some paths fail."""

    failing: set = set()
    status = 500
    mosaic = None
    agents: set = set()
    paths: list = []

    def do_GET(self):  # noqa: N802 - http.server's name
        from urllib.parse import parse_qs, urlsplit

        Tiles.agents.add(self.headers.get("User-Agent", ""))
        Tiles.paths.append(self.path)
        if any(self.path.endswith(f) for f in self.failing):
            self.send_error(self.status, "tile server error")
            return
        parts = urlsplit(self.path)
        if parts.path == "/wmts/WMTSCapabilities.xml":
            return self._send(wmts_capabilities(f"http://{self.headers['Host']}"), "application/xml")
        if parts.path == "/wms":
            query = {k.upper(): v[0] for k, v in parse_qs(parts.query).items()}
            return self._send(wms_map(self.mosaic, query), "image/png")
        super().do_GET()

    def _send(self, body: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def wmts_capabilities(host: str) -> bytes:
    """A WMTS 1.0.0 capabilities document: one layer on GoogleMapsCompatible zooms 0..ZOOM."""
    matrices = "".join(
        f"<TileMatrix><ows:Identifier>{z}</ows:Identifier><ScaleDenominator>{2 * ts.WORLD / (256 * 2**z) / 0.00028!r}"
        f"</ScaleDenominator><TopLeftCorner>{-ts.WORLD!r} {ts.WORLD!r}</TopLeftCorner><TileWidth>256</TileWidth>"
        f"<TileHeight>256</TileHeight><MatrixWidth>{2**z}</MatrixWidth><MatrixHeight>{2**z}</MatrixHeight></TileMatrix>"
        for z in range(ZOOM + 1))
    return (f"""<?xml version="1.0" encoding="UTF-8"?>
<Capabilities xmlns="http://www.opengis.net/wmts/1.0" xmlns:ows="http://www.opengis.net/ows/1.1"
 xmlns:xlink="http://www.w3.org/1999/xlink" version="1.0.0">
<ows:ServiceIdentification><ows:ServiceType>OGC WMTS</ows:ServiceType><ows:ServiceTypeVersion>1.0.0
</ows:ServiceTypeVersion></ows:ServiceIdentification>
<Contents><Layer><ows:Identifier>houses</ows:Identifier>
<ows:WGS84BoundingBox><ows:LowerCorner>-180 -85</ows:LowerCorner><ows:UpperCorner>180 85</ows:UpperCorner>
</ows:WGS84BoundingBox><Style isDefault="true"><ows:Identifier>default</ows:Identifier></Style>
<Format>image/png</Format><TileMatrixSetLink><TileMatrixSet>GoogleMapsCompatible</TileMatrixSet></TileMatrixSetLink>
<ResourceURL format="image/png" resourceType="tile" template="{host}/{{TileMatrix}}/{{TileCol}}/{{TileRow}}.png"/>
</Layer><TileMatrixSet><ows:Identifier>GoogleMapsCompatible</ows:Identifier>
<ows:SupportedCRS>urn:ogc:def:crs:EPSG::3857</ows:SupportedCRS>{matrices}</TileMatrixSet></Contents></Capabilities>
""").encode()


def wms_map(mosaic: np.ndarray, query: dict) -> bytes:
    """A WMS GetMap answer in EPSG:3857 at the mosaic's own resolution: its pixels in BBOX."""
    import io

    minx, miny, maxx, maxy = (float(v) for v in query["BBOX"].split(","))
    width, height = int(query["WIDTH"]), int(query["HEIGHT"])
    left, _, _, top = tile_bounds(0, 0, COLS, ROWS)
    res = (maxx - minx) / width
    col, row = round((minx - left) / res), round((top - maxy) / res)
    image = np.zeros((height, width, 3), np.uint8)
    r0, c0 = max(row, 0), max(col, 0)
    r1, c1 = min(row + height, mosaic.shape[0]), min(col + width, mosaic.shape[1])
    if r1 > r0 and c1 > c0:
        image[r0 - row:r1 - row, c0 - col:c1 - col] = mosaic[r0:r1, c0:c1]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def service(tmp_path):
    """z/x/y PNG tiles of a mosaic of houses, served on 127.0.0.1 (also as WMTS and WMS);
    (URL template, mosaic)."""
    mosaic = np.concatenate([np.concatenate([houses(seed=10 * j + i) for i in range(COLS)], axis=1) for j in range(ROWS)])
    root = tmp_path / "tiles"
    for j in range(ROWS):
        for i in range(COLS):
            folder = root / str(ZOOM) / str(X0 + i)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mosaic[j * 256:(j + 1) * 256, i * 256:(i + 1) * 256]).save(folder / f"{Y0 + j}.png")
    Tiles.failing, Tiles.status, Tiles.mosaic, Tiles.agents, Tiles.paths = set(), 500, mosaic, set(), []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Tiles, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{{z}}/{{x}}/{{y}}.png", mosaic
    server.shutdown()
    server.server_close()


def tile_bounds(i0, j0, i1, j1):
    res = 2 * ts.WORLD / (256 * 2**ZOOM)
    return (-ts.WORLD + (X0 + i0) * 256 * res, ts.WORLD - (Y0 + j1) * 256 * res,
            -ts.WORLD + (X0 + i1) * 256 * res, ts.WORLD - (Y0 + j0) * 256 * res)


def write_aoi(path, bounds, crs="EPSG:3857"):
    gpd.GeoDataFrame(geometry=[box(*bounds)], crs="EPSG:3857").to_crs(crs).to_file(path)
    return path


def settings_for(url, aoi, out, **extra):
    return PredictSettings(checkpoint=["unused.pt"], data=url, aoi=str(aoi), out=str(out), zoom=ZOOM,
                           tile_cache=str(Path(out).parent / "cache"), progress=False, **extra)


def run_area(url, aoi, out, segmenter=None, *, shard=(0, 1), **extra):
    """plan_area + the local runner, as ``buildseg predict`` runs them (no checkpoint)."""
    from buildseg.inference.prediction import geotiff_settings
    from buildseg.inference.runners.local import predict_scenes

    settings = settings_for(url, aoi, out, **{"block": 256, **extra})
    scenes, _ = plan_area(settings, trained_gsd=None)
    summary = predict_scenes(segmenter or bright_segmenter(), scenes, out, geotiff_settings(settings, {}, scenes=True),
                             progress=False, shard=shard)
    return scenes, summary


def mosaic_geotiff(mosaic, path):
    res = 2 * ts.WORLD / (256 * 2**ZOOM)
    minx, _, _, maxy = tile_bounds(0, 0, COLS, ROWS)
    with rasterio.open(path, "w", driver="GTiff", height=mosaic.shape[0], width=mosaic.shape[1], count=3,
                       dtype="uint8", crs="EPSG:3857", transform=from_origin(minx, maxy, res, res)) as dst:
        dst.write(mosaic.transpose(2, 0, 1))
    return path


def same_layers(a, b) -> bool:
    a, b = read_layer(a), read_layer(b)
    return len(a) == len(b) and a.geometry.union_all().symmetric_difference(b.geometry.union_all()).area < 1e-6 and \
        np.allclose(sorted(a["mean_prob"]), sorted(b["mean_prob"]))


def service_url(template: str, kind: str) -> tuple[str, dict]:
    """(--data, extra settings) of the test server as an XYZ template, a WMTS or a WMS."""
    host = template.split("/{z}")[0]
    return {"xyz": (template, {}), "wmts": (f"{host}/wmts/WMTSCapabilities.xml", {}),
            "wms": (f"{host}/wms", {"layer": "houses"})}[kind]


@pytest.mark.parametrize("kind, aoi_crs, piece_megapixels", [("xyz", "EPSG:3857", 0.06), ("xyz", "EPSG:4326", 16.0),
                                                             ("wmts", "EPSG:4326", 0.06), ("wms", "EPSG:3857", 0.06)])
def test_the_aois_footprints_equal_those_of_the_same_mosaic_as_a_geotiff(service, tmp_path, kind, aoi_crs,
                                                                         piece_megapixels):
    template, mosaic = service
    url, extra = service_url(template, kind)
    aoi = write_aoi(tmp_path / "aoi.gpkg", tile_bounds(0, 0, COLS, ROWS), aoi_crs)
    scenes, summary = run_area(url, aoi, tmp_path / "out", piece_megapixels=piece_megapixels, **extra)
    assert len(scenes) == (COLS * ROWS if piece_megapixels < 1 else 1) and summary["remaining"] == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    area = manifest["areas"]["aoi"]
    assert area["zoom"] == ZOOM and area["kind"] == kind and area["mask"] == "aoi_mask.vrt"
    assert {a.split("/")[0] for a in Tiles.agents} == {"buildseg"}  # GDAL sent buildseg's user agent
    seg = bright_segmenter()
    reference = predict_geotiff(seg, mosaic_geotiff(mosaic, tmp_path / "mosaic.tif"), tmp_path / "m.tif",
                                tmp_path / "ref.gpkg", block=256)
    with rasterio.open(tmp_path / "out" / "aoi_mask.vrt") as a, rasterio.open(reference.mask_path) as b:
        assert a.transform.almost_equals(b.transform) and np.array_equal(a.read(1), b.read(1)) and a.read(1).any()
    assert len(read_layer(reference.footprints_path)) > 5
    assert same_layers(tmp_path / "out" / "footprints.gpkg", reference.footprints_path)


def test_shards_and_a_killed_run_give_the_layer_of_one_uninterrupted_run(service, tmp_path):
    url, _ = service
    aoi = write_aoi(tmp_path / "aoi.gpkg", tile_bounds(0, 0, COLS, ROWS))
    run_area(url, aoi, tmp_path / "whole", piece_megapixels=0.06)
    first, summary = run_area(url, aoi, tmp_path / "shards", piece_megapixels=0.06, shard=(0, 2))
    assert summary["remaining"] == len(first) // 2 and not (tmp_path / "shards" / "footprints.gpkg").exists()
    _, summary = run_area(url, aoi, tmp_path / "shards", piece_megapixels=0.06, shard=(1, 2))
    assert summary["remaining"] == 0 and same_layers(tmp_path / "shards" / "footprints.gpkg",
                                                     tmp_path / "whole" / "footprints.gpkg")
    (tmp_path / "shards" / "footprints.gpkg").unlink()  # predict --merge DIR rebuilds it from the records alone
    assert main(["predict", "--merge", str(tmp_path / "shards")]) == 0
    assert same_layers(tmp_path / "shards" / "footprints.gpkg", tmp_path / "whole" / "footprints.gpkg")

    class Killed(Exception):
        pass

    seg, calls = bright_segmenter(), []
    probabilities = seg.probabilities

    def dies_on_the_fourth_block(image):
        calls.append(1)
        if len(calls) == 4:
            raise Killed()
        return probabilities(image)

    object.__setattr__(seg, "probabilities", dies_on_the_fourth_block)
    with pytest.raises(Killed):
        run_area(url, aoi, tmp_path / "killed", seg, piece_megapixels=0.06)
    _, summary = run_area(url, aoi, tmp_path / "killed", piece_megapixels=0.06)
    assert summary["skipped"] == 3 and summary["predicted"] == COLS * ROWS - 3
    assert same_layers(tmp_path / "killed" / "footprints.gpkg", tmp_path / "whole" / "footprints.gpkg")


def test_footprints_and_mask_outside_the_aoi_are_left_out(service, tmp_path):
    url, _ = service
    inside = box(*tile_bounds(0, 0, 1.5, 1))  # half of the second tile
    aoi = write_aoi(tmp_path / "aoi.gpkg", inside.bounds)
    scenes, _ = run_area(url, aoi, tmp_path / "out")
    frame = read_layer(tmp_path / "out" / "footprints.gpkg")
    assert len(frame) > 0 and frame.geometry.centroid.within(inside).all()
    with rasterio.open(tmp_path / "out" / "aoi_mask.vrt") as src:
        mask = src.read(1)
        cols = np.arange(src.width)
        centre_x = src.transform.c + (cols + 0.5) * src.transform.a
    assert mask.any() and not mask[:, centre_x > inside.bounds[2]].any()


def test_zoom_follows_the_models_gsd_at_the_aois_latitude():
    assert ts.zoom_for_gsd(0.3, 0.0) == 19 and ts.zoom_for_gsd(0.6, 0.0) == 18
    assert ts.zoom_for_gsd(0.3, 60.0) == 18  # pixels shrink towards the poles
    assert public_url("https://u:p@host/{z}/{x}/{y}.png?key=SECRET&x=1") == "https://host/{z}/{x}/{y}.png?key=***&x=1"


@pytest.mark.parametrize("argv, message", [
    (["--data", "http://127.0.0.1:9/{z}/{x}.png", "--aoi", "{aoi}"], "lacks {y}"),
    (["--data", "http://127.0.0.1:9/{z}/{x}/{y}.png"], "give the area to map with --aoi FILE"),
    (["--data", "http://127.0.0.1:9/{z}/{x}/{y}.png", "--aoi", "{aoi}", "--zoom", "30"], "out of range"),
    (["--data", "http://127.0.0.1:9/{z}/{x}/{y}.png", "--aoi", "{nocrs}"], "has no CRS"),
    (["--data", "{tif}", "--aoi", "{aoi}"], "apply to a tile service URL template"),
    (["--data", "http://127.0.0.1:9/{z}/{x}/{y}.png", "--aoi", "{polar}"], "outside the service's extent"),
    (["--data", "http://127.0.0.1:9/wms", "--aoi", "{aoi}"], "name the layer to read with --layer"),
    (["--data", "http://127.0.0.1:9/wms", "--layer", "a", "--aoi", "{aoi}", "--zoom", "23"], "zoom levels 0..22"),
])
def test_bad_tile_service_input_is_one_line_and_nothing_is_written(tmp_path, capsys, argv, message):
    import warnings

    from conftest import write_tiny_checkpoint

    write_aoi(tmp_path / "aoi.gpkg", tile_bounds(0, 0, 1, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpd.GeoDataFrame(geometry=[box(0, 0, 1, 1)], crs=None).to_file(tmp_path / "nocrs.gpkg")
    with rasterio.open(tmp_path / "s.tif", "w", driver="GTiff", height=64, width=64, count=3, dtype="uint8",
                       crs="EPSG:3857", transform=from_origin(1000, 1000, 2, 2)) as dst:
        dst.write(np.zeros((3, 64, 64), np.uint8))
    ckpt = write_tiny_checkpoint(tmp_path / "m.pt")
    gpd.GeoDataFrame(geometry=[box(10, 86, 11, 88)], crs="EPSG:4326").to_file(tmp_path / "polar.gpkg")
    argv = [a.format(aoi=tmp_path / "aoi.gpkg", nocrs=tmp_path / "nocrs.gpkg", tif=tmp_path / "s.tif",
                     polar=tmp_path / "polar.gpkg")
            if a.startswith("{") and not a.startswith("{z") else a for a in argv]
    try:
        code = main(["predict", "--checkpoint", str(ckpt), *argv, "--out", str(tmp_path / "out"), "--engine", "torch"])
    except SystemExit as exc:  # argparse's own range check
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_predict_from_a_tile_service_on_the_command_line(service, tmp_path, capsys):
    from buildseg.runtime.checkpoint import load_checkpoint, save_atomic
    from conftest import write_tiny_checkpoint

    url, _ = service
    aoi = write_aoi(tmp_path / "aoi.geojson", tile_bounds(0, 0, COLS, ROWS), "EPSG:4326")
    ckpt = write_tiny_checkpoint(tmp_path / "m.pt")
    payload = load_checkpoint(ckpt)
    payload["input"] = {"gsd": 0.3, "bands": None}  # zoom 19 near the equator
    save_atomic({k: v for k, v in payload.items() if k not in ("format", "schema")}, ckpt)
    code = main(["predict", "--checkpoint", str(ckpt), "--data", url, "--aoi", str(aoi), "--out", str(tmp_path / "out"),
                 "--engine", "torch", "--no-progress", "--tile-cache", str(tmp_path / "cache")])
    assert code == 0
    assert "tile service at zoom 19" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"aoi_mask.vrt", "footprints.gpkg", "manifest.json"}


def test_a_failing_tile_stops_the_run_with_one_line_naming_it(service, tmp_path, capsys, monkeypatch):
    from conftest import write_tiny_checkpoint

    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "0")  # GDAL's retries would only slow the test
    url, _ = service
    Tiles.failing = {f"/{ZOOM}/{X0 + 1}/{Y0}.png"}
    aoi = write_aoi(tmp_path / "aoi.gpkg", tile_bounds(0, 0, COLS, ROWS))
    ckpt = write_tiny_checkpoint(tmp_path / "m.pt")
    code = main(["predict", "--checkpoint", str(ckpt), "--data", url, "--aoi", str(aoi), "--zoom", str(ZOOM), "--out",
                 str(tmp_path / "out"), "--engine", "torch", "--no-progress", "--tile-cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    tile_url = url.format(z=ZOOM, x=X0 + 1, y=Y0)
    assert f"tile {ZOOM}/{X0 + 1}/{Y0} (HTTP 500): {tile_url}" in err[0] and "--allow-gaps" in err[0], err
    assert not (tmp_path / "out" / "footprints.gpkg").exists()


@pytest.mark.parametrize("status", [404, 500])
def test_with_allow_gaps_a_failing_tile_is_a_recorded_gap_and_the_rest_is_predicted(service, tmp_path, monkeypatch,
                                                                                   status):
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "0")
    url, _ = service
    Tiles.failing, Tiles.status = {f"/{ZOOM}/{X0 + 1}/{Y0}.png"}, status
    aoi = write_aoi(tmp_path / "aoi.gpkg", tile_bounds(0, 0, COLS, ROWS))
    _, summary = run_area(url, aoi, tmp_path / "out", allow_gaps=True, piece_megapixels=0.06)
    assert summary["remaining"] == 0 and summary["gaps"] == 1
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert np.allclose(manifest["areas"]["aoi"]["gaps"][0], tile_bounds(1, 0, 2, 1))
    gap = box(*tile_bounds(1, 0, 2, 1))
    frame = read_layer(tmp_path / "out" / "footprints.gpkg")
    assert len(frame) > 5 and not frame.geometry.centroid.within(gap).any()
    with rasterio.open(tmp_path / "out" / "aoi_mask.vrt") as src:
        mask = src.read(1)
    assert not mask[:256, 256:512].any() and mask[:, :256].any()


def test_web_mercator_pixels_and_areas_are_measured_on_the_ground(tmp_path):
    """At 60 degrees north a Web Mercator metre is half a metre on the ground: a raster of 1.0
    CRS-metre pixels there is 0.5 m imagery (no resampling at --gsd 0.5), and a 10 x 10 CRS-metre
    building is 25 m^2."""
    from buildseg.footprints.clean import FootprintOptions, clean_footprints
    from buildseg.footprints.polygons import Part
    from buildseg.formats.rasters import scene_grid

    north = float(gpd.GeoSeries([box(10, 60, 10.0001, 60.0001)], crs="EPSG:4326").to_crs("EPSG:3857").total_bounds[1])
    with rasterio.open(tmp_path / "m.tif", "w", driver="GTiff", height=64, width=64, count=3, dtype="uint8",
                       crs="EPSG:3857", transform=from_origin(1_000_000, north + 32, 1.0, 1.0)) as dst:
        dst.write(np.zeros((3, 64, 64), np.uint8))
    with rasterio.open(tmp_path / "m.tif") as src:
        grid = scene_grid(src, 0.5, "m.tif")
        assert abs(grid.step_x - 1.0) < 1e-3 and abs(scene_grid(src, None, "m.tif").gsd - 0.5) < 1e-3
        frame = clean_footprints([Part(box(1_000_000, north, 1_000_010, north + 10), 1.0, 100)], src.crs, 1.0, 1.0,
                                 FootprintOptions(simplify=0), "m")
    assert abs(frame["area_m2"].iloc[0] - 25.0) < 0.1


@pytest.mark.slow
def test_train_from_a_tile_service_with_vector_labels(service, tmp_path):
    """The fAIr workflow: mapped buildings as labels, the imagery service as pixels."""
    from buildseg.data.geo import prepare_geo_data
    from buildseg.footprints.polygons import mask_polygons
    from test_geo_training import TRAIN_FAST

    url, mosaic = service
    res = 2 * ts.WORLD / (256 * 2**ZOOM)
    minx, _, _, maxy = tile_bounds(0, 0, COLS, ROWS)
    houses_3857 = mask_polygons((mosaic.mean(axis=2) > 127).astype(np.uint8), from_origin(minx, maxy, res, res))
    gpd.GeoDataFrame(geometry=houses_3857, crs="EPSG:3857").to_crs("EPSG:4326").to_file(tmp_path / "osm.geojson")
    aoi = write_aoi(tmp_path / "aoi.geojson", tile_bounds(0, 0, COLS, ROWS), "EPSG:4326")
    run = tmp_path / "run"
    assert main(["train", "--data", url, "--aoi", str(aoi), "--labels", str(tmp_path / "osm.geojson"), "--zoom",
                 str(ZOOM), "--tile-cache", str(tmp_path / "cache"), "--out", str(run), "--val-fraction", "0.3",
                 "--max-nodata", "0.95", *TRAIN_FAST]) == 0  # black between the houses counts as nodata
    vrt = run / "service" / "aoi.vrt"
    with rasterio.open(vrt) as src:
        assert np.array_equal(src.read().transpose(1, 2, 0), mosaic)  # the pixels came from the service
    geo = prepare_geo_data(str(vrt), [str(tmp_path / "osm.geojson")], [1, 2, 3])
    assert sum(len(s.polygons) for s in geo.scenes) == len(houses_3857)


@pytest.mark.parametrize("argv, message", [
    (["--data", "http://127.0.0.1:9/{z}/{x}/{y}.png", "--labels", "x.geojson"], "and the area with --aoi FILE"),
    (["--data", "{csv}", "--aoi", "a.geojson"], "--aoi applies to an imagery service"),
])
def test_bad_service_training_input_is_one_line(tmp_path, capsys, argv, message):
    from buildseg.data.synth import write_dataset

    argv = [str(tmp_path / "train.csv") if a == "{csv}" else a for a in argv]
    write_dataset(tmp_path, n_train=2, train_size=64, n_test=0, progress=False)
    code = main(["train", *argv, "--out", str(tmp_path / "run"), "--epochs", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.slow
def test_adapt_reads_a_tile_service_over_an_aoi(service, tmp_path):
    from conftest import write_tiny_checkpoint

    url, mosaic = service
    aoi = write_aoi(tmp_path / "aoi.geojson", tile_bounds(0, 0, COLS, ROWS), "EPSG:4326")
    ckpt = write_tiny_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "adapted"
    assert main(["adapt", "--checkpoint", str(ckpt), "--data", url, "--aoi", str(aoi), "--zoom", str(ZOOM), "--tile-cache",
                 str(tmp_path / "cache"), "--out", str(out), "--steps", "2", "--batch-size", "2", "--crop", "64",
                 "--device", "cpu", "--no-progress"]) == 0
    assert (out / "best.pt").is_file() and (out / "service" / "aoi.vrt").is_file()
    assert any(path.startswith(f"/{ZOOM}/") for path in Tiles.paths)  # the crops came from the service
