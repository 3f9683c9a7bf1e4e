"""Typed configuration: values from YAML and flags are coerced to the declared types."""

import pytest

from buildseg.cli import build_parser
from buildseg.config import Config, apply_overrides, coerce, config_from_dict, flag_name, load_config, overrides_from
from buildseg.errors import BuildsegError
from buildseg.launch import without_nproc as _without_nproc


@pytest.mark.parametrize(
    "value, annotation, expected",
    [
        ("1e-3", "float", 1e-3),  # PyYAML reads 1e-3 as a string
        (1, "float", 1.0),
        ("1e3", "int", 1000),
        (20.0, "int", 20),
        ("none", "float | None", None),
        (None, "int | None", None),
        ("yes", "bool", True),
        ("off", "bool", False),
        ("32,16, 8", "list[int] | None", [32, 16, 8]),
        (["4", "2"], "list[int] | None", [4, 2]),
        ([1, 0.5], "list[float] | None", [1.0, 0.5]),
    ],
)
def test_values_are_coerced_to_the_declared_type(value, annotation, expected):
    got = coerce(value, annotation, "x.y", "test")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    "value, annotation, fragment",
    [
        ("ten", "int", "is not an integer"),
        (2.5, "int", "is not an integer"),
        (True, "int", "is not an integer"),
        ("fast", "float", "is not a number"),
        ("maybe", "bool", "true or false"),
        (32, "list[int] | None", "a list of"),
        (["a"], "list[int] | None", "a list of"),
        (3, "str", "a string"),
        (None, "int", "must not be empty"),
    ],
)
def test_wrong_types_name_key_value_and_expectation(value, annotation, fragment):
    with pytest.raises(BuildsegError) as info:
        coerce(value, annotation, "train.epochs", "run.yaml")
    assert fragment in str(info.value) and "run.yaml" in str(info.value) and "train.epochs" in str(info.value)


def test_yaml_file_values_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  epochs: 1e2\n  ema: 0.999\nmodel:\n  decoder_channels: [32, 16]\n")
    config = load_config(path)
    assert config.train.lr == 1e-3 and isinstance(config.train.lr, float)
    assert config.train.epochs == 100 and config.model.decoder_channels == [32, 16]


@pytest.mark.parametrize(
    "section, values, fragment",
    [
        ("train", {"optimizer": "adam"}, "adamw, sgd"),
        ("train", {"lr": 0}, "> 0"),
        ("train", {"device": "gpu"}, "cuda:N"),
        ("train", {"threshold": 1.0}, "between 0 and 1"),
        ("train", {"quantize_time_limit": 0}, "> 0 minutes"),
        ("model", {"dropout": 0.9}, "[0, 0.5]"),
        ("model", {"arch": "unet3"}, "smp.<Name>"),
        ("data", {"val_fraction": 1.0}, "[0, 1)"),
    ],
)
def test_value_rules(section, values, fragment):
    with pytest.raises(BuildsegError, match=None) as info:
        config_from_dict({section: values}, "c.yaml")
    assert fragment in str(info.value)


def test_flags_go_through_the_same_coercion():
    parser = build_parser()
    args = parser.parse_args(["train", "--lr", "3e-4", "--epochs", "5", "--decoder-channels", "32", "16",
                              "--ema", "none", "--deep-supervision"])
    overrides = overrides_from(args)
    config = apply_overrides(Config(), overrides, {k: flag_name(k) for k in overrides})
    assert config.train.lr == 3e-4 and config.train.epochs == 5 and config.train.ema is None
    assert config.model.decoder_channels == [32, 16] and config.model.deep_supervision is True
    args = parser.parse_args(["train", "--epochs", "five"])
    with pytest.raises(BuildsegError, match="--epochs"):
        apply_overrides(Config(), overrides_from(args), {"train.epochs": "--epochs"})


def test_the_saved_config_round_trips(tmp_path):
    config = Config()
    config.train.lr, config.model.decoder_channels = 2e-4, [8, 8]
    config.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


@pytest.mark.parametrize(
    "argv",
    [["train", "--nproc", "2", "--data", "d.csv"], ["train", "--nproc=2", "--data", "d.csv"],
     ["train", "--data", "d.csv", "--nproc", "2"]],
)
def test_nproc_is_removed_in_both_spellings(argv):
    assert _without_nproc(argv) == ["train", "--data", "d.csv"]


def test_resuming_a_run_from_before_decoder_width_keeps_its_full_width_decoder(tmp_path):
    import yaml

    from buildseg.config import Config
    from buildseg.training.setup import resume_config

    saved = Config().to_dict()
    saved["model"]["decoder_width"] = 0.5
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert resume_config(tmp_path).model.decoder_width == 0.5
    del saved["model"]["decoder_width"]  # written by an older buildseg: no decoder_width, no version
    del saved["version"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert resume_config(tmp_path).model.decoder_width == 1.0
    # --config RUN/config.yaml goes through the same migration, so it re-trains the same network
    from buildseg.config import load_config

    assert load_config(tmp_path / "config.yaml").model.decoder_width == 1.0
    # a hand-written partial config is not a saved run: its missing keys take today's defaults
    (tmp_path / "mine.yaml").write_text("model:\n  encoder: resnet18\n")
    assert load_config(tmp_path / "mine.yaml").model.decoder_width == 0.5
    # a config from a newer buildseg is refused with one line
    (tmp_path / "new.yaml").write_text("version: 99\nmodel:\n  encoder: resnet18\n")
    with pytest.raises(BuildsegError, match="newer buildseg"):
        load_config(tmp_path / "new.yaml")
