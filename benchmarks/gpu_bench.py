"""GPU training and prediction against the hardware, in one bounded run (``gpu_bench.sh``).

    bash benchmarks/gpu_bench.sh                        # on a CUDA machine, at most ~8 minutes
    DEVICE=cpu bash benchmarks/gpu_bench.sh             # the rehearsal: same steps, tiny sizes

Three tables, each row printed as soon as it is measured (a cut-off run keeps what it has):

1. ``train``: img/s of buildseg's training step (its UNet, deep-supervision-aware BCE+Dice,
   AdamW, channels_last where asked) for each model x batch x setting: ``fp32``,
   ``bf16+cl`` (bf16 autocast + channels_last), ``bf16+cl+compile`` (torch.compile, default
   mode) and ``bf16+cl+graphs`` (torch.compile ``mode="reduce-overhead"``: CUDA graphs).
   Compile time is reported apart (``compile s``) with the steps it takes to pay back against
   eager: the rule for turning ``--compile`` on by default. Out-of-memory rows say ``OOM``.
2. ``loader``: the real ``buildseg train`` loop for a short time limit at the largest batch
   that fit, from the decoded-image store with the machine's default workers: its img/s and
   ``data_wait`` (the fraction of the time the step waited for the loader).
3. ``predict``: ``predict_records`` end to end (224 px PNG tiles -> submission CSV) at a large
   batch, torch eager vs the same model under torch.compile.

Rows are skipped (``skipped: budget``) once ``--budget`` seconds have passed, so the run stays
within its slot; the order puts the rows that decide defaults first.
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

from buildseg.config import Config  # noqa: E402
from buildseg.losses import DeepSupervisionLoss, parse_loss  # noqa: E402
from buildseg.models import ModelCard, build_model  # noqa: E402
from train_throughput import training_step  # noqa: E402

SETTINGS = ("fp32", "bf16+cl", "bf16+cl+compile", "bf16+cl+graphs")


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    @property
    def left(self) -> float:
        return self.end - time.monotonic()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(encoder: str, batch: int, setting: str, device: torch.device, size: int, steps: int) -> tuple[float, float]:
    """(img/s over ``steps`` timed steps, seconds of the first steps: compile + warm-up)."""
    torch.manual_seed(0)
    channels_last = "cl" in setting
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(ModelCard(encoder=encoder), "none").to(device).train().to(memory_format=fmt)
    forward = model
    if "compile" in setting:
        forward = torch.compile(model)
    elif "graphs" in setting:
        forward = torch.compile(model, mode="reduce-overhead")
    precision = "bf16" if "bf16" in setting else "fp32"
    loss_fn = DeepSupervisionLoss(parse_loss(Config().loss))
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device).contiguous(memory_format=fmt)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.8).float()

    step = training_step(forward, loss_fn, optimizer, x, y, device, precision)
    start = time.perf_counter()
    for _ in range(3):
        step()
    _sync(device)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start), warm


def train_table(args, device: torch.device, budget: Budget) -> dict[str, int]:
    """Prints the training table; returns the largest batch that fit per model (bf16+cl)."""
    print(f"\n### train (img/s of the training step, {args.size} px, {args.steps} timed steps after 3 warm-up)\n")
    print("| model | batch | setting | img/s | vs fp32 | first 3 steps (s) | compile s | steps to pay back |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    fitted: dict[str, int] = {}
    for encoder in args.models:
        for batch in args.batches:
            eager: dict[str, float] = {}
            for setting in SETTINGS:
                label = f"| Unet-{encoder} | {batch} | {setting} |"
                if budget.left < 0:
                    print(f"{label} skipped: budget | | | | |", flush=True)
                    continue
                if "graphs" in setting and device.type != "cuda":
                    print(f"{label} n/a: CUDA graphs need a GPU | | | | |", flush=True)
                    continue
                try:
                    rate, warm = train_rate(encoder, batch, setting, device, args.size, args.steps)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    print(f"{label} OOM | | | | |", flush=True)
                    continue
                except Exception as exc:  # a compile backend missing on this machine: say so, go on
                    print(f"{label} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]} | | | | |", flush=True)
                    continue
                eager.setdefault(setting, rate)
                base = eager.get("fp32")
                ratio = f"{rate / base:.2f}x" if base else ""
                compile_s, payback = "", ""
                if "compile" in setting or "graphs" in setting:
                    reference = eager.get("bf16+cl")
                    if reference:
                        per_step_eager, per_step = batch / reference, batch / rate
                        extra = warm - 3 * per_step_eager
                        compile_s = f"{extra:.0f}"
                        saved = per_step_eager - per_step
                        payback = f"{extra / saved:.0f}" if saved > 0 else "never"
                if setting == "bf16+cl":
                    fitted[encoder] = batch
                print(f"{label} {rate:.0f} | {ratio} | {warm:.1f} | {compile_s} | {payback} |", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return fitted


def loader_row(args, device: torch.device, budget: Budget, batch: int, data: Path) -> None:
    from buildseg.training.loop import train

    print(f"\n### loader (the real `buildseg train` loop, {args.loop_minutes} min, decoded store, default workers)\n")
    print("| model | batch | workers | img/s | data_wait |")
    print("|---|---:|---:|---:|---:|")
    if budget.left < args.loop_minutes * 60:
        print(f"| Unet-{args.models[0]} | {batch} | | skipped: budget | |", flush=True)
        return
    from buildseg.runtime.device import default_workers

    config = Config()
    config.data.train, config.data.crop_size, config.data.cache = str(data / "train.csv"), args.size, "disk"
    config.model.encoder, config.model.weights = args.models[0], "none"
    config.train.out = tempfile.mkdtemp(prefix="gpu_bench_loop_")
    config.train.device, config.train.batch_size, config.train.epochs = str(device), batch, 1000
    config.train.time_limit = args.loop_minutes
    config.train.progress = config.train.tensorboard = config.train.tune_at_end = config.train.quantize_at_end = False
    history = train(config).history
    last = history[-1]
    print(f"| Unet-{args.models[0]} | {batch} | {default_workers(-1)} | {last['train_img_s']:.0f} | "
          f"{100 * last.get('data_wait', float('nan')):.0f}% |", flush=True)


def predict_rows(args, device: torch.device, budget: Budget, data: Path) -> None:
    from buildseg.formats.tables import load_records
    from buildseg.inference.core import engines
    from buildseg.inference.core.segmenter import Segmenter
    from buildseg.inference.jobs.tiles import predict_records

    records = load_records(data / "test.csv")
    print(f"\n### predict (predict_records end to end, {len(records)} PNG tiles of {args.test_size} px, "
          f"batch {args.predict_batch})\n")
    print("| model | engine | precision | img/s | vs eager |")
    print("|---|---|---|---:|---:|")
    for encoder in args.models:
        eager = None
        for compiled in (False, True):
            label = f"| Unet-{encoder} | torch{' + compile' if compiled else ''} |"
            if budget.left < 0:
                print(f"{label} | skipped: budget | |", flush=True)
                continue
            torch.manual_seed(0)
            seg = Segmenter([build_model(ModelCard(encoder=encoder), "none")], device=str(device), engine="torch")
            if compiled:
                seg.runners = [engines.torch_engine(torch.compile(m), seg.device, seg.precision, seg.channels_last)
                               for m in seg.models]
                predict_records(seg, records[: args.predict_batch * 2], data / "warm.csv", batch_size=args.predict_batch,
                                progress=False)  # compile outside the timing
            _, stats = predict_records(seg, records, data / "sub.csv", batch_size=args.predict_batch, progress=False)
            eager = eager or stats.img_per_s
            print(f"{label} {seg.precision} | {stats.img_per_s:.0f} | {stats.img_per_s / eager:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="*", default=["efficientnet_lite0", "resnet34", "resnet50"])
    parser.add_argument("--batches", nargs="*", type=int, default=[32, 128, 256])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--loop-minutes", type=float, default=0.75)
    parser.add_argument("--n-test", type=int, default=4096)
    parser.add_argument("--test-size", type=int, default=224)
    parser.add_argument("--predict-batch", type=int, default=256)
    parser.add_argument("--budget", type=float, default=420, help="seconds; later rows are skipped past it")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    budget = Budget(args.budget)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (rehearsal)"
    print(f"gpu_bench on {name}; torch {torch.__version__}; budget {args.budget:.0f} s")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    from buildseg.data.synth import write_dataset

    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_bench_"))
    write_dataset(work, n_train=8, train_size=max(args.size * 2, 256), n_test=args.n_test, test_size=args.test_size,
                  seed=0, progress=False)
    fitted = train_table(args, device, budget)
    loader_row(args, device, budget, fitted.get(args.models[0], args.batches[0]), work)
    predict_rows(args, device, budget, work)
    print(f"\ngpu_bench done, {args.budget - budget.left:.0f} s")


if __name__ == "__main__":
    main()
