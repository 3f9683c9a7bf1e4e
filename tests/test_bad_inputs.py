"""Bad input through the real CLI: exit code 2, one line naming the file/key/value, no
traceback, and no output file left behind.

Each case builds its broken input in a fresh folder, runs ``buildseg ...`` and checks stderr
and the outputs the command would have written. One case per command and error class runs
``python -m buildseg`` in a real subprocess (:data:`SUBPROCESS`); the rest call the same
``main`` in-process with stderr and the log captured alike, which asserts the same exit
code, single error line and absence of output without paying a Python start per case.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest
import torch

from buildseg.formats import rle
from buildseg.runtime.checkpoint import FORMAT
from conftest import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _png(path: Path, size=(64, 64), channels=3, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    shape = size if channels == 1 else (*size, channels)
    cv2.imwrite(str(path), rng.integers(0, 256, shape, dtype=np.uint8))
    return path


def _csv(path: Path, header, rows, encoding="utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Good inputs that each case breaks in one way: images, CSVs, a checkpoint."""
    root = tmp_path_factory.mktemp("world")
    (root / "img").mkdir()
    rows, test_rows, truth = [], [], []
    for k in range(4):
        _png(root / "img" / f"t{k}.png", seed=k)
        mask = np.zeros((64, 64), np.uint8)
        mask[10 + k : 30, 12:40] = 1
        rows.append((f"t{k}", f"img/t{k}.png", rle.encode(mask)))
        test_rows.append((f"t{k}", f"img/t{k}.png"))
        truth.append((f"t{k}", rle.encode(mask)))
    _csv(root / "train.csv", ("img_id", "img_path", "mask_rle"), rows)
    _csv(root / "test.csv", ("img_id", "img_path"), test_rows)
    _csv(root / "truth.csv", ("img_id", "mask_rle"), truth)
    write_tiny_checkpoint(root / "model.pt")
    return {"root": root, "train": root / "train.csv", "test": root / "test.csv", "truth": root / "truth.csv",
            "ckpt": root / "model.pt"}


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "buildseg", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def run_cli_in_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``buildseg.cli.main`` in this process: its exit code, and stderr with the log and
    warnings in it (a fresh handler, as a new process would have)."""
    import contextlib
    import io
    import logging
    import warnings

    from buildseg.cli import main

    err, out = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root, saved_handlers, saved_level, saved_cwd = logging.getLogger(), logging.getLogger().handlers[:], logging.getLogger().level, os.getcwd()
    root.handlers = [handler]
    try:
        os.chdir(cwd)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse errors
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(saved_cwd)
        root.handlers, root.level = saved_handlers, saved_level
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


TRAIN_FAST = ("--encoder", "resnet18", "--weights", "none", "--epochs", "1", "--batch-size", "2", "--crop-size", "32",
              "--val-tile", "32", "--crops-per-image", "1", "--decoder-channels", "8", "8", "8", "8", "8",
              "--precision", "fp32", "--num-workers", "0", "--no-progress", "--no-tensorboard")


# -- the cases: (world, case folder) -> (argv, fragments the message must contain, paths that must not exist) --
Case = Callable[[dict, Path], tuple[list, list[str], list[Path]]]


def predict_case(data_maker: Callable[[dict, Path], Path], *extra: str, fragments: list[str]) -> Case:
    def build(w: dict, tmp: Path):
        data = data_maker(w, tmp)
        out = tmp / "sub.csv"
        return (["predict", "--checkpoint", w["ckpt"], "--data", data, "--out", out, "--no-progress",
                 "--num-workers", "0", "--masks-dir", tmp / "masks", *extra], fragments, [out, tmp / "masks"])
    return build


def csv_with(rows_maker, header=("img_id", "img_path"), encoding="utf-8"):
    def make(w: dict, tmp: Path) -> Path:
        return _csv(tmp / "data.csv", header, rows_maker(w, tmp), encoding=encoding)
    return make


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _corrupt_png(w, tmp):
    (tmp / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    return [("ok", str(w["root"] / "img" / "t0.png")), ("bad", "bad.png")]


def _truncated_png(w, tmp):
    data = (w["root"] / "img" / "t1.png").read_bytes()
    (tmp / "cut.png").write_bytes(data[: len(data) // 2])
    return [("cut", "cut.png")]


def _tiny_png(w, tmp):
    _png(tmp / "tiny.png", size=(8, 8))
    return [("tiny", "tiny.png")]


def _nan_tif(w, tmp):
    cv2.imwrite(str(tmp / "nan.tif"), np.full((64, 64, 3), np.nan, np.float32))
    return [("nan", "nan.tif")]


def _five_band_tif(w, tmp):
    rasterio = pytest.importorskip("rasterio")
    with rasterio.open(tmp / "five.tif", "w", driver="GTiff", height=64, width=64, count=5, dtype="uint8") as dst:
        dst.write(np.zeros((5, 64, 64), np.uint8))
    return [("five", "five.tif")]


def _geotiff(path: Path, size=512, corrupt=False) -> Path:
    rasterio = pytest.importorskip("rasterio")
    from rasterio.transform import from_origin

    data = np.random.default_rng(0).integers(0, 256, (3, size, size), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", height=size, width=size, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500000, 4000000, 0.5, 0.5), tiled=True, blockxsize=128, blockysize=128,
                       compress="deflate") as dst:
        dst.write(data)
    if corrupt:  # overwrite the compressed bytes of the tiles in the file's second half
        raw = bytearray(path.read_bytes())
        start = len(raw) // 2
        raw[start : start + len(raw) // 4] = b"\xff" * (len(raw) // 4)
        path.write_bytes(bytes(raw))
    return path


def geotiff_case(corrupt: bool, *extra: str, fragments: list[str], garbage: bool = False) -> Case:
    def build(w: dict, tmp: Path):
        src = tmp / "scene.tif"
        if garbage:
            src.write_bytes(b"II*\x00" + b"\x00" * 100)
        else:
            _geotiff(src, corrupt=corrupt)
        out, geojson = tmp / "mask.tif", tmp / "b.geojson"
        return (["predict", "--checkpoint", w["ckpt"], "--data", src, "--out", out, "--geojson", geojson,
                 "--block", "128", *extra], fragments, [out, geojson, tmp / ".mask.tif.tmp"])
    return build


def evaluate_case(pred_rows=None, truth=None, pred_header=("img_id", "mask_rle"), encoding="utf-8",
                  fragments=()) -> Case:
    def build(w: dict, tmp: Path):
        pred = tmp / "pred.csv"
        if pred_rows is not None:
            _csv(pred, pred_header, pred_rows, encoding=encoding)
        truth_path = w["truth"] if truth is None else tmp / truth
        return (["evaluate", "--pred", pred, "--truth", truth_path, "--shape", "64", "64"], list(fragments), [])
    return build


def train_case(yaml_text: str | None = None, *flags, data=None, fragments=(), keep_fast=True) -> Case:
    def build(w: dict, tmp: Path):
        args = ["train", "--out", tmp / "run"]
        args += ["--data", data(w, tmp) if callable(data) else w["train"]]
        if yaml_text is not None:
            (tmp / "c.yaml").write_text(yaml_text)
            args += ["--config", tmp / "c.yaml"]
        if keep_fast:
            args += list(TRAIN_FAST)
        args += [a(w, tmp) if callable(a) else a for a in flags]
        return args, list(fragments), [tmp / "run" / "last.pt", tmp / "run" / "best.pt"]
    return build


def _train_rows(mutate):
    def make(w, tmp):
        rows = [(f"t{k}", str(w["root"] / "img" / f"t{k}.png"), "1 10") for k in range(4)]
        return _csv(tmp / "train.csv", ("img_id", "img_path", "mask_rle"), mutate(rows, tmp))
    return make


def _mask_folder_mismatch(w, tmp):
    (tmp / "ds" / "images").mkdir(parents=True)
    (tmp / "ds" / "masks").mkdir()
    for k in range(3):
        _png(tmp / "ds" / "images" / f"a{k}.png", size=(64, 64))
        _png(tmp / "ds" / "masks" / f"a{k}.png", size=(64, 48) if k == 1 else (64, 64), channels=1)
    return tmp / "ds"


def _foreign_checkpoint(w, tmp):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp / "other.pt")
    return tmp / "other.pt"


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_checkpoint(w, tmp):
    torch.save({"format": FORMAT, "payload": _RunsCode(str(tmp / "PWNED"))}, tmp / "evil.pt")
    return tmp / "evil.pt"


def ckpt_case(ckpt_maker, fragments) -> Case:
    def build(w: dict, tmp: Path):
        out = tmp / "sub.csv"
        return (["predict", "--checkpoint", ckpt_maker(w, tmp), "--data", w["test"], "--out", out, "--no-progress",
                 "--num-workers", "0"], fragments, [out, tmp / "PWNED"])
    return build


def flag_case(*extra, fragments) -> Case:
    def build(w: dict, tmp: Path):
        out = tmp / "sub.csv"
        return (["predict", "--checkpoint", w["ckpt"], "--data", w["test"], "--out", out, "--no-progress",
                 "--num-workers", "0", *extra], fragments, [out])
    return build


def _ok_rows(w, tmp):
    return [(f"t{k}", str(w["root"] / "img" / f"t{k}.png")) for k in range(2)]


CASES: dict[str, Case] = {
    # output paths: checked before any work
    "predict out is a folder": lambda w, t: (["predict", "--checkpoint", w["ckpt"], "--data", w["test"], "--out",
                                              (t / "sub.csv").mkdir() or t / "sub.csv", "--no-progress"],
                                             ["--out", "sub.csv", "existing folder"], [t / "sub.csv" / "out.csv"]),
    "train out is a file": train_case(None, "--out", lambda w, t: _file(t / "run", b"x"), fragments=["--out", "existing file"]),
    # prediction data
    "predict data missing": predict_case(lambda w, t: t / "nope.csv", fragments=["nope.csv", "not found"]),
    "predict image missing": predict_case(csv_with(lambda w, t: [("gone", "gone.png")]), fragments=["gone.png", "not found"]),
    "predict corrupt png": predict_case(csv_with(_corrupt_png), fragments=["bad.png", "corrupt"]),
    "predict truncated png": predict_case(csv_with(_truncated_png), fragments=["cut.png", "corrupt"]),
    "predict csv without columns": predict_case(csv_with(lambda w, t: [("a", "b")], header=("id", "path")),
                                                fragments=["data.csv", "no 'img_id' column"]),
    "predict csv empty": predict_case(lambda w, t: _file(t / "data.csv", b""), fragments=["data.csv", "is empty"]),
    "predict csv header only": predict_case(csv_with(lambda w, t: []), fragments=["data.csv", "no rows"]),
    "predict csv duplicate ids": predict_case(csv_with(lambda w, t: _ok_rows(w, t) + [("t0", "x.png")]),
                                              fragments=["data.csv", "'t0'", "more than once"]),
    "predict csv not utf-8": predict_case(csv_with(lambda w, t: [("café", "x.png")], encoding="latin-1"),
                                          fragments=["data.csv", "UTF-8"]),
    "predict image below model minimum": predict_case(csv_with(_tiny_png), fragments=["8x8", "too small"]),
    "predict NaN image": predict_case(csv_with(_nan_tif), fragments=["nan.tif", "no finite pixel"]),
    "predict 5-band image for RGB model": predict_case(csv_with(_five_band_tif), fragments=["five.tif", "5 channels"]),
    # flags
    "threshold above 1": flag_case("--threshold", "1.5", fragments=["--threshold", "1.5"]),
    "threshold not a number": flag_case("--threshold", "high", fragments=["--threshold", "'high'"]),
    "overlap negative": flag_case("--overlap", "-0.1", fragments=["--overlap", "-0.1"]),
    "overlap one": flag_case("--overlap", "1", fragments=["--overlap", "1"]),
    "empty vote above models": flag_case("--empty-vote", "2", fragments=["empty vote 2", "0..1"]),
    "batch size zero": flag_case("--batch-size", "0", fragments=["--batch-size", "0"]),
    # checkpoints
    "checkpoint missing": ckpt_case(lambda w, t: t / "none.pt", ["none.pt", "not found"]),
    "checkpoint from another tool": ckpt_case(_foreign_checkpoint, ["other.pt", "not a buildseg checkpoint"]),
    "checkpoint pickle runs code": ckpt_case(_pickle_checkpoint, ["evil.pt", "weights_only"]),
    "checkpoint random bytes": ckpt_case(lambda w, t: _file(t / "junk.pt", os.urandom(300)), ["junk.pt", "damaged"]),
    "checkpoint folder without pt": ckpt_case(lambda w, t: (t / "empty_run").mkdir() or t / "empty_run",
                                              ["empty_run", "no checkpoints"]),
    # GeoTIFF
    "geotiff garbage": geotiff_case(False, fragments=["scene.tif", "cannot open"], garbage=True),
    "geotiff corrupt block": geotiff_case(True, fragments=["scene.tif", "damaged"]),
    "geotiff with empty vote": geotiff_case(False, "--empty-vote", "1", fragments=["--empty-vote", "GeoTIFF"]),
    # evaluate
    "evaluate truth missing": evaluate_case([("t0", "-1")], truth="nope.csv", fragments=["nope.csv", "not found"]),
    "evaluate pred missing": evaluate_case(None, fragments=["pred.csv", "not found"]),
    "evaluate duplicate ids": evaluate_case([("t0", "-1"), ("t1", "-1"), ("t2", "-1"), ("t3", "-1"), ("t0", "1 4")],
                                            fragments=["pred.csv", "'t0'", "more than once"]),
    "evaluate bad rle": evaluate_case([("t0", "1 4 7"), ("t1", "-1"), ("t2", "-1"), ("t3", "-1")],
                                      fragments=["pred.csv", "'t0'", "odd number"]),
    "evaluate rle past the end": evaluate_case([("t0", "4090 100"), ("t1", "-1"), ("t2", "-1"), ("t3", "-1")],
                                               fragments=["pred.csv", "'t0'", "64x64"]),
    "evaluate missing rows": evaluate_case([("t0", "-1")], fragments=["pred.csv", "no row for 3"]),
    "evaluate no mask_rle column": evaluate_case([("t0", "-1")], pred_header=("img_id", "rle"),
                                                 fragments=["pred.csv", "no 'mask_rle' column"]),
    "evaluate not utf-8": evaluate_case([("é", "-1")], encoding="utf-16", fragments=["pred.csv", "UTF-8"]),
    # training config
    "yaml lr as text": train_case("train:\n  lr: ten\n", fragments=["c.yaml", "train.lr", "'ten'", "number"], keep_fast=False),
    "yaml epochs as text": train_case("train:\n  epochs: ten\n", fragments=["c.yaml", "train.epochs", "'ten'", "integer"], keep_fast=False),
    "yaml decoder_channels scalar": train_case("model:\n  decoder_channels: 32\n", fragments=["model.decoder_channels", "32", "list"], keep_fast=False),
    "yaml boolean as text": train_case("model:\n  deep_supervision: maybe\n", fragments=["model.deep_supervision", "'maybe'", "true or false"], keep_fast=False),
    "yaml choice": train_case("train:\n  optimizer: adam\n", fragments=["train.optimizer", "'adam'", "adamw, sgd"], keep_fast=False),
    "yaml unknown key": train_case("model:\n  encodr: resnet18\n", fragments=["model.encodr", "'encoder'"], keep_fast=False),
    "yaml unknown section": train_case("modle:\n  encoder: resnet18\n", fragments=["'modle'", "unknown section"], keep_fast=False),
    "yaml syntax": train_case("train: [lr: 1\n", fragments=["c.yaml", "not valid YAML"], keep_fast=False),
    "flag epochs text": train_case(None, "--epochs", "many", fragments=["--epochs", "'many'", "integer"]),
    "flag lr negative": train_case(None, "--lr=-1e-3", fragments=["--lr", "-1e-3", "> 0"]),
    "flag precision choice": train_case(None, "--precision", "fp8", fragments=["--precision", "'fp8'", "bf16"]),
    "flag dropout range": train_case(None, "--dropout", "0.9", fragments=["--dropout", "0.9", "[0, 0.5]"]),
    "flag decoder width range": train_case(None, "--decoder-width", "0", fragments=["--decoder-width", "'0'", "(0, 4]"]),
    "config file missing": train_case(None, "--config", lambda w, t: t / "none.yaml", fragments=["none.yaml", "not found"]),
    "train data missing": train_case(None, data=lambda w, t: t / "none.csv", fragments=["none.csv", "not found"]),
    "train bad rle": train_case(None, data=_train_rows(lambda rows, t: rows[:3] + [("t3", rows[3][1], "5 2 x 1")]),
                                fragments=["train.csv", "line 5", "'t3'", "'x'"]),
    "train rle past the end (in a loader worker)": train_case(
        None, "--num-workers", "1", "--val-fraction", "0.25",
        data=_train_rows(lambda rows, t: [(i, p, "4000 200") for i, p, _ in rows]),
        fragments=["train.csv", "64x64", "mask_rle"]),
    "train mask size mismatch": train_case(None, data=lambda w, t: _mask_folder_mismatch(w, t),
                                           fragments=["a1.png", "64x48", "must match"]),
    "train test csv as training data": train_case(None, data=lambda w, t: w["test"], fragments=["test.csv", "no mask"]),
    "train weights file missing": train_case(None, "--weights", lambda w, t: t / "enc.safetensors",
                                             fragments=["enc.safetensors", "not found"]),
    "train sync-bn on cpu": train_case(None, "--sync-bn", "--device", "cpu", fragments=["--sync-bn", "cpu"]),
    "train in_chans 4 on RGB images": train_case(None, "--in-chans", "4", fragments=["t", ".png", "3 channels", "expects 4"]),
    "train resume without last.pt": train_case(None, "--resume", lambda w, t: (t / "r").mkdir() or t / "r",
                                               fragments=["config.yaml", "cannot resume"], keep_fast=False),
    # tune / export
    "tune data without masks": lambda w, t: (["tune", "--checkpoint", w["ckpt"], "--data", w["test"]],
                                             ["test.csv", "no mask"], []),
    "tune checkpoint missing": lambda w, t: (["tune", "--checkpoint", t / "x.pt", "--data", w["train"]],
                                             ["x.pt", "not found"], []),
    "export parity failure": lambda w, t: (["export", "--checkpoint", w["ckpt"], "--onnx", t / "m.onnx", "--tolerance", "1e-30"],
                                           ["m.onnx", "parity"], [t / "m.onnx", t / ".m.tmp.onnx"]),
    "export onnx is a folder": lambda w, t: (["export", "--checkpoint", w["ckpt"], "--onnx", (t / "m.onnx").mkdir() or t / "m.onnx"],
                                             ["--onnx", "m.onnx", "existing folder"], [t / "m.onnx" / "out.onnx"]),
    "export wrong suffix": lambda w, t: (["export", "--checkpoint", w["ckpt"], "--onnx", t / "m.bin"], ["m.bin", ".onnx"],
                                         [t / "m.bin"]),
}


# One real subprocess per command and error class: what a user's shell really sees.
SUBPROCESS = {"predict data missing", "threshold above 1", "checkpoint pickle runs code", "geotiff corrupt block",
              "evaluate bad rle", "yaml syntax", "flag epochs text", "train rle past the end (in a loader worker)",
              "tune data without masks", "export parity failure", "predict out is a folder"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SUBPROCESS else n for n in CASES])
def test_bad_input_is_one_clear_line(name, world, tmp_path):
    if "export" in name:
        pytest.importorskip("onnxruntime")
    argv, fragments, outputs = CASES[name](world, tmp_path)
    proc = (run_cli if name in SUBPROCESS else run_cli_in_process)(*argv, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr[-3000:]
    assert all(not line.startswith(("  ", "\t")) for line in lines), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in: {errors[0]}"
    for path in outputs:
        assert not Path(path).exists(), f"{path} was left behind"
    if "pickle" in name:
        assert not (tmp_path / "PWNED").exists()


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40
    assert SUBPROCESS <= set(CASES)
    assert {"predict", "train", "evaluate", "tune", "export"} <= {name.split()[0] for name in SUBPROCESS}
