"""``--precision auto`` by measurement: the allowed candidates, the fastest wins, the choice is
cached per machine and model, and a Segmenter uses the engines it timed. Timings are injected:
tests never measure time."""

from __future__ import annotations

import pytest
import torch

from buildseg.inference.core import engines, precision_choice
from buildseg.inference.core.segmenter import Segmenter
from buildseg.models import ModelCard, build_model
from buildseg.runtime import device as device_rules


def tiny():
    torch.manual_seed(0)
    return build_model(ModelCard(encoder="resnet18", decoder_channels=[16, 16, 8, 8, 8], deep_supervision=False,
                                 ds_ensemble=False))


@pytest.mark.parametrize("bf16, int8, expected", [(False, False, ["fp32"]), (True, False, ["fp32", "bf16"]),
                                                   (False, True, ["fp32", "int8"]), (True, True, ["fp32", "bf16", "int8"])])
def test_the_candidates_follow_the_cpu_and_the_int8_verdict(monkeypatch, tmp_path, bf16, int8, expected):
    monkeypatch.setattr(device_rules, "cpu_has_native_bf16", lambda: bf16)
    monkeypatch.setattr(engines, "int8_verdict", lambda m, c: {"accepted": int8, "reason": "lost 0.02"})
    monkeypatch.setattr(engines, "find_int8", lambda m, c: tmp_path / "m.xml")
    allowed, notes = precision_choice.candidates("openvino", [tiny()], [None])
    assert allowed == expected
    assert ("refused (lost 0.02)" in notes) == (not int8)
    assert precision_choice.candidates("onnxruntime", [tiny()], [None])[0] == ["fp32"]


def test_the_fastest_candidate_wins_and_the_choice_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("BUILDSEG_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setattr(device_rules, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(engines, "int8_verdict", lambda m, c: {"accepted": True})
    monkeypatch.setattr(engines, "find_int8", lambda m, c: tmp_path / "m.xml")
    rates = {"fp32": 50.0, "bf16": 120.0, "int8": 140.0}
    built = []

    def build(precision):
        built.append(precision)
        return [precision]  # the "engine" is its name: the timer reads it

    model = tiny()
    choice, why = precision_choice.measured_precision("openvino", [model], [None], build=build,
                                                      timer=lambda run, chans: rates[run])
    assert choice == "int8" and built == ["fp32", "bf16", "int8"] and "measured now" in why
    assert (tmp_path / precision_choice.CHOICE_FILE).is_file()
    rates.update(int8=1.0)  # a second run reads the cache: no build, no timing
    again, why = precision_choice.measured_precision("openvino", [model], [None], build=build,
                                                     timer=lambda run, chans: pytest.fail("timed again"))
    assert again == "int8" and built == ["fp32", "bf16", "int8"] and "before" in why
    monkeypatch.setattr(precision_choice, "cpu_signature", lambda: "another-cpu")  # another machine measures anew
    third, _ = precision_choice.measured_precision("openvino", [model], [None], build=build,
                                                   timer=lambda run, chans: rates[run])
    assert third == "bf16"


def test_one_candidate_is_not_timed(monkeypatch):
    monkeypatch.setattr(device_rules, "cpu_has_native_bf16", lambda: False)
    choice, why = precision_choice.measured_precision("torch", [tiny()], [None], build=lambda p: pytest.fail("built"),
                                                      timer=lambda run, chans: pytest.fail("timed"))
    assert choice == "fp32" and "only candidate" in why


def test_a_segmenter_on_auto_uses_the_measured_choice_and_its_engines(monkeypatch, tmp_path):
    monkeypatch.setenv("BUILDSEG_PRECISION_AUTO", "measure")
    monkeypatch.setenv("BUILDSEG_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setattr(device_rules, "cpu_has_native_bf16", lambda: True)
    timed = []

    def fake_timer(run, chans):
        timed.append(run)
        return 10.0 if len(timed) == 1 else 5.0  # fp32 first: the faster here

    monkeypatch.setattr(precision_choice, "time_engine", fake_timer)
    seg = Segmenter([tiny()], device="cpu", precision="auto", engine="torch")
    assert seg.precision == "fp32" and len(timed) == 2
    assert seg.runners[0] is timed[0]  # the timed fp32 engine is the one used, not rebuilt
    assert seg.predict(torch.zeros(64, 64, 3, dtype=torch.uint8).numpy()).shape == (64, 64)


def test_time_engine_counts_tiles_per_second():
    calls = []
    rate = precision_choice.time_engine(lambda batch: calls.append(batch.shape), 3)
    assert rate > 0 and len(calls) == 1 + precision_choice.TIMING_CALLS
    assert calls[0] == (precision_choice.TIMING_BATCH, 3, precision_choice.TIMING_SIZE, precision_choice.TIMING_SIZE)
