"""See the result: the README's "map an area" journey with the packaged model ends with
``OUT/overview.png`` (the imagery with new, mapped and unconfirmed buildings in three colours)
and ``buildseg report --run OUT`` makes one self-contained page of it."""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest

gpd = pytest.importorskip("geopandas")
from PIL import Image  # noqa: E402
from shapely.geometry import box  # noqa: E402

from buildseg.cli import main  # noqa: E402
from buildseg.inference.jobs.overview import MAX_SIDE, STATUS_COLOURS, write_overview  # noqa: E402
from test_report import CHROMIUM  # noqa: E402
from test_tile_service import COLS, ROWS, ZOOM, service, tile_bounds, write_aoi  # noqa: E402, F401


def _has_colour(picture: np.ndarray, colour) -> bool:
    return bool((picture == np.array(colour, np.uint8)).all(axis=-1).any())


@pytest.mark.slow
def test_map_an_area_with_the_packaged_model_only_new_with_an_overview_and_a_report(service, tmp_path, capsys):  # noqa: F811
    url, _ = service
    aoi = write_aoi(tmp_path / "aoi.geojson", tile_bounds(0, 0, COLS, ROWS), "EPSG:4326")
    common = ["predict", "--model", "buildings", "--data", url, "--aoi", str(aoi), "--zoom", str(ZOOM), "--tile-cache",
              str(tmp_path / "cache"), "--engine", "torch", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "first")]) == 0
    found = gpd.read_file(tmp_path / "first" / "footprints.gpkg")
    assert len(found) >= 2, "the packaged model finds the mosaic's houses"
    overview = np.asarray(Image.open(tmp_path / "first" / "overview.png").convert("RGB"))
    assert max(overview.shape[:2]) <= MAX_SIDE and _has_colour(overview, (255, 48, 48))
    # mapped: every other building found; unconfirmed: a mapped building where nothing was found
    left, bottom, _, _ = tile_bounds(0, 0, COLS, ROWS)
    ghost = box(left + 1, bottom + 1, left + 6, bottom + 6)
    existing = gpd.GeoDataFrame(geometry=[*found.geometry.iloc[::2], ghost], crs=found.crs)
    existing.to_file(tmp_path / "osm.gpkg")
    out = tmp_path / "area"
    assert main([*common, "--out", str(out), "--existing", str(tmp_path / "osm.gpkg"), "--only-new"]) == 0
    printed = capsys.readouterr().out
    assert f"overview: {out / 'overview.png'}" in printed
    picture = np.asarray(Image.open(out / "overview.png").convert("RGB"))
    assert max(picture.shape[:2]) <= MAX_SIDE
    for status, colour in STATUS_COLOURS.items():
        assert _has_colour(picture, colour), f"no {status} footprint drawn"
    counts = json.loads((out / "overview.json").read_text())["counts"]
    assert counts["mapped"] >= len(found) // 2 and counts["unconfirmed"] >= 1 and counts["new"] >= 1
    assert len(gpd.read_file(out / "footprints.gpkg")) == counts["new"]  # --only-new: the layer holds the new ones
    page = tmp_path / "run.html"
    assert main(["report", "--run", str(out), "--out", str(page)]) == 0
    text = page.read_text()
    assert "http://" not in re.sub(r"<pre id='manifest'>.*?</pre>", "", text, flags=re.S)  # self-contained
    assert text.count("class='status'") == 3 and "data:image/png;base64," in text
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium): the page's rendering is not checked")
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                           "--disable-background-networking", "--dump-dom", page.as_uri()], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'data-images="1"' in proc.stdout and 'data-broken-images="0"' in proc.stdout


def test_the_picture_is_downsampled_and_draws_every_status(tmp_path):
    """A 3000 px scene becomes a picture of at most MAX_SIDE px; each status its colour."""
    import rasterio
    from rasterio.transform import from_origin

    path = tmp_path / "big.tif"
    with rasterio.open(path, "w", driver="GTiff", height=600, width=3000, count=3, dtype="uint16", crs="EPSG:32633",
                       transform=from_origin(500000, 4100000, 0.5, 0.5)) as dst:
        dst.write(np.random.default_rng(0).integers(0, 4000, (3, 600, 3000), dtype=np.uint16))
    frames = {status: gpd.GeoDataFrame(geometry=[box(500000 + 200 * k, 4099850, 500000 + 200 * k + 40, 4099890)],
                                       crs="EPSG:32633") for k, status in enumerate(STATUS_COLOURS)}
    out = write_overview([path], frames, tmp_path / "o.png")
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape[1] == MAX_SIDE and picture.shape[0] == 400
    assert all(_has_colour(picture, colour) for colour in STATUS_COLOURS.values())
    assert json.loads(out.with_suffix(".json").read_text())["counts"] == {s: 1 for s in STATUS_COLOURS}


def test_report_run_needs_a_prediction_folder(tmp_path, capsys):
    assert main(["report", "--run", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert "no overview.png there" in capsys.readouterr().err
    assert main(["report", "--out", str(tmp_path / "r.html")]) == 2
    assert "--run OUT_DIR" in capsys.readouterr().err
