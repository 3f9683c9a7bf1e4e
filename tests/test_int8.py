"""int8 without an extra step: made at the end of training, accepted or refused by the Dice
rule, used by ``--precision auto`` only on CPUs without native bf16; ``buildseg quantize``
for older runs; OpenVINO's throughput mode gives the latency mode's probabilities."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from buildseg.cli import main
from buildseg.formats.images import read_rgb
from buildseg.formats.tables import load_records
from buildseg.inference.core import engines, payoff
from buildseg.inference.core.segmenter import Segmenter
from buildseg.inference.jobs import first_int8
from buildseg.inference.jobs import quantize as quantize_mod
from buildseg.runtime import device as device_rules
from buildseg.runtime.checkpoint import load_model, save_atomic
from conftest import write_tiny_checkpoint

pytest.importorskip("openvino")
pytest.importorskip("nncf")
TINY = ["--encoder", "resnet18", "--weights", "none", "--epochs", "2", "--crop-size", "64", "--val-tile", "64",
        "--crops-per-image", "2", "--decoder-channels", "32", "16", "16", "16", "8", "--precision", "fp32",
        "--num-workers", "0", "--no-progress", "--lr", "3e-3", "--warmup-steps", "1"]


def _no_bf16(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(device_rules, "cpu_has_native_bf16", lambda: native)


@pytest.fixture(autouse=True)
def _int8_beside_the_checkpoint(monkeypatch):
    monkeypatch.delenv("BUILDSEG_ENGINE_CACHE", raising=False)  # each test's graphs and int8 models in its own folder


@pytest.mark.slow
def test_train_makes_an_accepted_int8_model_that_auto_uses_only_without_bf16(synth_data, tmp_path, monkeypatch, capsys):
    from buildseg import pipeline

    monkeypatch.setattr(pipeline, "INT8_SHARE", 1e6)  # a seconds-long test run stands for a long one here
    monkeypatch.setattr(pipeline, "INT8_MIN_S", 0.0)
    run = tmp_path / "run"
    assert main(["train", "--data", str(synth_data / "train.csv"), "--out", str(run), *TINY]) == 0
    assert "int8 model (end of training" in capsys.readouterr().out
    (verdict_file,) = (run / "int8").glob("*.json")
    verdict = json.loads(verdict_file.read_text())
    assert verdict["accepted"] and abs(verdict["dice_int8"] - verdict["dice_fp32"]) <= quantize_mod.MAX_DROP
    assert verdict_file.with_suffix(".xml").is_file() and verdict_file.with_suffix(".bin").is_file()
    assert verdict["n_calibration"] > 0 and verdict["n_validation"] > 0
    _no_bf16(monkeypatch, False)  # an AVX2 / AVX-512 CPU without bf16
    seg = Segmenter.from_checkpoint(run, device="cpu", engine="auto")
    assert (seg.engine, seg.precision) == ("openvino", "int8")
    assert Segmenter.from_checkpoint(run, device="cpu", engine="torch").precision == "fp32"  # torch has no int8
    _no_bf16(monkeypatch, True)  # AMX / AVX512-BF16: bf16 stays the fast path
    assert Segmenter.from_checkpoint(run, device="cpu", engine="auto").precision == "bf16"
    _no_bf16(monkeypatch, False)
    out = tmp_path / "sub.csv"
    assert main(["predict", "--checkpoint", str(run), "--data", str(synth_data / "test.csv"), "--out", str(out),
                 "--device", "cpu", "--profile"]) == 0
    assert "precision int8" in capsys.readouterr().out and out.is_file()


def _scores(monkeypatch, values):
    """Replace the Dice function by one returning ``values`` in turn (fp32, plain int8, ...)."""
    sequence = iter(values)
    monkeypatch.setattr(quantize_mod, "tile_dice", lambda post, deadline=None: lambda compiled, tiles: next(sequence))


def _tiles(n: int = 6, side: int = 64):
    rng = np.random.default_rng(0)
    return [(rng.integers(0, 256, (1, 3, side, side)).astype(np.float32),
             (rng.random((side, side)) > 0.7).astype(np.uint8)) for _ in range(n)]


@pytest.mark.slow
def test_int8_that_loses_too_much_is_refused_and_not_used(tmp_path, monkeypatch):
    """Plain int8 loses 0.4 Dice; accuracy control (here unable to restore it) still loses
    0.3: refused, the model not kept, the verdict says why, auto predicts fp32."""
    import nncf

    ckpt = write_tiny_checkpoint(tmp_path / "m.pt", seed=6)
    _scores(monkeypatch, [0.9, 0.5, 0.6])
    controlled = []
    monkeypatch.setattr(nncf, "quantize_with_accuracy_control",
                        lambda model, *args, **kwargs: controlled.append(kwargs["max_drop"]) or model)
    tiles = _tiles()
    verdict = quantize_mod.calibrate_int8(ckpt, calibration=[t[0] for t in tiles], validation=tiles)
    assert controlled == [quantize_mod.MAX_DROP] and verdict.accuracy_control
    assert not verdict.accepted and verdict.dice_plain_int8 == 0.5 and verdict.dice_int8 == 0.6
    assert verdict.path is None and not list((tmp_path / "int8").glob("*.xml"))
    assert not json.loads(next((tmp_path / "int8").glob("*.json")).read_text())["accepted"]
    _no_bf16(monkeypatch, False)
    seg = Segmenter.from_checkpoint(ckpt, device="cpu", engine="openvino")
    assert seg.precision == "fp32"
    with pytest.raises(Exception, match="buildseg quantize"):  # nothing to run int8 with
        Segmenter.from_checkpoint(ckpt, device="cpu", engine="openvino", precision="int8")


@pytest.mark.slow
def test_the_time_cap_stops_calibration_and_refuses(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "m.pt", seed=7)
    tiles = _tiles(2)
    verdict = quantize_mod.calibrate_int8(ckpt, calibration=[t[0] for t in tiles], validation=tiles, time_limit=1e-9)
    assert not verdict.accepted and "time cap" in verdict.reason and verdict.path is None
    assert not list((tmp_path / "int8").glob("*.xml"))


@pytest.mark.slow
def test_quantize_command_keeps_its_model_and_the_verdict_reaches_auto(synth_data, tmp_path, monkeypatch, capsys):
    """``buildseg quantize`` for a checkpoint made elsewhere: the int8 model lands with the
    checkpoint, follows fp32, and auto uses it when accepted (here: judged within 0.005)."""
    ckpt = write_tiny_checkpoint(tmp_path / "m.pt", seed=5)
    with pytest.raises(Exception, match="buildseg quantize"):
        Segmenter.from_checkpoint(ckpt, device="cpu", precision="int8", engine="openvino")
    assert main(["quantize", "--checkpoint", str(ckpt), "--data", str(synth_data / "test_truth.csv"),
                 "--n-tiles", "12", "--tile", "64"]) == 0
    printed = capsys.readouterr().out
    assert "calibrated on 12 tiles" in printed and "for --precision auto" in printed
    int8 = Segmenter.from_checkpoint(ckpt, device="cpu", precision="int8", engine="openvino")
    fp32 = Segmenter.from_checkpoint(ckpt, device="cpu", precision="fp32", engine="torch")
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    assert np.abs(int8.probabilities(image).mean[0, 0] - fp32.probabilities(image).mean[0, 0]).mean() < 0.02
    verdict = json.loads(next((tmp_path / "int8").glob("*.json")).read_text())
    _no_bf16(monkeypatch, False)
    auto = Segmenter.from_checkpoint(ckpt, device="cpu", engine="auto")
    assert auto.precision == ("int8" if verdict["accepted"] else "fp32")


@pytest.mark.slow
def test_quantize_falls_back_to_accuracy_control_when_int8_loses_too_much(tmp_path, synth_data, monkeypatch):
    """Plain int8 that loses more than max_drop is redone with NNCF's real accuracy control,
    whose validation function is the tile Dice; the int8 model that lands is the controlled one."""
    ckpt = write_tiny_checkpoint(tmp_path / "m.pt", seed=6)
    real = quantize_mod.tile_dice
    calls = []

    def first_two_faked(post, deadline=None):
        score = real(post, deadline)
        return lambda compiled, tiles: calls.append(1) or ([0.9, 0.5][len(calls) - 1] if len(calls) <= 2
                                                           else score(compiled, tiles))

    monkeypatch.setattr(quantize_mod, "tile_dice", first_two_faked)
    verdict = quantize_mod.quantize(ckpt, synth_data / "test_truth.csv", n_tiles=8, tile=64, max_drop=0.01)
    assert verdict.accuracy_control and verdict.dice_plain_int8 == 0.5 and len(calls) > 3
    assert verdict.path is not None and 0.0 <= verdict.dice_int8 <= 1.0  # kept: a user asked for it
    int8 = Segmenter.from_checkpoint(ckpt, device="cpu", precision="int8", engine="openvino")
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert int8.probabilities(image).mean[0, 0].shape == (64, 64)


def test_the_end_of_training_int8_step_is_left_out_of_a_short_run(trained_run, caplog):
    """A quarter of a 40 s run is less than a calibration takes: no step, one line saying why
    and what makes one later; the time cap is that quarter otherwise."""
    import logging

    from buildseg.config import Config
    from buildseg.pipeline import quantize_best

    with caplog.at_level(logging.INFO, logger="buildseg"):
        assert quantize_best(Config(), trained_run, train_set=[1], val_set=[1], train_seconds=40.0) is None
    assert "int8 at the end of training skipped: the run took 40 s" in caplog.text and "buildseg quantize" in caplog.text


def test_a_run_without_the_cpu_extra_trains_and_predicts_as_before(trained_run, tmp_path, monkeypatch):
    """No openvino/nncf: the end-of-training int8 step is skipped, auto predicts with torch."""
    from buildseg.config import Config
    from buildseg.pipeline import quantize_best

    monkeypatch.setattr("buildseg.extras.installed", lambda module: False)
    assert quantize_best(Config(), trained_run, train_set=[1], val_set=[1]) is None
    _no_bf16(monkeypatch, False)
    seg = Segmenter.from_checkpoint(trained_run, device="cpu", engine="auto")
    assert (seg.engine, seg.precision) == ("torch", "fp32")
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert seg.predict(image).shape == (64, 64)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("modes") / "m.pt", seed=8)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32"])  # bf16 shares the code path (and is emulated, slowly, off AMX)
def test_openvino_throughput_mode_gives_the_latency_modes_probabilities(tiny_checkpoint, precision):
    ckpt = tiny_checkpoint
    modes = {mode: Segmenter.from_checkpoint(ckpt, device="cpu", precision=precision, engine="openvino",
                                             engine_mode=mode) for mode in ("latency", "throughput")}
    rng = np.random.default_rng(2)
    for shape in ((5, 3, 64, 96), (1, 3, 64, 64), (3, 3, 40, 72)):  # odd batch sizes split over the streams
        batch = torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8))
        np.testing.assert_allclose(modes["throughput"].probabilities(batch).mean,
                                   modes["latency"].probabilities(batch).mean, atol=1e-5 if precision == "fp32" else 1e-2)


def test_engine_mode_auto_follows_the_measured_core_counts():
    for cores, mode in engines.MEASURED_MODES.items():
        assert engines.openvino_mode("auto", cores) == mode
    assert engines.openvino_mode("throughput", 2) == "throughput"
    with pytest.raises(Exception, match="latency, throughput"):
        engines.openvino_mode("fast")


def _drawing_checkpoint(path, image: np.ndarray):
    """An untrained tiny model whose threshold is its median probability on ``image``: it draws
    buildings, so int8 has masks to agree with."""
    ckpt = write_tiny_checkpoint(path, seed=5)
    probs = Segmenter.from_checkpoint(ckpt, device="cpu", precision="fp32", engine="torch").probabilities(image).mean
    payload = torch.load(ckpt, weights_only=True)
    payload["postprocess"] = {"threshold": float(np.median(probs)), "min_area": 0}
    save_atomic(payload, ckpt)
    return ckpt


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tiles", "geotiff"])
def test_a_model_without_int8_gets_one_from_the_input_at_first_use_judged_against_fp32(synth_data, tmp_path,
                                                                                        monkeypatch, kind):
    """``predict --precision auto``, no labels and no int8 model yet (a packaged model, a run
    trained without it): int8 is calibrated on half of the sampled input tiles and judged on
    the other half against fp32's own masks; once; then auto times it with the others."""
    from buildseg.data.synth_geo import write_geo_scene
    from buildseg.inference.core import precision_choice

    monkeypatch.setenv("BUILDSEG_PRECISION_AUTO", "measure")
    _no_bf16(monkeypatch, False)
    monkeypatch.setattr(first_int8, "FIRST_USE_TILES", 8)  # small and quick; the flow is the same
    monkeypatch.setattr(first_int8, "AGREEMENT_DROP", 0.5)  # plain int8 of a random model; accuracy control: above
    monkeypatch.setattr(precision_choice, "TIMING_SIZE", 64)
    monkeypatch.setattr(precision_choice, "TIMING_CALLS", 1)
    monkeypatch.setattr(payoff, "projected_saving", lambda *a, **k: 1e6)  # a job large enough to repay both steps
    if kind == "tiles":
        data, first = synth_data / "test.csv", read_rgb(load_records(synth_data / "test.csv")[0].image_path)
        expected = 4  # 8 of the 12 test tiles, half and half
    else:
        rasterio = pytest.importorskip("rasterio")
        data = tmp_path / "scene.tif"
        write_geo_scene(data, tmp_path / "scene.geojson", size=600, seed=3)
        with rasterio.open(data) as src:
            first = src.read().transpose(1, 2, 0)[:224, :224].copy()
        expected = 4  # 8 windows of the scene, half and half
    ckpt = _drawing_checkpoint(tmp_path / "run" / "best.pt", first)
    calls = []
    real = first_int8.calibrate_on_images
    monkeypatch.setattr(first_int8, "calibrate_on_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    suffix = ".csv" if kind == "tiles" else ".tif"
    args = ["predict", "--checkpoint", str(ckpt), "--data", str(data), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / f"a{suffix}")]) == 0
    verdict = json.loads(next((tmp_path / "run" / "int8").glob("*.json")).read_text())
    assert verdict["truth"] == "fp32 masks" and verdict["dice_fp32"] == 1.0  # fp32 against its own masks
    assert verdict["n_calibration"] == expected and verdict["n_validation"] == expected
    assert verdict["max_drop"] == first_int8.AGREEMENT_DROP
    if kind == "geotiff":
        return  # the rest does not depend on the input's kind
    assert main([*args, "--out", str(tmp_path / f"b{suffix}")]) == 0
    assert len(calls) == 1, "calibrated again although a verdict exists"
    choice = json.loads((tmp_path / "run" / ".buildseg-engines" / "precision_choice.json").read_text())
    timed = [entry["rates"] for entry in choice.values()]  # before int8 existed, and after
    assert any("int8" in rates for rates in timed) == verdict["accepted"] and all("fp32" in rates for rates in timed)


