"""End-to-end prediction throughput: 224x224 PNG tiles -> submission CSV, buildseg
`predict` defaults vs a plain fp32 segmentation_models_pytorch loop doing the same job,
plus model-only img/s and the Dice change of bf16 vs fp32, in one run.

    .venv/bin/pip install segmentation-models-pytorch      # benchmark environment only
    .venv/bin/python benchmarks/predict_throughput.py [--n 2000] [--checkpoint demo_out/run/best.pt]

The tiles come from the synthetic generator. The plain loop reads PNGs with OpenCV in the
main process, normalises, runs the model in fp32 NCHW in batches of 32, thresholds and
writes RLE with the common NumPy encoder. buildseg runs `predict_records` with its
defaults (DataLoader workers, precision auto, channels_last, encoding in a background
thread). Both models have the same architecture family (smp Unet vs buildseg UNet, random
weights): speed does not depend on the weights. The Dice comparison needs a trained model:
give --checkpoint (e.g. the demo's) to measure bf16 vs fp32 on the first 200 tiles.

The same end-to-end job on every inference engine x precision (torch, OpenVINO fp32/bf16/
int8, onnxruntime), with the Dice change per engine and both ResNet-50 decoder widths, is
`engine_throughput.py` (issue 12); this script keeps the torch-only table of issue 3.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from buildseg.data.synth import write_dataset  # noqa: E402
from buildseg.formats.tables import load_records  # noqa: E402
from buildseg.inference.predict import predict_records  # noqa: E402
from buildseg.inference.segmenter import Segmenter  # noqa: E402
from buildseg.models import ModelCard, build_model  # noqa: E402


def notebook_rle(mask: np.ndarray) -> str:
    pixels = np.concatenate([[0], mask.flatten(), [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs) if len(runs) else "-1"


def plain_smp(encoder: str, records, out_csv: Path, batch: int = 32) -> float:
    import segmentation_models_pytorch as smp

    model = smp.Unet(encoder_name=encoder, encoder_weights=None, classes=1).eval()
    mean = np.array([0.485, 0.456, 0.406], np.float32) * 255
    std = np.array([0.229, 0.224, 0.225], np.float32) * 255
    start = time.perf_counter()
    rows = []
    with torch.no_grad():
        for i in range(0, len(records), batch):
            chunk = records[i : i + batch]
            images = np.stack([cv2.cvtColor(cv2.imread(str(r.image_path)), cv2.COLOR_BGR2RGB) for r in chunk])
            x = torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2).astype(np.float32))
            masks = (torch.sigmoid(model(x)) > 0.5).numpy()[:, 0].astype(np.uint8)
            rows += [(r.img_id, notebook_rle(m)) for r, m in zip(chunk, masks)]
    with open(out_csv, "w", newline="") as handle:
        csv.writer(handle).writerows([("img_id", "mask_rle"), *rows])
    return len(records) / (time.perf_counter() - start)


def model_only(seg: Segmenter, n: int = 128, batch: int = 32) -> float:
    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    seg.probabilities(x)
    start = time.perf_counter()
    for _ in range(n // batch):
        seg.probabilities(x)
    return (n // batch) * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--encoders", nargs="*", default=["resnet50", "resnet34"])
    parser.add_argument("--checkpoint", help="trained checkpoint for the bf16-vs-fp32 Dice comparison")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_dataset(tmp / "data", n_train=0, n_test=args.n, test_size=224, seed=7, progress=False)
        records = load_records(paths.test_csv)
        print(f"{args.n} synthetic 224x224 PNG tiles -> submission CSV; CPU, torch {torch.__version__}\n")
        print("| model | plain smp fp32 loop (img/s) | buildseg predict (img/s) | ratio | buildseg model-only (img/s) | setting |")
        print("|---|---:|---:|---:|---:|---|")
        for encoder in args.encoders:
            plain = plain_smp(encoder, records, tmp / "plain.csv")
            torch.manual_seed(0)
            seg = Segmenter([build_model(ModelCard(encoder=encoder))])
            _, stats = predict_records(seg, records, tmp / "sub.csv", progress=False)
            setting = f"{seg.precision}, channels_last, {seg.tta} TTA"
            print(f"| Unet-{encoder} | {plain:.1f} | {stats.img_per_s:.1f} | {stats.img_per_s / plain:.2f}x | "
                  f"{model_only(seg):.1f} | {setting} |", flush=True)
        if args.checkpoint:
            from buildseg.evaluation import evaluate_csv

            subset = records[:200]
            truth = paths.test_truth_csv.parent / "truth_subset.csv"
            with open(paths.test_truth_csv) as src, open(truth, "w") as dst:
                dst.writelines(line for k, line in enumerate(src) if k <= len(subset))
            scores = {}
            for precision in ("fp32", "bf16"):
                seg = Segmenter.from_checkpoint(args.checkpoint, device="cpu", precision=precision)
                _, stats = predict_records(seg, subset, tmp / f"{precision}.csv", progress=False)
                scores[precision] = (evaluate_csv(tmp / f"{precision}.csv", truth)["dice"], stats.img_per_s)
            print(f"\nDice on {len(subset)} tiles with {args.checkpoint}: fp32 {scores['fp32'][0]:.4f} "
                  f"({scores['fp32'][1]:.1f} img/s), bf16 {scores['bf16'][0]:.4f} ({scores['bf16'][1]:.1f} img/s), "
                  f"change {scores['bf16'][0] - scores['fp32'][0]:+.4f}")


if __name__ == "__main__":
    main()
