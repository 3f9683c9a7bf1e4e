"""``buildseg demo``: the whole pipeline on synthetic data, in a few CPU minutes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from buildseg.config import Config
from buildseg.data.synth import write_dataset
from buildseg.evaluation import evaluate_csv
from buildseg.formats import rle
from buildseg.formats.images import overlay, read_rgb, write_png
from buildseg.formats.tables import load_records, read_rle_table
from buildseg.inference.core.segmenter import Segmenter
from buildseg.inference.jobs.tiles import predict_records
from buildseg.pipeline import train_and_tune
from buildseg.report import render_report
from buildseg.settings.data import DemoSettings


def overlay_sheet(records, pred_csv: Path, truth_csv: Path, path: Path, n: int = 12) -> Path:
    """A grid of test tiles: prediction in red, truth outline in green."""
    pred, truth = read_rle_table(pred_csv), read_rle_table(truth_csv)
    tiles = []
    for record in records[:n]:
        image = read_rgb(record.image_path)
        shape = image.shape[:2]
        tiles.append(overlay(image, rle.decode(pred[record.img_id], shape), rle.decode(truth[record.img_id], shape)))
    cols = 4
    rows = math.ceil(len(tiles) / cols)
    h, w = tiles[0].shape[:2]
    sheet = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = tile
    write_png(path, sheet)
    return path


def run_demo(out: Path, minutes: float = DemoSettings().minutes, encoder: str = DemoSettings().encoder) -> dict:
    data_dir = out / "data"
    if not (data_dir / "test_truth.csv").is_file():
        print(f"[1/4] writing synthetic data to {data_dir}")
        write_dataset(data_dir)  # synth's defaults (settings/data.py SynthSettings)
    paths_train, paths_test, paths_truth = data_dir / "train.csv", data_dir / "test.csv", data_dir / "test_truth.csv"

    print(f"[2/4] training unet-{encoder} from scratch for {minutes:g} minutes, then tuning the post-processing on "
          "the held-out training images (as `buildseg train` does)")
    config = Config()
    config.data.train = str(paths_train)
    config.data.val_fraction = 0.125
    config.model.encoder = encoder
    config.model.weights = "none"
    config.train.out = str(out / "run")
    config.train.epochs = 1000
    config.train.time_limit = minutes
    config.train.lr = 2e-3
    config.train.quantize_at_end = False  # the demo's CPU minutes go to training
    result, finished = train_and_tune(config)
    if finished.tuned is not None:
        post = finished.tuned.post
        print(f"tuned: threshold {post.threshold:.2f}, min_area {post.min_area}, empty if max prob < "
              f"{post.empty_max_prob:.2f}; validation Dice {finished.tuned.before['dice']:.4f} -> "
              f"{finished.tuned.after['dice']:.4f}")

    print("[3/4] predicting the test tiles")
    segmenter = Segmenter.from_checkpoint(result.run_dir / "best.pt")
    records = load_records(paths_test)
    submission = out / "submission.csv"
    _, stats = predict_records(segmenter, records, submission, batch_size=32)

    print("[4/4] scoring with the competition metric")
    summary = evaluate_csv(submission, paths_truth)
    sheet = overlay_sheet(records, submission, paths_truth, out / "overlays.png")
    report = render_report(submission, paths_truth, out / "report.html")
    print()
    print(f"competition Dice on {summary['n']} synthetic test tiles: {summary['dice']:.4f} "
          f"({summary['n_scored']} scored; empty-tile FP rate {summary['empty_fp_rate']:.3f})")
    print(f"buildings (IoU >= 0.5): F1 {summary['f1']:.4f}, precision {summary['precision']:.4f}, "
          f"recall {summary['recall']:.4f} ({summary['n_matched']} of {summary['n_true']} matched)")
    print(f"prediction speed: {stats.img_per_s:.1f} img/s")
    print(f"submission: {submission}")
    print(f"curves:     {result.run_dir / 'curves.png'}")
    print(f"overlays:   {sheet}")
    print(f"report:     {report} (open it in a browser: scores, worst tiles, errors)")
    print(f"checkpoint: {result.run_dir / 'best.pt'}")
    return summary
