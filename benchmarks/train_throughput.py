"""Training throughput: buildseg's default training step vs a plain fp32
segmentation_models_pytorch loop, plus loader-only img/s and peak RSS, in one run.

    .venv/bin/pip install segmentation-models-pytorch      # benchmark environment only
    .venv/bin/python benchmarks/train_throughput.py [--data ../shared/data/real_dev/train.csv] [--compile]

Both loops train Unet-<encoder> at 224x224, batch 8, with BCE + Dice and AdamW on the same
synthetic batches; "buildseg" uses what `buildseg train` uses by default on this machine
(precision auto, channels_last, its UNet and loss). The loader row times buildseg's
TrainCropDataset + DataLoader (default workers) alone on real files. ``--compile`` adds a
column for the same step with the model under ``torch.compile`` (``buildseg train --compile``;
compilation happens in the warm-up steps and is not timed).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from buildseg.config import Config  # noqa: E402
from buildseg.losses import DeepSupervisionLoss, parse_loss  # noqa: E402
from buildseg.models import ModelCard, build_model  # noqa: E402
from buildseg.runtime.device import autocast, resolve_precision  # noqa: E402


def time_steps(step, warmup: int, iters: int, batch: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return batch * iters / (time.perf_counter() - start)


def smp_plain(encoder: str, batch: int, warmup: int, iters: int) -> float:
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    model = smp.Unet(encoder_name=encoder, encoder_weights=None, classes=1).train()
    dice = smp.losses.DiceLoss("binary")
    bce = torch.nn.BCEWithLogitsLoss()
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x = torch.randn(batch, 3, 224, 224)
    y = (torch.rand(batch, 1, 224, 224) > 0.8).float()

    def step():
        out = model(x)
        loss = bce(out, y) + dice(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return time_steps(step, warmup, iters, batch)


def training_step(forward, loss_fn, optimizer, x, y, device, precision):
    """One buildseg training step on a fixed batch: autocast forward, loss, AdamW update."""

    def step() -> None:
        with autocast(device, precision):
            out = forward(x)
        loss = loss_fn(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def buildseg_default(encoder: str, batch: int, warmup: int, iters: int, compile: bool = False) -> tuple[float, str]:
    defaults = Config()
    device = torch.device("cpu")
    precision = resolve_precision(defaults.train.precision, device)
    torch.manual_seed(0)
    model = build_model(ModelCard(encoder=encoder)).train()
    fmt = torch.channels_last if defaults.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    loss_fn = DeepSupervisionLoss(parse_loss(defaults.loss))
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    forward = torch.compile(model) if compile else model
    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8).contiguous(memory_format=fmt)
    y = (torch.rand(batch, 1, 224, 224) > 0.8).float()

    step = training_step(forward, loss_fn, opt, x, y, device, precision)
    label = f"{precision}{', channels_last' if defaults.train.channels_last else ''}"
    return time_steps(step, warmup, iters, batch), label


def loop_rate(encoder: str, data: str, batch: int, steps: int, workers: int = -1) -> float:
    """img/s of the real training loop (`buildseg train`'s Trainer: loader, augmentation,
    deep-supervision loss, clipping, scheduler, logging) over one epoch of ``steps`` steps,
    validation excluded: what the loop loses against the bare step of buildseg_default."""
    import tempfile

    from buildseg.formats.tables import load_records
    from buildseg.training.loop import train

    config = Config()
    config.data.train = data
    config.data.crop_size = 224
    config.data.crops_per_image = max(1, -(-steps * batch // max(1, int(len(load_records(data)) * 0.85))))
    config.model.encoder, config.model.weights = encoder, "none"
    config.data.num_workers = workers
    config.train.out = tempfile.mkdtemp(prefix="loop_rate_")
    config.train.epochs, config.train.batch_size = 1, batch
    config.train.progress = config.train.tensorboard = config.train.tune_at_end = False
    history = train(config).history
    return history[0]["train_img_s"]


def loader_rate(data: str, batch: int, batches: int) -> tuple[float, int]:
    from torch.utils.data import DataLoader

    from buildseg.data.datasets import EpochSampler, TrainCropDataset
    from buildseg.formats.tables import load_records
    from buildseg.runtime.device import default_workers

    dataset = TrainCropDataset(load_records(data, require_masks=True), crop_size=224)
    sampler = EpochSampler(dataset, seed=0)
    workers = default_workers(-1)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, persistent_workers=workers > 0)
    seen, start = 0, None
    for epoch in range(100):
        sampler.set_epoch(epoch)
        for k, (images, _) in enumerate(loader):
            if start is None and k == 1:  # after worker start-up
                start, seen = time.perf_counter(), 0
            seen += len(images)
            if seen >= batch * batches and start is not None:
                return seen / (time.perf_counter() - start), workers
    return seen / (time.perf_counter() - start), workers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--encoders", nargs="+", default=["resnet34", "resnet50"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="add a torch.compile column")
    parser.add_argument("--loop", action="store_true", help="add the real training loop's img/s (Trainer, one epoch "
                        "on --data) and its share of the bare step's")
    parser.add_argument("--loop-steps", type=int, default=40)
    parser.add_argument("--loop-workers", type=int, nargs="+", default=[-1],
                        help="loader workers of the loop rows (-1: the default rule; e.g. -1 0 to compare)")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/real_dev/train.csv"))
    args = parser.parse_args()
    print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; 224x224, batch {args.batch}; "
          f"{args.warmup} warm-up + {args.iters} timed steps\n")
    extra = " buildseg + compile (img/s) | ratio |" if args.compile else ""
    print("| model | plain smp fp32 loop (img/s) | buildseg default (img/s) | buildseg setting | ratio |" + extra)
    print("|---|---:|---:|---|---:|" + ("---:|---:|" if args.compile else ""))
    for encoder in args.encoders:
        try:
            plain = smp_plain(encoder, args.batch, args.warmup, args.iters)
        except (KeyError, ValueError, RuntimeError):  # smp has no such encoder (e.g. efficientnet_lite0)
            plain = None
        ours, label = buildseg_default(encoder, args.batch, args.warmup, args.iters)
        versus = f"{ours / plain:.2f}x" if plain else "n/a"
        row = f"| Unet-{encoder} | {f'{plain:.2f}' if plain else 'n/a'} | {ours:.2f} | {label} | {versus} |"
        if args.compile:
            compiled, _ = buildseg_default(encoder, args.batch, max(2, args.warmup), args.iters, compile=True)
            row += f" {compiled:.2f} | {f'{compiled / plain:.2f}x' if plain else 'n/a'} |"
        print(row, flush=True)
        for workers in args.loop_workers if args.loop else []:
            loop = loop_rate(encoder, args.data, args.batch, args.loop_steps, workers)
            print(f"  training loop (Trainer, {args.loop_steps} steps on {Path(args.data).name}, loader workers "
                  f"{'default' if workers < 0 else workers}): {loop:.2f} img/s = {100 * loop / ours:.0f}% of the bare "
                  "buildseg step", flush=True)
    if Path(args.data).is_file():
        rate, workers = loader_rate(args.data, args.batch, 30)
        print(f"\nloader only (TrainCropDataset on {args.data}, {workers} worker(s)): {rate:.1f} img/s")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