@pytest.mark.slow
def test_a_small_job_pays_for_no_export_and_no_calibration(synth_data, tmp_path, monkeypatch, caplog):
    """12 tiles cannot repay an ONNX export or an int8 calibration: the first run predicts with
    torch at its measured best precision, says why in one line, and leaves no graph, no int8
    model and no verdict behind; the same job with a graph already cached skips only int8."""
    import logging

    from buildseg.inference.core import precision_choice

    monkeypatch.setenv("BUILDSEG_PRECISION_AUTO", "measure")
    monkeypatch.setenv("BUILDSEG_ENGINE_CACHE", str(tmp_path / "engines"))
    monkeypatch.setattr(precision_choice, "TIMING_SIZE", 64)
    monkeypatch.setattr(precision_choice, "TIMING_CALLS", 1)
    first = read_rgb(load_records(synth_data / "test.csv")[0].image_path)
    ckpt = _drawing_checkpoint(tmp_path / "run" / "best.pt", first)
    args = ["predict", "--checkpoint", str(ckpt), "--data", str(synth_data / "test.csv"), "--no-progress"]
    with caplog.at_level(logging.INFO, logger="buildseg"):
        assert main([*args, "--out", str(tmp_path / "a.csv")]) == 0
    assert "ONNX export for OpenVINO: this job (~12 tiles of 224 px)" in caplog.text and "not worth it" in caplog.text
    assert not list((tmp_path / "engines").glob("*.onnx")) and not (tmp_path / "run" / "int8").exists()
    model, _ = load_model(ckpt)
    engines.cached_onnx(model, engines.cache_folder(ckpt))  # a graph from an earlier, larger job
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="buildseg"):
        assert main([*args, "--out", str(tmp_path / "b.csv")]) == 0
    assert "int8 calibration at first use: this job" in caplog.text and "not worth it" in caplog.text
    assert not (tmp_path / "run" / "int8").exists()
    assert payoff.measured_cost(tmp_path / "engines", "onnx_export") > 0  # the export's cost, for the next decision


