"""Inputs users meet with the packaged model, imagery services, ``--existing`` and ``--init``:
each refused with one line (exit 2) naming the file, value or URL and the fix, before anything
is written into ``--out``."""

from __future__ import annotations

import functools
import http.server
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

gpd = pytest.importorskip("geopandas")
from shapely.geometry import LineString, box  # noqa: E402

from buildseg.cli import main  # noqa: E402
from conftest import write_tiny_checkpoint  # noqa: E402
from test_tile_service import COLS, ROWS, ZOOM, tile_bounds, write_aoi  # noqa: E402


class Answers(http.server.BaseHTTPRequestHandler):
    """Every request gets the same answer: ``(status, content type, body)``."""

    answer = (404, "text/plain", b"")

    def do_GET(self):  # noqa: N802 - http.server's name
        status, kind, body = self.answer
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    """A tile server on 127.0.0.1 whose answer the test sets; yields (template, set_answer)."""
    handler = type("Handler", (Answers,), {})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/{{z}}/{{x}}/{{y}}.png", \
        functools.partial(setattr, handler, "answer")
    httpd.shutdown()
    httpd.server_close()


def _one_line(capsys, code: int, *fragments: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    return err[0]


def _predict(template: str, aoi: Path, out: Path, *extra: str) -> int:
    ckpt = write_tiny_checkpoint(out.parent / "m.pt")
    return main(["predict", "--checkpoint", str(ckpt), "--data", template, "--aoi", str(aoi), "--out", str(out),
                 "--engine", "torch", "--no-progress", "--tile-cache", str(out.parent / "cache"), *extra])


@pytest.mark.parametrize("answer, fragments", [
    ((200, "text/html; charset=utf-8", b"<html><body>Please log in</body></html>"),
     ["is not an image", "answered text/html", "'<html><body>Please log in", "/19/"]),
    ((200, "application/json", b'{"error": "invalid key"}'), ["is not an image", "application/json", "invalid key"]),
    ((404, "text/plain", b"not found"), ["none of the", "HTTP 404", "--zoom"]),
])
def test_a_service_that_sends_no_images_is_named_with_its_url_and_what_came_back(server, tmp_path, capsys, answer,
                                                                                 fragments):
    template, set_answer = server
    set_answer(answer)
    aoi = write_aoi(tmp_path / "aoi.gpkg", tile_bounds(0, 0, COLS, ROWS))
    code = _predict(template, aoi, tmp_path / "out", "--zoom", str(ZOOM))
    _one_line(capsys, code, *fragments, template.split("/{z}")[0])
    assert not (tmp_path / "out").exists()


def test_an_unreachable_service_is_one_line(tmp_path, capsys):
    aoi = write_aoi(tmp_path / "aoi.gpkg", tile_bounds(0, 0, COLS, ROWS))
    code = _predict("http://127.0.0.1:9/{z}/{x}/{y}.png", aoi, tmp_path / "out", "--zoom", str(ZOOM))
    _one_line(capsys, code, "did not answer", "127.0.0.1:9")
    assert not (tmp_path / "out").exists()


def test_an_aoi_in_metres_that_claims_degrees_asks_for_its_crs(tmp_path, capsys):
    """GeoJSON means EPSG:4326 unless it says otherwise: UTM metres in a file without a CRS
    member arrive as 'degrees' of 500000, and used to end in a math domain error."""
    path = tmp_path / "aoi.geojson"
    path.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": '
                    '{"type": "Polygon", "coordinates": [[[500000, 4100000], [500500, 4100000], [500500, 4100500], '
                    '[500000, 4100500], [500000, 4100000]]]}}]}')
    code = _predict("http://127.0.0.1:9/{z}/{x}/{y}.png", path, tmp_path / "out")
    _one_line(capsys, code, "not longitude/latitude", "declare the CRS", str(path))
    assert not (tmp_path / "out").exists()


def test_an_aoi_too_large_for_its_zoom_names_the_tiles_and_what_would_fit(tmp_path, capsys):
    aoi = tmp_path / "continent.gpkg"
    gpd.GeoDataFrame(geometry=[box(-10, 35, 30, 60)], crs="EPSG:4326").to_file(aoi)
    code = _predict("http://127.0.0.1:9/{z}/{x}/{y}.png", aoi, tmp_path / "out", "--zoom", "18")
    line = _one_line(capsys, code, "tiles", "Gpx", "at zoom 18", "--max-tiles 100,000", "--zoom ", "km2")
    assert "choose --zoom 9" in line or "choose --zoom 1" in line  # coarse enough for 100,000 tiles
    assert not (tmp_path / "out").exists()
    code = _predict("http://127.0.0.1:9/{z}/{x}/{y}.png", aoi, tmp_path / "out", "--zoom", "7", "--max-tiles", "10")
    _one_line(capsys, code, "more than --max-tiles 10")


