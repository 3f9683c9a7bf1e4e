"""End-to-end `predict` throughput per inference engine, against a plain smp fp32 loop.

One run: N 224x224 PNG tiles -> submission CSV with `predict_records` on each engine
available here (torch, openvino, onnxruntime; fp32, and bf16 where the CPU has it), for the
default model (Unet-efficientnet_lite0 with deep supervision and its ensemble) and for
Unet-ResNet50 (+DS), next to the plain segmentation_models_pytorch fp32 loop of
benchmarks/predict_throughput.py. With --checkpoint (a trained default model) and --truth
(a CSV with img_path and mask_rle, e.g. ../shared/data/real_dev/test_224/train.csv) it also
prints the competition Dice of every engine and its change against torch fp32 on those tiles.
The one-time ONNX export of each model is done before timing (it is cached next to the
checkpoint and reused on later runs).

    .venv/bin/python benchmarks/engine_throughput.py --n 600 --checkpoint runs/x/best.pt \\
        --truth ../shared/data/real_dev/test_224/train.csv --calibration ../shared/data/real_dev/train.csv
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from buildseg.data.synth import write_dataset  # noqa: E402
from buildseg.evaluation import evaluate_csv  # noqa: E402
from buildseg.formats.tables import load_records  # noqa: E402
from buildseg.inference.core import engines  # noqa: E402
from buildseg.inference.core.segmenter import Segmenter  # noqa: E402
from buildseg.inference.jobs.tiles import predict_records  # noqa: E402
from buildseg.models import ModelCard, build_model  # noqa: E402
from buildseg.runtime.checkpoint import FORMAT, save_atomic  # noqa: E402
from buildseg.runtime.device import cpu_has_native_bf16  # noqa: E402
from loader_throughput import cpu_flags  # noqa: E402
from predict_throughput import plain_smp  # noqa: E402


def settings(int8: bool) -> list[tuple[str, str]]:
    out = [("torch", "fp32")]
    if cpu_has_native_bf16():
        out.append(("torch", "bf16"))
    for name, (module, _) in engines.EXTRAS.items():
        if engines._installed(module):
            out.append((name, "fp32"))
            if name == "openvino" and cpu_has_native_bf16():
                out.append((name, "bf16"))
            if name == "openvino" and int8:
                out.append((name, "int8"))
    return out


def random_checkpoint(encoder: str, path: Path, width: float = 0.5) -> Path:
    torch.manual_seed(0)
    card = ModelCard(encoder=encoder, decoder_width=width, deep_supervision=True, ds_ensemble=True)
    model = build_model(card)
    return save_atomic({"format": FORMAT, "model_card": card.to_dict(), "model": model.state_dict()}, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="tiles (default 2000, the issue's count; the "
                        "benchmarks/README figures used 600 to fit a session)")
    parser.add_argument("--checkpoint", help="a trained default (lite0) model; random weights otherwise")
    parser.add_argument("--truth", help="CSV with img_path,mask_rle for the Dice change per engine")
    parser.add_argument("--calibration", help="CSV/folder with masks: int8 calibration (buildseg quantize) when nncf is installed")
    parser.add_argument("--threads-study", action="store_true", help="also time the default model's fastest setting "
                        "with loader workers 0/1 x engine threads 1/all: who should get the cores")
    parser.add_argument("--models", nargs="+", choices=["default", "resnet50", "resnet50-w1"],
                        default=["default", "resnet50", "resnet50-w1"],
                        help="resnet50: the default decoder width 0.5; resnet50-w1: width 1, smp's decoder widths")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="engine_bench_"))
    paths = write_dataset(tmp / "data", n_train=0, n_test=args.n, test_size=224, seed=7, progress=False)
    records = load_records(paths.test_csv)
    models = {}
    if "default" in args.models:
        models["Unet-efficientnet_lite0 +DS (default)"] = args.checkpoint or random_checkpoint("efficientnet_lite0", tmp / "lite0.pt")
    if "resnet50" in args.models:
        models["Unet-resnet50 +DS, decoder width 0.5"] = random_checkpoint("resnet50", tmp / "r50.pt")
    if "resnet50-w1" in args.models:
        models["Unet-resnet50 +DS, decoder width 1"] = random_checkpoint("resnet50", tmp / "r50w1.pt", width=1.0)
    smp_encoders = {label: "resnet50" if "resnet50" in label else None for label in models}
    print(f"CPU: {cpu_flags()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.n} synthetic 224x224 PNG tiles -> submission CSV, end to end (decode, predict, RLE, write)\n")
    print("| model | engine | precision | img/s | x torch fp32 | x plain smp fp32 loop | Dice | Dice change |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    truth = load_records(args.truth, require_masks=True) if args.truth else None
    plain_rates: dict[str, float] = {}  # the smp loop is timed once per encoder
    for label, checkpoint in models.items():
        encoder = smp_encoders[label]
        if encoder and encoder not in plain_rates:
            plain_rates[encoder] = plain_smp(encoder, records, tmp / "plain.csv")
        plain = plain_rates.get(encoder)
        base = dice_base = None
        int8 = bool(args.calibration) and engines._installed("nncf")
        if int8:
            from buildseg.inference.jobs.quantize import quantize

            trained = checkpoint == args.checkpoint  # random weights: speed only, plain PTQ (no Dice to control)
            q = quantize(checkpoint, args.calibration, n_tiles=300, max_drop=0.005 if trained else None)
            control = (f", accuracy control (plain int8 {q.dice_plain_int8:.4f})" if q.accuracy_control else "")
            print(f"(int8 of {label}: calibrated on {q.n_calibration} tiles of {args.calibration}; Dice there "
                  f"fp32 {q.dice_fp32:.4f} -> int8 {q.dice_int8:.4f}{control})", flush=True)
        for engine, precision in settings(int8):
            seg = Segmenter.from_checkpoint(checkpoint, device="cpu", precision=precision, engine=engine)  # export cached
            predict_records(seg, records[:64], tmp / "warm.csv", progress=False)
            started = time.perf_counter()
            predict_records(seg, records, tmp / "sub.csv", progress=False)
            rate = len(records) / (time.perf_counter() - started)
            base = base or rate
            dice = ""
            change = ""
            if truth is not None and args.checkpoint and checkpoint == args.checkpoint:
                predict_records(seg, truth, tmp / "truth_pred.csv", progress=False)
                score = evaluate_csv(tmp / "truth_pred.csv", args.truth)["dice"]
                dice_base = score if dice_base is None else dice_base
                dice, change = f"{score:.4f}", f"{score - dice_base:+.4f}"
            versus = f"{rate / plain:.2f}x" if plain else "n/a"
            print(f"| {label} | {engine} | {precision} | {rate:.1f} | {rate / base:.2f}x | {versus} | {dice} | {change} |",
                  flush=True)
        if plain:
            print(f"| {label} | plain smp loop | fp32 | {plain:.1f} | | 1.00x | | |", flush=True)
        if args.threads_study and label.endswith("(default)"):
            available = settings(int8)
            fastest = next((s for s in (("openvino", "int8"), ("openvino", "fp32")) if s in available), available[-1])
            threads_study(checkpoint, records, tmp, *fastest)


def threads_study(checkpoint, records, tmp: Path, engine: str, precision: str) -> None:
    """End-to-end img/s with the loader's decode workers (0: decode in the main thread) and
    the engine's compute threads (None: all cores) varied: on 2 cores, do they fight?"""
    print(f"\nthreads study: default model, {engine} {precision}, {len(records)} tiles")
    print("| loader workers | engine threads | img/s | x default (1 worker, all threads) |")
    print("|---:|---:|---:|---:|")
    base, default_threads = None, torch.get_num_threads()
    for workers, threads in ((1, None), (0, None), (1, 1), (0, 1)):  # workers: explicit, not the default rule
        seg = Segmenter.from_checkpoint(checkpoint, device="cpu", precision=precision, engine=engine, threads=threads)
        predict_records(seg, records[:64], tmp / "warm.csv", progress=False, num_workers=workers)
        started = time.perf_counter()
        predict_records(seg, records, tmp / "sub.csv", progress=False, num_workers=workers)
        rate = len(records) / (time.perf_counter() - started)
        base = base or rate
        print(f"| {workers} | {threads or 'all'} | {rate:.1f} | {rate / base:.2f}x |", flush=True)
        torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main()
