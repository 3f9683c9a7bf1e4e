"""Every command that takes a model takes the packaged one by name (``--model buildings``) and the
same weights as a checkpoint path (``--checkpoint .../buildings.safetensors``), and gives the same
result both ways: a path that accepts one spelling and not the other fails here (the service
path once lost ``--model`` when its settings were copied)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from buildseg.cli import main
from buildseg.runtime import packaged
from test_tile_service import service  # noqa: F401 - the local tile server, for the service command

gpd = pytest.importorskip("geopandas")
rasterio = pytest.importorskip("rasterio")

def spellings() -> dict[str, list[str]]:
    """The packaged model by name, and the same weights as a checkpoint path (in the zoo in use)."""
    return {"model": ["--model", packaged.DEFAULT_MODEL],
            "checkpoint": ["--checkpoint", str(packaged.ZOO / f"{packaged.DEFAULT_MODEL}.safetensors")]}
FAST = ["--engine", "torch", "--precision", "fp32", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, synth_data) -> dict:
    """Tiny inputs of every kind: tiles, one GeoTIFF, a folder of two scenes."""
    from buildseg.data.synth_geo import write_geo_scene

    root = tmp_path_factory.mktemp("inputs")
    (root / "scenes").mkdir()
    for k in range(2):
        write_geo_scene(root / "scenes" / f"s{k}.tif", root / f"s{k}.geojson", size=192, seed=k,
                        origin=(500000.0 + 200 * k, 4100000.0))
    return {"csv": synth_data / "test.csv", "truth": synth_data / "test_truth.csv", "train": synth_data / "train.csv",
            "tif": root / "scenes" / "s0.tif", "scenes": root / "scenes"}


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def _read(path: Path):
    """What a command wrote, comparable across the two spellings."""
    if path.suffix == ".csv":
        return path.read_text()
    if path.suffix == ".tif":
        with rasterio.open(path) as src:
            return src.read().tobytes()
    if path.is_dir() and (path / "footprints.gpkg").is_file():
        frame = gpd.read_file(path / "footprints.gpkg")
        return sorted(round(a, 3) for a in frame.geometry.area)
    if path.is_dir() and (path / "best.pt").is_file():
        from buildseg.runtime.checkpoint import load_checkpoint

        return load_checkpoint(path / "best.pt").get("postprocess")
    return path.exists()


# command -> (argv after the spelling, the output compared); {x} names come from ``inputs``/``tmp``
COMMANDS = {
    "predict tiles": (["predict", "--data", "{csv}", "--out", "{out}/sub.csv", *FAST], "sub.csv"),
    "predict geotiff": (["predict", "--data", "{tif}", "--out", "{out}/mask.tif", *FAST], "mask.tif"),
    "predict scenes": (["predict", "--data", "{scenes}", "--out", "{out}/many", *FAST], "many"),
    "predict --shard": (["predict", "--data", "{scenes}", "--out", "{out}/many", "--shard", "0/1", *FAST], "many"),
    "predict --runner ray": (["predict", "--data", "{scenes}", "--out", "{out}/many", "--runner", "ray",
                             "--ray-workers", "1", *FAST], "many"),
    "predict service": (["predict", "--data", "{url}", "--aoi", "{aoi}", "--zoom", "19", "--out", "{out}/area",
                         "--tile-cache", "{out}/cache", *FAST], "area"),
    "export deepness": (["export", "--onnx", "{out}/m.onnx", "--format", "deepness", "--tile-size", "128"], "m.onnx"),
    "tune --out": (["tune", "--data", "{truth}", "--tile", "64", "--out", "{out}/tuned", "--engine", "torch"], "tuned"),
    "adapt": (["adapt", "--data", "{csv}", "--out", "{out}/adapted", "--steps", "1", "--batch-size", "2", "--crop",
               "64", "--device", "cpu", "--no-progress"], "adapted?"),
    "quantize": (["quantize", "--data", "{truth}", "--n-tiles", "4", "--tile", "64"], None),
    "train --init": (["train", "--data", "{train}", "--out", "{out}/run", "--few-steps", "1", "--no-few-check",
                      "--batch-size", "2", "--crop-size", "64", "--num-workers", "0", "--precision", "fp32",
                      "--device", "cpu", "--no-progress"], "run?"),
}
SLOW = {"predict --runner ray", "export deepness", "quantize", "adapt", "train --init", "predict service"}
# in-process commands whose cost is the network's (an ONNX export, NNCF): a small network packaged under the same
# name in a private zoo walks the same resolution path in seconds; the others use the shipped model
SMALL_NETWORK = {"export deepness", "quantize"}


@pytest.fixture()
def small_buildings(tmp_path, monkeypatch):
    """A private zoo whose ``buildings`` is a small untrained network (same name, same path)."""
    from buildseg.runtime.checkpoint import load_checkpoint
    from conftest import write_tiny_checkpoint

    monkeypatch.setattr(packaged, "ZOO", tmp_path / "zoo")
    payload = load_checkpoint(write_tiny_checkpoint(tmp_path / "small.pt"))
    payload["input"] = {"gsd": 0.5, "bands": None}
    packaged.write_model(payload, name=packaged.DEFAULT_MODEL, version="0.0", sources=[{"name": "none", "terms": "none"}],
                         quality={}, recipe="tests", code_version="test")


@pytest.mark.parametrize("command", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in COMMANDS])
def test_every_command_takes_the_packaged_model_by_name_and_as_a_checkpoint(command, inputs, tmp_path, request,
                                                                            monkeypatch):
    argv, output = COMMANDS[command]
    names = {k: str(v) for k, v in inputs.items()}
    if command == "predict --runner ray":
        request.getfixturevalue("local_ray")
    if command == "predict service":
        from test_tile_service import COLS, ROWS, tile_bounds, write_aoi

        template, _ = request.getfixturevalue("service")
        names.update(url=template, aoi=str(write_aoi(tmp_path / "aoi.geojson", tile_bounds(0, 0, COLS, ROWS), "EPSG:4326")))
    if command == "quantize":
        monkeypatch.setenv("BUILDSEG_ENGINE_CACHE", str(tmp_path / "engines"))
    if command in SMALL_NETWORK:
        request.getfixturevalue("small_buildings")
    results = {}
    for spelling, flag in spellings().items():
        out = tmp_path / spelling
        out.mkdir()
        args = [a.format(out=out, **names) if "{" in a and not a.startswith("http") else a for a in argv]
        if command == "predict service":
            args = [names["url"] if a == "{url}" else a for a in args]
        if command == "train --init":
            flag = ["--init", flag[1]]
        code = main([args[0], *flag, *args[1:]])
        assert code == 0, f"{command} with {' '.join(flag)} failed"
        if output:
            name = output.rstrip("?")  # NAME?: only that it was written
            results[spelling] = (out / name).exists() if output.endswith("?") else _read(out / name)
    if command == "quantize":
        verdicts = list((tmp_path / "engines").glob("*.json"))
        assert verdicts and json.loads(verdicts[0].read_text())["n_calibration"] == 4
    if results:
        assert results["model"] == results["checkpoint"] and results["model"], results


def test_the_packaged_model_from_python(synth_data):
    """``Segmenter.from_model(NAME)``: the notebook's one call, the same network as --model."""
    from buildseg.errors import BuildsegError
    from buildseg.formats.images import read_rgb
    from buildseg.formats.tables import load_records
    from buildseg.inference.core.segmenter import Segmenter

    image = read_rgb(load_records(synth_data / "test.csv")[0].image_path)
    by_name = Segmenter.from_model("buildings", engine="torch", precision="fp32", device="cpu")
    by_spec = Segmenter.from_checkpoint("model:buildings", engine="torch", precision="fp32", device="cpu")
    assert np.array_equal(by_name.predict(image), by_spec.predict(image))
    assert by_name.input.get("gsd") == packaged.find("buildings").input.get("gsd")
    with pytest.raises(BuildsegError, match="unknown packaged model 'nope'"):
        Segmenter.from_model("nope")


