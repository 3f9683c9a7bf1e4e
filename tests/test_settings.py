"""Every command's settings object against the flags generated from it and the generated
docs: one declaration per default, choice list and range; the same one-line errors from the
CLI and from Python; a missing optional package is one line."""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields

import pytest

from buildseg.cli import build_parser, commands, main
from buildseg.errors import BuildsegError
from buildseg.settings.fields import flag_of, spec_of


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _all_settings():
    from buildseg.adaptation.settings import AdaptSettings

    for name, (cls, _) in commands().items():
        yield name, cls
        if name == "adapt":
            yield name, AdaptSettings


@pytest.mark.parametrize("command, cls", list(_all_settings()), ids=lambda v: getattr(v, "__name__", v))
def test_every_settings_field_is_a_flag_with_the_same_default_and_choices(command, cls):
    actions = {a.dest: a for a in _subparsers()[command]._actions}
    for f in fields(cls):
        spec = spec_of(f)
        action = actions[f.name]
        assert flag_of(f) in action.option_strings
        assert action.default == (None if f.default is MISSING else f.default)
        assert (list(action.choices) if action.choices else None) == (list(spec.choices) if spec.choices else None)
        assert spec.help in action.help


def test_the_generated_docs_are_current():
    from buildseg.cli_docs import PAGE, page_with_tables

    text = PAGE.read_text(encoding="utf-8")
    assert page_with_tables(text) == text, "docs/cli.md is stale: run python -m buildseg.cli_docs --write"


def test_a_range_fails_alike_from_python_and_from_the_command_line(capsys):
    from buildseg.settings.predict import PredictSettings

    with pytest.raises(BuildsegError, match=r"--overlap 2 is out of range; expected >= 0 and < 1"):
        PredictSettings(checkpoint=["m.pt"], data="d.csv", out="o.csv", overlap=2)
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--checkpoint", "m.pt", "--data", "d.csv", "--out", "o.csv", "--overlap", "2"])
    assert exit_info.value.code == 2
    assert "--overlap: 2 is out of range; expected >= 0 and < 1" in capsys.readouterr().err


def test_cross_field_rules_live_in_the_settings():
    from buildseg.adaptation.settings import AdaptSettings
    from buildseg.settings.models import ExportSettings

    with pytest.raises(BuildsegError, match="--low 0.8 must be below --high 0.7"):
        AdaptSettings(low=0.8, high=0.7)
    with pytest.raises(BuildsegError, match="--gsd applies to --format deepness"):
        ExportSettings(checkpoint="m.pt", onnx="m.onnx", gsd=0.5)


def test_no_literal_default_in_cli():
    """cli.py declares no default: every add_argument comes from a settings object."""
    from pathlib import Path

    import buildseg.cli

    text = Path(buildseg.cli.__file__).read_text(encoding="utf-8")
    assert "default=" not in text.replace('"--verbose", action="store_true"', "")


@pytest.mark.parametrize("module, argv", [
    ("onnx", ["export", "--checkpoint", "CKPT", "--onnx", "OUT", "--format", "deepness", "--gsd", "0.5"]),
    ("rasterio", ["predict", "--checkpoint", "CKPT", "--data", "scene.tif", "--out", "mask.tif"]),
])
def test_a_missing_optional_package_is_one_line_naming_the_extra(module, argv, tmp_path, monkeypatch, capsys):
    from conftest import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "m.pt")
    (tmp_path / "scene.tif").write_bytes(b"II*\x00")  # a .tif that exists: the GeoTIFF path is taken
    argv = [str(ckpt) if a == "CKPT" else str(tmp_path / a) if a in ("OUT", "scene.tif", "mask.tif") else a for a in argv]
    monkeypatch.setitem(sys.modules, module, None)  # import fails with ModuleNotFoundError, as when not installed
    for name in [m for m in sys.modules if m.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pip install 'buildseg[{'onnx' if module == 'onnx' else 'geo'}]'" in err[0], err
    assert not (tmp_path / "OUT").exists() and not (tmp_path / "mask.tif").exists()