def test_the_payoff_rule_and_the_lossy_precision_rule():
    """Saving = tiles x (1/now - 1/ceiling), never negative; a precision losing > 0.002 Dice
    stays a candidate only at >= 1.3x the best lossless one."""
    assert payoff.projected_saving(1000, rate_now=100, rate_ceiling=200) == pytest.approx(5.0)
    assert payoff.projected_saving(1000, rate_now=200, rate_ceiling=100) == 0.0
    assert payoff.decide("x", job_tiles=100, rate_now=100, rate_ceiling=300, cost_s=5).worth is False
    assert payoff.decide("x", job_tiles=60000, rate_now=100, rate_ceiling=300, cost_s=5).worth is True
    from buildseg.inference.jobs.job_size import scene_overhead

    assert scene_overhead(block=2048, margin=64, window=1024, overlap=0.25) == 2.25  # 3 windows of 1024 per 2176 px
    assert scene_overhead(block=512, margin=0, window=1024, overlap=0.25) == 1.0  # one window holds the block
    rates = {"fp32": 100.0, "bf16": 180.0, "int8": 200.0}
    assert payoff.lossy_allowed(rates, {"int8": 0.017})[0] == {"fp32", "bf16"}  # 1.11x: not clearly faster
    assert payoff.lossy_allowed(rates, {"int8": 0.001})[0] == {"fp32", "bf16", "int8"}  # lossless
    assert payoff.lossy_allowed({**rates, "int8": 240.0}, {"int8": 0.017})[0] == {"fp32", "bf16", "int8"}  # 1.33x