def test_copied_settings_keep_the_packaged_model():
    """Resolving --model is idempotent: a copy of resolved settings (``dataclasses.replace``)
    is the same choice, not '--checkpoint and --model'; a user's two choices still fail."""
    from dataclasses import replace

    from buildseg.errors import BuildsegError
    from buildseg.settings.predict import PredictSettings

    settings = PredictSettings(model="buildings", data="d.csv", out="o.csv")
    copy = replace(settings, native_resolution=True)
    assert copy.checkpoint == ["model:buildings"] and copy.model == "buildings"
    with pytest.raises(BuildsegError, match="not both"):
        PredictSettings(model="buildings", checkpoint=["x.pt"], data="d.csv", out="o.csv")


def test_a_script_pins_the_packaged_models_version(synth_data, tmp_path, capsys):
    """``--model buildings@VERSION`` is the current model when its version matches; another
    version is one line naming the installed ones, before any data is read."""
    version = packaged.find("buildings").version
    assert packaged.find(f"buildings@{version}").sha256 == packaged.find("buildings").sha256
    args = ["predict", "--data", str(synth_data / "test.csv"), *FAST]
    assert main([*args[:1], "--model", f"buildings@{version}", *args[1:], "--out", str(tmp_path / "a.csv")]) == 0
    assert main([*args[:1], "--model", "buildings", *args[1:], "--out", str(tmp_path / "b.csv")]) == 0
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    capsys.readouterr()
    assert main([*args[:1], "--model", "buildings@0.1", *args[1:], "--out", str(tmp_path / "c.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"version 0.1 is not installed (installed: {version}, 1.0)" in err[0]
    assert not (tmp_path / "c.csv").exists()
