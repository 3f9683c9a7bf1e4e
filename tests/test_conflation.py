"""``predict --existing``: the conflation rule against a brute-force formulation, the layers it
writes, another CRS, and bad input as one line with nothing written."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

gpd = pytest.importorskip("geopandas")
shapely = pytest.importorskip("shapely")
from shapely.geometry import box  # noqa: E402

from buildseg.cli import main  # noqa: E402
from buildseg.footprints.conflation import ConflationRule, conflate, editor_frame, read_existing  # noqa: E402
from buildseg.inference.jobs.conflate import conflate_layer, read_layer  # noqa: E402
from buildseg.inference.jobs.geotiff import predict_geotiff  # noqa: E402
from buildseg.settings.predict import MATCH_IOU, MATCH_OVERLAP  # noqa: E402
from test_footprints import bright_segmenter, houses, write_rgb  # noqa: E402

RULE = ConflationRule(match_iou=MATCH_IOU, match_overlap=MATCH_OVERLAP)
UTM = "EPSG:32633"


def frame(geoms, crs=UTM, **columns):
    return gpd.GeoDataFrame(columns, geometry=list(geoms), crs=crs)


def random_boxes(rng, n, offset=0.0):
    out = []
    for _ in range(n):
        x, y = rng.uniform(0, 100, 2) + offset
        w, h = rng.uniform(3, 15, 2)
        out.append(box(x, y, x + w, y + h))
    return out


def brute_force(these, others):
    """Best IoU and covered share by looping over every pair (no index, no vectorisation)."""
    best, cover = [], []
    for a in these:
        ious = [a.intersection(b).area / a.union(b).area for b in others if a.intersects(b)]
        touching = [b for b in others if a.intersects(b)]
        best.append(max(ious, default=0.0))
        cover.append(a.intersection(shapely.union_all(touching)).area / a.area if touching else 0.0)
    return np.array(best), np.array(cover)


@pytest.mark.parametrize("seed", range(5))
def test_the_rule_equals_a_brute_force_formulation_on_random_layers(seed):
    rng = np.random.default_rng(seed)
    predicted, existing = random_boxes(rng, 30), random_boxes(rng, 25, offset=2.0)
    result = conflate(frame(predicted, mean_prob=rng.uniform(0.5, 1, 30)), frame(existing), RULE)
    iou, cover = brute_force(predicted, existing)
    expected = np.where((iou >= RULE.match_iou) | (cover >= RULE.match_overlap), "mapped", "new")
    assert list(result.predicted["status"]) == list(expected)
    np.testing.assert_allclose(result.predicted["best_iou"], iou, atol=1e-4)
    np.testing.assert_allclose(result.predicted["covered"], cover, atol=1e-4)
    e_iou, e_cover = brute_force(existing, predicted)
    unsupported = (e_iou < RULE.match_iou) & (e_cover < RULE.match_overlap)
    assert len(result.unconfirmed) == int(unsupported.sum())
    assert all(g.equals(existing[i]) for g, i in zip(result.unconfirmed.geometry, np.flatnonzero(unsupported)))


def test_hand_cases_and_an_existing_layer_in_another_crs():
    same = box(0, 0, 10, 10)
    blob = box(20, 0, 40, 10)  # one predicted blob over two mapped houses
    new = box(60, 60, 70, 70)
    predicted = frame([same, blob, new], mean_prob=[0.9, 0.8, 0.7])
    mapped = frame([box(0.5, 0.5, 10.5, 10.5), box(20, 0, 29, 10), box(31, 0, 40, 10), box(90, 90, 95, 95)])
    result = conflate(predicted, mapped.to_crs("EPSG:4326"), RULE)  # reprojected back to the prediction's CRS
    assert list(result.predicted["status"]) == ["mapped", "mapped", "new"]
    assert result.predicted["covered"].iloc[1] == pytest.approx(0.9, abs=1e-3)
    assert len(result.unconfirmed) == 1 and result.unconfirmed.geometry.iloc[0].centroid.x == pytest.approx(92.5, abs=1e-3)
    assert result.counts() == {"new": 1, "mapped": 2, "unconfirmed": 1}
    editor = editor_frame(result.predicted)
    assert editor.crs.to_epsg() == 4326 and set(editor["building"]) == {"yes"}
    assert list(editor["confidence"]) == [0.9, 0.8, 0.7]


def test_the_layer_of_a_predicted_geotiff_is_conflated_in_place(tmp_path):
    src = write_rgb(tmp_path / "s.tif", houses())
    layer = predict_geotiff(bright_segmenter(), src, tmp_path / "m.tif", tmp_path / "b.gpkg", block=128).footprints_path
    footprints = read_layer(layer)
    assert len(footprints) > 3
    half = footprints.iloc[: len(footprints) // 2]
    ghost = frame([box(500001, 4099880, 500005, 4099876)])  # mapped, but nothing predicted there
    existing_path = tmp_path / "osm.geojson"
    gpd.GeoDataFrame(geometry=list(half.geometry) + list(ghost.geometry), crs=UTM).to_crs("EPSG:4326").to_file(existing_path)
    far = frame([box(510000, 4090000, 510010, 4090010)]).to_crs("EPSG:4326")  # outside the scene: not compared
    far.to_file(tmp_path / "far.geojson")
    existing = gpd.GeoDataFrame(gpd.pd.concat([read_existing(existing_path), read_existing(tmp_path / "far.geojson")]),
                                crs="EPSG:4326")
    summary = conflate_layer(layer, existing, rule=RULE, only_new=True, masks=[tmp_path / "m.tif"])
    assert summary["new"] == len(footprints) - len(half) and summary["mapped"] == len(half)
    assert summary["unconfirmed"] == 1
    assert len(read_layer(layer)) == summary["new"] and set(read_layer(layer)["status"]) == {"new"}
    editor = gpd.read_file(summary["editor"])
    assert editor.crs.to_epsg() == 4326 and len(editor) == summary["new"] and (editor["building"] == "yes").all()
    assert editor["confidence"].between(0.5, 1.0).all()
    assert len(gpd.read_file(summary["unconfirmed_layer"])) == 1


@pytest.mark.parametrize("args, message", [
    (["--existing", "{tmp}/missing.geojson"], "--existing {tmp}/missing.geojson not found"),
    (["--existing", "{tmp}/nocrs.gpkg"], "has no CRS"),
    (["--only-new"], "add --existing FILE"),
    (["--existing", "{tmp}/osm.geojson", "--no-footprints"], "needs GeoTIFF input with --footprints"),
])
def test_bad_existing_input_is_one_line_and_nothing_is_written(tmp_path, capsys, args, message):
    from conftest import write_tiny_checkpoint

    write_rgb(tmp_path / "s.tif", houses())
    ckpt = write_tiny_checkpoint(tmp_path / "m.pt")
    frame([box(0, 0, 1, 1)], crs="EPSG:4326").to_file(tmp_path / "osm.geojson")
    with warnings.catch_warnings():  # pyogrio warns that the file gets no CRS: that is the point
        warnings.simplefilter("ignore")
        frame([box(0, 0, 1, 1)], crs=None).to_file(tmp_path / "nocrs.gpkg")  # (a GeoJSON is always WGS84 to GDAL)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    footprints = [] if "--no-footprints" in args else ["--footprints", str(tmp_path / "b.gpkg")]
    args = [a for a in args if a != "--no-footprints"]
    code = main(["predict", "--checkpoint", str(ckpt), "--data", str(tmp_path / "s.tif"), "--out", str(tmp_path / "o.tif"),
                 "--engine", "torch", "--no-progress", *footprints, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message.replace("{tmp}", str(tmp_path)) in err[0], err
    assert not (tmp_path / "o.tif").exists() and not (tmp_path / "b.gpkg").exists()


def test_predict_existing_end_to_end(tmp_path, capsys):
    """The CLI path: a GeoTIFF, its footprints and an OSM-like layer in EPSG:4326."""
    from buildseg.runtime.checkpoint import load_checkpoint, save_atomic
    from conftest import write_tiny_checkpoint

    src = write_rgb(tmp_path / "s.tif", houses())
    ckpt = write_tiny_checkpoint(tmp_path / "m.pt")
    payload = load_checkpoint(ckpt)
    payload["postprocess"] = {"threshold": 0.0, "min_area": 0}  # everything is building: one big footprint
    save_atomic({k: v for k, v in payload.items() if k not in ("format", "schema")}, ckpt)
    frame([box(500010, 4099990, 500020, 4099980)]).to_crs("EPSG:4326").to_file(tmp_path / "osm.geojson")
    code = main(["predict", "--checkpoint", str(ckpt), "--data", str(src), "--out", str(tmp_path / "o.tif"), "--engine",
                 "torch", "--no-progress", "--footprints", str(tmp_path / "b.gpkg"), "--existing", str(tmp_path / "osm.geojson")])
    assert code == 0
    out = capsys.readouterr().out
    # one footprint over the whole scene: the small mapped house inside covers 0.6% of it (new),
    # and the house is covered by the prediction (not unconfirmed)
    assert "1 new, 0 already mapped, 0 mapped buildings unconfirmed" in out
    assert set(read_layer(tmp_path / "b.gpkg")["status"]) == {"new"}
    assert (tmp_path / "b_new.geojson").is_file() and (tmp_path / "b_unconfirmed.gpkg").is_file()
    import pyogrio  # GDAL's OGR, what ogrinfo reads: the editors' file opens, in EPSG:4326, with both fields

    info = pyogrio.read_info(tmp_path / "b_new.geojson")
    assert info["driver"] == "GeoJSON" and info["crs"] == "EPSG:4326" and info["features"] == 1
    assert {"building", "confidence"} <= set(info["fields"])
    editor = pyogrio.read_dataframe(tmp_path / "b_new.geojson")
    assert (editor["building"] == "yes").all() and editor["confidence"].notna().all()


@pytest.mark.slow
def test_many_scenes_conflate_the_merged_layer_within_the_scenes(tmp_path, capsys):
    from buildseg.runtime.checkpoint import load_checkpoint, save_atomic
    from conftest import write_tiny_checkpoint

    folder = tmp_path / "scenes"
    folder.mkdir()
    for k in range(2):
        write_rgb(folder / f"tile_{k}.tif", houses(seed=k), origin=(500000.0 + 128 * k, 4100000.0))
    ckpt = write_tiny_checkpoint(tmp_path / "m.pt")
    payload = load_checkpoint(ckpt)
    payload["postprocess"] = {"threshold": 0.0, "min_area": 0}  # each scene: one footprint over all of it
    save_atomic({k: v for k, v in payload.items() if k not in ("format", "schema")}, ckpt)
    # tile_0 is mapped as one building; a mapped building far away is outside every scene
    mapped = frame([box(500000, 4099872, 500128, 4100000), box(600000, 4000000, 600010, 4000010)]).to_crs("EPSG:4326")
    mapped.to_file(tmp_path / "osm.geojson")
    code = main(["predict", "--checkpoint", str(ckpt), "--data", str(folder), "--out", str(tmp_path / "out"), "--engine",
                 "torch", "--no-progress", "--block", "128", "--window", "128", "--existing", str(tmp_path / "osm.geojson")])
    assert code == 0
    merged = read_layer(tmp_path / "out" / "footprints.gpkg")
    assert sorted(merged["status"]) == ["mapped", "new"]
    assert merged.loc[merged["status"] == "mapped", "source"].tolist() == ["tile_0.tif"]
    assert len(gpd.read_file(tmp_path / "out" / "footprints_unconfirmed.gpkg")) == 0
    assert "1 new, 1 already mapped, 0 mapped buildings unconfirmed" in capsys.readouterr().out
