"""OpenVINO's latency mode vs its throughput mode, per core count, model and precision, with
the GFLOP per tile and the fraction of the CPU's nominal peak each reaches.

    .venv/bin/python benchmarks/engine_modes.py [--models efficientnet_lite0 resnet50] [--cores 1 2] [--seconds 4]

Latency mode is what `predict` ran before: one synchronous request of the whole batch (32
tiles of 224 px) on every core. Throughput mode (`--engine-mode throughput`) cuts the batch
into one chunk per infer request and keeps them in flight on OpenVINO's streams. Both run
the same engine code (`engines.openvino_engine`) on the same random uint8 batch; the core
count is the process's CPU affinity (and OpenVINO's thread count), set before each engine is
built. Weights are random (speed does not depend on them); int8 is NNCF's plain
post-training quantisation on 16 random images.

GFLOP per tile: torch's FlopCounterMode on one 224 px tile (2 FLOP per multiply-add).
Nominal peak: cores x max clock x FLOP per cycle per core for the precision's best
instructions on this CPU (fp32: 32 AVX2 / 64 AVX-512; bf16: 128 AVX512-BF16 / 1024 AMX;
int8: 128 AVX2 / 256 AVX512-VNNI / 2048 AMX). It is an upper bound that counts one core per
vCPU; reaching 20-40% of it on a convolutional network is good, reaching 5% means the engine
waits on memory or on small layers.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from buildseg.inference.core import engines  # noqa: E402
from buildseg.models import ModelCard, build_model  # noqa: E402
from loader_throughput import cpu_flags  # noqa: E402

TILE, BATCH = 224, 32
TIE = 1.05  # a mode wins only by more than 5%: closer is within the run-to-run noise of these timings


def gflop_per_tile(model) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, TILE, TILE))
    return counter.get_total_flops() / 1e9


def max_clock_ghz() -> float:
    text = os.popen("lscpu 2>/dev/null").read()
    found = re.search(r"CPU max MHz:\s*([\d.]+)", text)
    if found:
        return float(found.group(1)) / 1000
    mhz = re.findall(r"cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text())
    return max(map(float, mhz)) / 1000 if mhz else float("nan")


def flop_per_cycle(precision: str, flags: set[str]) -> int:
    if precision == "int8":
        return 2048 if "amx_int8" in flags else 256 if "avx512_vnni" in flags else 128
    if precision == "bf16" and "amx_bf16" in flags:
        return 1024
    if precision == "bf16" and "avx512_bf16" in flags:
        return 128
    return 64 if "avx512f" in flags else 32


def quantize_random(model, folder: Path) -> None:
    """A plain int8 model of ``model`` where the engine looks for it (random calibration)."""
    import nncf
    import openvino as ov

    onnx = str(engines.cached_onnx(model, folder))
    images = [np.random.default_rng(k).integers(0, 256, (1, 3, TILE, TILE)).astype(np.float32) for k in range(16)]
    quantized = nncf.quantize(ov.Core().read_model(onnx), nncf.Dataset(images), subset_size=len(images))
    ov.save_model(quantized, str(engines.int8_path(model, None)))


def img_per_s(run, batch: torch.Tensor, seconds: float) -> float:
    run(batch)  # compile for this shape
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        run(batch)
        n += len(batch)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["efficientnet_lite0", "resnet50"])
    parser.add_argument("--precisions", nargs="*", default=["fp32", "bf16", "int8"])
    parser.add_argument("--cores", nargs="*", type=int, default=None, help="default: 1 and all this process may use")
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    allowed = sorted(os.sched_getaffinity(0))
    cores = args.cores or sorted({1, len(allowed)})
    text = Path("/proc/cpuinfo").read_text()
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    ghz = max_clock_ghz()
    batch = torch.randint(0, 256, (BATCH, 3, TILE, TILE), dtype=torch.uint8)
    print(f"CPU flags: {cpu_flags()}; max clock {ghz:.2f} GHz; {len(allowed)} cores usable; batch {BATCH} x {TILE} px\n")
    print("| model | GFLOP/tile | precision | cores | latency img/s | throughput img/s | winner | GFLOP/s (best) "
          "| nominal peak GFLOP/s | fraction of peak |")
    print("|---|---:|---|---:|---:|---:|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[engines.CACHE_ENV] = tmp
        for name in args.models:
            torch.manual_seed(0)
            model = build_model(ModelCard(encoder=name), "none").eval()
            gflop = gflop_per_tile(model)
            if "int8" in args.precisions:
                quantize_random(model, Path(tmp))
            for precision in args.precisions:
                for n in cores:
                    os.sched_setaffinity(0, allowed[:n])
                    rates = {mode: img_per_s(engines.openvino_engine(model, precision, Path(tmp), None, threads=n,
                                                                     mode=mode), batch, args.seconds)
                             for mode in ("latency", "throughput")}
                    best = max(rates, key=rates.get)
                    winner = best if rates[best] > TIE * min(rates.values()) else f"tie (<{100 * (TIE - 1):.0f}%)"
                    achieved = rates[best] * gflop
                    peak = n * ghz * flop_per_cycle(precision, flags)
                    print(f"| Unet-{name} | {gflop:.2f} | {precision} | {n} | {rates['latency']:.1f} | "
                          f"{rates['throughput']:.1f} | {winner} | {achieved:.0f} | {peak:.0f} | "
                          f"{100 * achieved / peak:.1f}% |", flush=True)
            os.sched_setaffinity(0, allowed)


if __name__ == "__main__":
    main()