def test_existing_buildings_must_be_polygons_and_the_tile_cache_a_folder(tmp_path, capsys):
    import rasterio
    from rasterio.transform import from_origin

    tif = tmp_path / "s.tif"
    with rasterio.open(tif, "w", driver="GTiff", height=64, width=64, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500000, 4100000, 0.5, 0.5)) as dst:
        dst.write(np.zeros((3, 64, 64), np.uint8))
    lines = tmp_path / "roads.geojson"
    gpd.GeoDataFrame(geometry=[LineString([(500001, 4099990), (500020, 4099980)])], crs="EPSG:32633").to_file(lines)
    ckpt = write_tiny_checkpoint(tmp_path / "m.pt")
    code = main(["predict", "--checkpoint", str(ckpt), "--data", str(tif), "--out", str(tmp_path / "mask.tif"),
                 "--footprints", str(tmp_path / "b.gpkg"), "--existing", str(lines), "--engine", "torch"])
    _one_line(capsys, code, str(lines), "holds no polygon (found LineString)")
    assert not (tmp_path / "mask.tif").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpd.GeoDataFrame(geometry=[], crs="EPSG:32633").to_file(tmp_path / "none.gpkg")
    code = main(["predict", "--checkpoint", str(ckpt), "--data", str(tif), "--out", str(tmp_path / "mask.tif"),
                 "--footprints", str(tmp_path / "b.gpkg"), "--existing", str(tmp_path / "none.gpkg"), "--engine",
                 "torch", "--no-progress"])
    assert code == 0  # an empty file is "nothing mapped yet", not an error
    aoi = write_aoi(tmp_path / "aoi.gpkg", tile_bounds(0, 0, 1, 1))
    (tmp_path / "cachefile").write_text("x")
    code = main(["predict", "--checkpoint", str(ckpt), "--data", "http://127.0.0.1:9/{z}/{x}/{y}.png", "--aoi", str(aoi),
                 "--out", str(tmp_path / "out"), "--tile-cache", str(tmp_path / "cachefile"), "--engine", "torch"])
    _one_line(capsys, code, "--tile-cache", "is a file", "name a folder")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing run", "run without checkpoint", "other bands", "other encoder"])
def test_a_refused_init_leaves_nothing_in_out(synth_data, tmp_path, capsys, case):
    """``train --init`` is checked before the few-label check writes its halves."""
    empty = tmp_path / "empty_run"
    empty.mkdir()
    init, extra = {"missing run": (str(tmp_path / "nope"), []), "run without checkpoint": (str(empty), []),
                   "other bands": ("buildings", ["--in-chans", "4"]),
                   "other encoder": ("buildings", ["--encoder", "resnet18"])}[case]
    out = tmp_path / "run"
    code = main(["train", "--init", init, "--data", str(synth_data / "train.csv"), "--out", str(out), "--no-progress",
                 "--num-workers", "0", *extra])
    _one_line(capsys, code, "--init" if case != "run without checkpoint" else str(empty))
    assert not out.exists()


def test_training_from_a_service_names_labels_and_keeps_out_clean(tmp_path, capsys):
    aoi = write_aoi(tmp_path / "aoi.geojson", tile_bounds(0, 0, 1, 1), "EPSG:4326")
    code = main(["train", "--data", "http://127.0.0.1:9/{z}/{x}/{y}.png", "--aoi", str(aoi), "--out",
                 str(tmp_path / "run"), "--no-progress"])
    _one_line(capsys, code, "--labels FILE", "http://127.0.0.1:9/{z}/{x}/{y}.png")
    assert not (tmp_path / "run").exists()


def test_training_from_a_service_whose_labels_lie_elsewhere_writes_nothing(tmp_path, capsys):
    import io

    from PIL import Image

    handler = type("Handler", (Answers,), {})  # black PNG tiles: the labels are refused before training starts
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(buffer, format="PNG")
    handler.answer = (200, "image/png", buffer.getvalue())
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        template = f"http://127.0.0.1:{httpd.server_address[1]}/{{z}}/{{x}}/{{y}}.png"
        aoi = write_aoi(tmp_path / "aoi.geojson", tile_bounds(0, 0, 1, 1), "EPSG:4326")
        far = tmp_path / "far.geojson"
        gpd.GeoDataFrame(geometry=[box(100.0, 10.0, 100.0001, 10.0001)], crs="EPSG:4326").to_file(far)
        code = main(["train", "--data", template, "--aoi", str(aoi), "--labels", str(far), "--zoom", str(ZOOM),
                     "--tile-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--no-progress",
                     "--num-workers", "0"])
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert code == 2
    assert not (tmp_path / "run").exists()
