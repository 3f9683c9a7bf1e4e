"""Scenes read where they live (HTTP range requests, STAC), array-job shards and --merge.

Remote reads go to a small HTTP server with range requests that the tests start on
127.0.0.1 (no other network); it can drop a connection in the middle of a response, once or
always, to check that a dropped read is retried or ends in one clear line naming the URL.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from buildseg.cli import main
from buildseg.data.synth import make_scene
from conftest import write_tiny_checkpoint

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import from_origin  # noqa: E402


class RangeServer:
    """Serves a folder over HTTP/1.1 with byte ranges. ``drop`` maps a file name to how many
    of its ranged reads beyond the first 16 KiB (past the header GDAL reads on open) are cut
    off after half the bytes (-1: all of them)."""

    def __init__(self, root: Path) -> None:
        self.root, self.drop, self.requests = root, {}, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _file(self):
                path = server.root / self.path.lstrip("/").split("?")[0]
                return path if path.is_file() else None

            def do_HEAD(self):
                path = self._file()
                if path is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(path.stat().st_size))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_GET(self):
                path = self._file()
                if path is None:
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start, end = 0, len(data) - 1
                ranged = self.headers.get("Range", "").startswith("bytes=")
                if ranged:
                    first, _, last = self.headers["Range"][6:].partition("-")
                    start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
                server.requests.append((path.name, start, end))
                body = data[start:end + 1]
                self.send_response(206 if ranged else 200)
                if ranged:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                left = server.drop.get(path.name, 0)
                if start >= 16384 and left:
                    server.drop[path.name] = left - 1 if left > 0 else -1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def _quick_gdal_retries(monkeypatch):
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.1")


def write_cog(path: Path, seed: int, size: int = 256, origin=(500000.0, 4100000.0)) -> Path:
    """A tiled (128 px), uncompressed RGB GeoTIFF: many range requests per read."""
    image, _ = make_scene(np.random.default_rng(seed), size)
    with rasterio.open(path, "w", driver="GTiff", height=size, width=size, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(*origin, 0.5, 0.5), tiled=True, blockxsize=128, blockysize=128) as dst:
        dst.write(image.transpose(2, 0, 1))
    return path


@pytest.fixture()
def served(tmp_path):
    root = tmp_path / "bucket"
    root.mkdir()
    for k in range(3):
        write_cog(root / f"scene_{k}.tif", seed=k, origin=(500000.0 + 192 * k, 4100000.0))
    with RangeServer(root) as server:
        yield server


@pytest.fixture(scope="module")
def _threshold(tmp_path_factory) -> float:
    """The stored threshold that leaves buildings on 30% of scene_0's pixels (the same scene
    and the same untrained model in every test: computed once per module)."""
    from buildseg.inference.core.segmenter import Segmenter

    folder = tmp_path_factory.mktemp("threshold")
    path = write_tiny_checkpoint(folder / "m.pt")
    with rasterio.open(write_cog(folder / "scene_0.tif", seed=0)) as src:
        image = src.read().transpose(1, 2, 0)
    prob = Segmenter.from_checkpoint(path, engine="torch", window=128).probabilities(image).mean
    return float(np.quantile(prob, 0.7))


@pytest.fixture()
def ckpt(served, tmp_path, _threshold):
    """An untrained tiny model whose stored threshold leaves buildings (30% of scene_0's
    pixels), so masks and layers have something in them to compare."""
    import torch

    from buildseg.runtime.checkpoint import save_atomic

    path = write_tiny_checkpoint(tmp_path / "m.pt")
    payload = torch.load(path, weights_only=False)
    payload["postprocess"] = {"threshold": _threshold, "min_area": 0}
    return save_atomic(payload, path)


def predict(checkpoint, data, out, *extra):
    return main(["predict", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out), "--block", "128",
                 "--window", "128", "--device", "cpu", "--engine", "torch", "--no-progress", *extra])


def read_mask(path):
    with rasterio.open(path) as src:
        return src.read(1), src.transform, src.crs


@pytest.mark.slow
def test_a_remote_cog_predicts_the_same_mask_as_the_local_file(served, ckpt, tmp_path):
    assert predict(ckpt, served.root / "scene_0.tif", tmp_path / "local.tif") == 0
    assert predict(ckpt, f"{served.url}/scene_0.tif", tmp_path / "remote.tif") == 0
    local, remote = read_mask(tmp_path / "local.tif"), read_mask(tmp_path / "remote.tif")
    np.testing.assert_array_equal(local[0], remote[0])
    assert local[1:] == remote[1:] and 0 < local[0].mean() < 1
    assert any(start > 0 for name, start, _ in served.requests if name == "scene_0.tif")  # read by ranges


@pytest.mark.slow
def test_a_connection_dropped_mid_read_is_retried(served, ckpt, tmp_path):
    assert predict(ckpt, served.root / "scene_1.tif", tmp_path / "local.tif") == 0
    served.drop["scene_1.tif"] = 1
    assert predict(ckpt, f"{served.url}/scene_1.tif", tmp_path / "remote.tif") == 0
    assert served.drop["scene_1.tif"] == 0, "the server never dropped a read: the test checked nothing"
    np.testing.assert_array_equal(read_mask(tmp_path / "local.tif")[0], read_mask(tmp_path / "remote.tif")[0])


@pytest.mark.parametrize("name, fragment", [("scene_2.tif", "after 3 tries"), ("missing.tif", "cannot open"),
                                            ("notes.tif", "cannot open")])
def test_bad_remote_input_is_one_line_naming_the_url_and_writes_nothing(served, ckpt, tmp_path, capsys, name, fragment):
    served.drop["scene_2.tif"] = -1  # every read beyond the header fails
    (served.root / "notes.tif").write_text("not a raster")
    url = f"{served.url}/{name}"
    out = tmp_path / "mask.tif"
    assert predict(ckpt, url, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and url in err and fragment in err
    assert not out.exists() and not list(tmp_path.glob(".mask.tif*"))


@pytest.mark.slow
def test_a_scene_list_of_urls_and_a_stac_collection_give_the_local_runs_layer(served, ckpt, tmp_path):
    import geopandas as gpd

    assert predict(ckpt, served.root, tmp_path / "local", "--format", "geojson") == 0
    listing = tmp_path / "scenes.csv"
    listing.write_text("path\n" + "".join(f"{served.url}/scene_{k}.tif\n" for k in range(3)))
    assert predict(ckpt, listing, tmp_path / "urls", "--format", "geojson") == 0
    items = [{"type": "Feature", "stac_version": "1.0.0", "id": f"scene_{k}", "properties": {"datetime": "2024-01-01T00:00:00Z"},
              "geometry": None, "links": [],
              "assets": {"visual": {"href": f"{served.url}/scene_{k}.tif", "type": "image/tiff; application=geotiff"},
                         "thumbnail": {"href": f"{served.url}/scene_{k}.png", "type": "image/png"}}}
             for k in range(3)]
    stac = tmp_path / "items.json"
    stac.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    assert predict(ckpt, stac, tmp_path / "stac", "--format", "geojson", "--stac-asset", "visual") == 0
    local = gpd.read_file(tmp_path / "local" / "footprints.geojson")
    for folder in ("urls", "stac"):
        other = gpd.read_file(tmp_path / folder / "footprints.geojson")
        assert len(other) == len(local) > 0
        assert other.geometry.geom_equals(local.geometry).all()
        manifest = json.loads((tmp_path / folder / "manifest.json").read_text())
        assert [s["name"] for s in manifest["scenes"]] == [f"scene_{k}" for k in range(3)]
        assert all(s["scene"].startswith(served.url) for s in manifest["scenes"])


def test_a_stac_item_without_the_asset_is_one_line_and_nothing_is_written(served, ckpt, tmp_path, capsys):
    item = {"type": "Feature", "stac_version": "1.0.0", "id": "lonely", "properties": {"datetime": "2024-01-01T00:00:00Z"},
            "geometry": None, "links": [], "assets": {"thumbnail": {"href": "x.png", "type": "image/png"}}}
    stac = tmp_path / "item.json"
    stac.write_text(json.dumps(item))
    out = tmp_path / "out"
    assert predict(ckpt, stac, out, "--stac-asset", "visual") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'lonely'" in err and "'visual'" in err and "thumbnail" in err
    assert not out.exists()


# -- array jobs: --shard I/N and --merge ----------------------------------------------------
@pytest.mark.slow
def test_shards_in_any_order_then_merge_equal_one_run(served, ckpt, tmp_path, capsys):
    import geopandas as gpd

    scenes = served.root
    assert predict(ckpt, scenes, tmp_path / "one") == 0
    out = tmp_path / "sharded"
    assert predict(ckpt, scenes, out, "--shard", "1/2") == 0
    assert "other shards remain" in capsys.readouterr().out and not (out / "manifest.json").exists()
    done = sorted(p.stem for p in (out / ".buildseg-done").glob("*.json"))
    assert done == ["scene_1"]  # shard 1 of 2: the 2nd scene only
    assert main(["predict", "--merge", str(out)]) == 0  # merging early: the finished scenes only
    assert json.loads((out / "manifest.json").read_text())["scenes"][0]["name"] == "scene_1"
    assert predict(ckpt, scenes, out, "--shard", "0/2") == 0  # the last shard to finish merges
    one, sharded = (json.loads((d / "manifest.json").read_text()) for d in (tmp_path / "one", out))
    strip = [{k: v for k, v in s.items() if k != "seconds"} for s in one["scenes"]]
    assert [{k: v for k, v in s.items() if k != "seconds"} for s in sharded["scenes"]] == strip
    a, b = gpd.read_file(tmp_path / "one" / "footprints.gpkg"), gpd.read_file(out / "footprints.gpkg")
    assert len(a) == len(b) and a.geometry.geom_equals(b.geometry).all()
    (out / "manifest.json").unlink()
    assert main(["predict", "--merge", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["n_footprints"] == one["n_footprints"]


@pytest.mark.parametrize("argv, fragment", [
    (["--shard", "2/2"], "0 <= I < N"),
    (["--shard", "x"], "is not I/N"),
])
def test_bad_shard_is_one_line(served, ckpt, tmp_path, capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:  # argparse's own exit, as for every bad flag value
        predict(ckpt, served.root, tmp_path / "out", *argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err


@pytest.mark.parametrize("argv, fragment", [
    (["--ray-split-megapixels", "64"], "applies to --runner ray"),
    (["--runner", "ray", "--ray-split-megapixels", "-1"], "out of range"),
])
def test_bad_split_flag_is_one_line(served, ckpt, tmp_path, capsys, argv, fragment):
    try:
        code = predict(ckpt, served.root, tmp_path / "out", *argv)
    except SystemExit as exit_info:  # a bad value: argparse's own exit
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err and not (tmp_path / "out").exists()


def test_merge_of_a_folder_without_records_is_one_line(tmp_path, capsys):
    assert main(["predict", "--merge", str(tmp_path)]) == 2
    assert "no finished scene" in capsys.readouterr().err