def test_scene_windows_for_calibration_are_read_as_the_blocks_are(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from buildseg.data.synth_geo import write_geo_scene
    from buildseg.inference.core.checkpoint_info import CheckpointInfo
    from buildseg.inference.jobs.geotiff import GeoTiffSettings, plan_scene, sample_windows

    write_geo_scene(tmp_path / "s.tif", tmp_path / "s.geojson", size=300, seed=1, nodata_border=40)
    info = CheckpointInfo.read(write_tiny_checkpoint(tmp_path / "m.pt"))
    plan = plan_scene(info, tmp_path / "s.tif", GeoTiffSettings(gsd=1.0))  # 0.5 m scene read at 1 m: 150 px
    windows = sample_windows(plan, 8, tile=64)
    assert len(windows) == 8 and all(w.shape == (1, 3, 64, 64) and w.dtype == np.float32 for w in windows)
    with rasterio.open(tmp_path / "s.tif") as src:
        assert max(float(w.max()) for w in windows) <= 255 and src.count == 3


def test_first_use_int8_is_skipped_where_auto_does_not_measure(tmp_path, monkeypatch):
    ckpt = write_tiny_checkpoint(tmp_path / "m.pt")
    monkeypatch.setattr(first_int8, "calibrate_on_images", lambda *a, **k: pytest.fail("calibrated"))
    nothing = lambda path: []  # noqa: E731
    monkeypatch.setenv("BUILDSEG_PRECISION_AUTO", "rule")
    first_int8.int8_at_first_use(ckpt, nothing, engine="auto", device="cpu")
    monkeypatch.setenv("BUILDSEG_PRECISION_AUTO", "measure")
    first_int8.int8_at_first_use(ckpt, nothing, engine="torch", device="cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    first_int8.int8_at_first_use(ckpt, nothing, engine="openvino", device="cpu")


def test_a_failing_first_use_calibration_does_not_stop_prediction(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("BUILDSEG_PRECISION_AUTO", "measure")
    ckpt = write_tiny_checkpoint(tmp_path / "m.pt")

    def broken(path):
        raise RuntimeError("NNCF could not quantize this graph")

    first_int8.int8_at_first_use(ckpt, broken, engine="openvino", device="cpu")
    assert "int8 at first use failed (RuntimeError: NNCF could not quantize this graph)" in caplog.text
    assert not (tmp_path / "int8").exists()
