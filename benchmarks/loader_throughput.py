"""Training crops per second per loader worker: decode-per-crop vs the decoded-image store.

Writes (or reuses) 64 synthetic 1024x1024 PNG tiles with competition-format RLE masks, then
times ``TrainCropDataset`` in one process (= one loader worker, one core) cutting 224x224
crops with the default augmentation, for the old path that decodes the whole PNG per crop
(kept here as the reference: ``--cache none``) and for each store mode. Crops are asserted
identical across the modes before any figure is printed. The store's one-time build is
timed too and scaled to the competition's 7,140 training images.

    .venv/bin/python benchmarks/loader_throughput.py
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from buildseg.data.datasets import TrainCropDataset  # noqa: E402
from buildseg.data.store import DecodedStore  # noqa: E402
from buildseg.data.synth import write_dataset  # noqa: E402
from buildseg.formats.tables import load_records  # noqa: E402

COMPETITION_IMAGES = 7140


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), [])
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return f"{model} ({', '.join(wanted) or 'no AVX2'})"


def rate(dataset: TrainCropDataset, n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        dataset[(0, i % len(dataset))]
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="folder for the synthetic tiles (default: a temp folder)")
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--reference-crops", type=int, default=200)
    parser.add_argument("--store-crops", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(args.data or tempfile.mkdtemp(prefix="loader_bench_"))
    if not (root / "train.csv").is_file():
        write_dataset(root, n_train=args.n_images, train_size=1024, n_test=0, seed=0, progress=False)
    records = load_records(root / "train.csv", require_masks=True)
    crops = max(1, (1024 // args.crop) ** 2)

    stores = {}
    builds = {}
    for mode in ("disk", "ram"):
        store = DecodedStore(records, 3, mode, root / "cache" if mode == "disk" else None)
        for entry in (root / "cache").glob("*.npy") if mode == "disk" else []:
            entry.unlink()  # time a cold build
        started = time.perf_counter()
        stats = store.build()
        builds[mode] = (time.perf_counter() - started, stats.bytes)
        stores[mode] = store

    datasets = {"none (decode per crop, reference)": TrainCropDataset(records, crop_size=args.crop, crops_per_image=crops, seed=0)}
    for mode, store in stores.items():
        datasets[f"{mode} store"] = TrainCropDataset(records, crop_size=args.crop, crops_per_image=crops, seed=0, store=store)
    reference = datasets["none (decode per crop, reference)"]
    for name, dataset in datasets.items():  # the same samples, bit for bit
        for i in range(0, len(reference), max(1, len(reference) // 16)):
            a, b = reference[(0, i)], dataset[(0, i)]
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (name, i)

    print(f"CPU: {cpu_flags()}, Python {platform.python_version()}, torch {torch.__version__}")
    print(f"{len(records)} synthetic 1024x1024 PNGs with RLE masks, {args.crop}x{args.crop} crops, default augmentation, "
          "one process (= one loader worker)\n")
    print("| mode | crops/s per worker | speed-up | workers for 1,000 crops/s |")
    print("|---|---:|---:|---:|")
    rates = {}
    for name, dataset in datasets.items():
        n = args.reference_crops if name.startswith("none") else args.store_crops
        rates[name] = rate(dataset, n)
        base = rates["none (decode per crop, reference)"]
        print(f"| {name} | {rates[name]:.0f} | {rates[name] / base:.1f}x | {1000 / rates[name]:.1f} |")
    print()
    print("| store | one-time build, these images | per image | scaled to 7,140 competition images | size scaled |")
    print("|---|---:|---:|---:|---:|")
    for mode, (seconds, size) in builds.items():
        per = seconds / len(records)
        print(f"| {mode} | {seconds:.1f} s, {size / 1e6:.0f} MB | {1000 * per:.0f} ms | "
              f"{per * COMPETITION_IMAGES / 60:.1f} min on one core | {size / len(records) * COMPETITION_IMAGES / 1e9:.1f} GB |")
    print()
    default = "disk store"  # auto picks disk for a decoded set above cache_ram_fraction of RAM, as the competition's 23 GB
    print(f"speed-up over decode-per-crop: {rates[default] / rates['none (decode per crop, reference)']:.1f}x")


if __name__ == "__main__":
    main()
