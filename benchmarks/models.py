"""Per architecture/encoder: parameters, forward GFLOPs at 224, and train / inference img/s
at batch 8 under each precision x memory-format setting, all in one run.

    .venv/bin/python benchmarks/models.py                 # CPU, fp32 and bf16 (+channels_last)
    python3 benchmarks/models.py --device cuda --full     # GPU: fp32/bf16/fp16 x channels_last on/off

The baseline row of each model is the plain loop: fp32, NCHW, no autocast. Only the model
step is timed (synthetic uint8 batches), so the numbers isolate model and precision.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from buildseg.losses import DeepSupervisionLoss, parse_loss  # noqa: E402
from buildseg.models import ModelCard, build_model  # noqa: E402

MODELS = [
    ("seed_unet", "resnet50", False),
    ("unet", "resnet34", False),
    ("unet", "resnet34", True),
    ("unet", "resnet50", False),
    ("unet", "resnet50", True),
    ("unet", "efficientnet_b3", False),
]


def gflops(model: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 2e9  # multiply-adds, the usual "FLOPs" of papers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(step, device: torch.device, batch: int, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return batch * iters / (time.perf_counter() - start)


def measure(arch, encoder, ds, device, precision, channels_last, batch, size, warmup, iters):
    torch.manual_seed(0)
    model = build_model(ModelCard(arch=arch, encoder=encoder, deep_supervision=ds)).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device).contiguous(memory_format=fmt)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.8).float()
    loss_fn = DeepSupervisionLoss(parse_loss("bce+dice"))
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def train_step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x)
        loss = loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def infer_step():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            model(x)

    model.train()
    train = rate(train_step, device, batch, warmup, iters)
    model.eval()
    infer = rate(infer_step, device, batch, warmup, iters)
    return train, infer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--full", action="store_true", help="all precision x channels_last settings")
    parser.add_argument("--models", nargs="*", help="subset, e.g. unet:resnet34")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        settings = [(p, cl) for p in ("fp32", "bf16", "fp16") for cl in (False, True)] if args.full else [("fp32", False), ("bf16", True)]
        name = torch.cuda.get_device_name()
    else:
        settings = [("fp32", False), ("fp32", True), ("bf16", True)]
        name = "CPU"
    models = MODELS
    if args.models:
        wanted = {tuple(m.split(":")) for m in args.models}
        models = [m for m in MODELS if (m[0], m[1]) in wanted]
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch}, {args.size}x{args.size}; "
          f"{args.warmup} warm-up + {args.iters} timed steps; baseline = fp32 NCHW plain loop\n")
    print("| model | params (M) | GMACs @224 | precision | channels_last | train img/s | x baseline | infer img/s | x baseline |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|")
    for arch, encoder, ds in models:
        label = f"{arch}-{encoder}{' +DS' if ds else ''}"
        model = build_model(ModelCard(arch=arch, encoder=encoder, deep_supervision=ds))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        macs = gflops(model, 224)
        base = None
        for precision, cl in settings:
            train, infer = measure(arch, encoder, ds, device, precision, cl, args.batch, args.size, args.warmup, args.iters)
            base = base or (train, infer)
            print(f"| {label} | {params:.1f} | {macs:.1f} | {precision} | {'yes' if cl else 'no'} | {train:.1f} | "
                  f"{train / base[0]:.2f} | {infer:.1f} | {infer / base[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
