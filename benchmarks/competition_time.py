"""How long the competition's 60,640 test tiles take: `predict` end to end on N synthetic
224x224 PNG tiles (default 6,000) with one engine and precision, scaled to 60,640.

Prints the per-stage profile (the same table as `buildseg predict --profile`), so a slow
run shows whether decoding, the model or post-processing bounds it.

    .venv/bin/python benchmarks/competition_time.py --checkpoint RUN/best.pt --engine openvino --precision int8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from buildseg.data.synth import write_dataset  # noqa: E402
from buildseg.formats.tables import load_records  # noqa: E402
from buildseg.inference.core.segmenter import Segmenter  # noqa: E402
from buildseg.inference.jobs.tiles import predict_records  # noqa: E402
from loader_throughput import cpu_flags  # noqa: E402

COMPETITION_TILES = 60_640


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--n", type=int, default=6000)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--tiles", default="runs/competition_tiles", help="where the synthetic tiles are kept")
    args = parser.parse_args()
    folder = Path(args.tiles) / str(args.n)
    if not (folder / "test.csv").is_file():
        write_dataset(folder, n_train=0, n_test=args.n, test_size=224, seed=11, progress=False)
    records = load_records(folder / "test.csv")
    seg = Segmenter.from_checkpoint(args.checkpoint, device="cpu", precision=args.precision, engine=args.engine)
    predict_records(seg, records[:64], folder / "warm.csv", progress=False)  # compile / load the engine's cache
    started = time.perf_counter()
    _, stats = predict_records(seg, records, folder / "sub.csv", progress=False)
    seconds = time.perf_counter() - started
    print(f"CPU: {cpu_flags()}, torch threads {torch.get_num_threads()}")
    print(f"engine {seg.engine}, precision {seg.precision}: {len(records)} tiles in {seconds:.1f} s = "
          f"{len(records) / seconds:.1f} img/s -> {COMPETITION_TILES:,} tiles in "
          f"{COMPETITION_TILES / (len(records) / seconds) / 60:.1f} min")
    print(stats.profile_table())


if __name__ == "__main__":
    main()
