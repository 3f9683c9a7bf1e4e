"""The ONNX export of the packaged model: torch.export (dynamic height and width, what OpenVINO's
engine cache needs) against tracing a fixed-size graph (what Deepness needs), in one process,
with each graph's largest difference from PyTorch on random tiles.

    python benchmarks/export_time.py [--size 512]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loader_throughput import cpu_flags  # noqa: E402


def main() -> None:
    from buildseg.inference.core.onnx_graph import export_model_onnx, onnx_parity
    from buildseg.runtime.checkpoint import checkpoint_paths, load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512, help="the fixed graph's tile side (Deepness: 512)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    model, _ = load_model(checkpoint_paths("model:buildings")[0])
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, size, shapes in (("torch.export, dynamic H, W", None, [(1, 3, 224, 224), (2, 3, 200, 330)]),
                                   (f"traced, fixed {args.size} px", args.size, [(1, 3, args.size, args.size),
                                                                               (3, 3, args.size, args.size)])):
            out = Path(tmp) / f"{len(rows)}.onnx"
            started = time.perf_counter()
            export_model_onnx(model, out, size=size)
            seconds = time.perf_counter() - started
            worst = max(onnx_parity(model.eval(), out, [rng.integers(0, 256, s).astype(np.float32)]) for s in shapes)
            rows.append((name, seconds, worst))
    print(f"CPU: {cpu_flags()}; {time.strftime('%Y-%m-%d')}")
    print("| graph | export s | x traced | max abs logit diff vs PyTorch |")
    print("|---|---:|---:|---:|")
    for name, seconds, worst in rows:
        print(f"| {name} | {seconds:.1f} | {seconds / rows[-1][1]:.1f} | {worst:.1e} |")


if __name__ == "__main__":
    main()
