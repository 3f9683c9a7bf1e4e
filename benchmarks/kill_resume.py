"""A timed checkpoint survives kill -9: train, SIGKILL after N seconds, --resume, compare.

Runs ``buildseg train`` twice on the same data and settings (``--deterministic``): once
straight through, once killed with SIGKILL ``--kill-after`` seconds in and resumed with
``--resume``. Prints how much work the kill cost (steps done vs steps saved in the last
timed ``last.pt``) and whether the resumed run ends with exactly the weights of the straight
one.

    .venv/bin/python benchmarks/kill_resume.py --data ../shared/data/real_dev/train.csv
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def train_cmd(data: str, out: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "buildseg", "train", "--data", data, "--out", str(out), "--encoder", args.encoder,
            "--weights", "none", "--epochs", str(args.epochs), "--batch-size", "2", "--crop-size", "64",
            "--val-tile", "224", "--crops-per-image", str(args.crops_per_image), "--save-every", str(args.save_every),
            "--deterministic", "--precision", "fp32", "--num-workers", "1", "--no-progress", "--no-tensorboard"]


def steps_logged(run: Path) -> int:
    try:
        events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    except (OSError, json.JSONDecodeError):
        return 0
    return max((e["step"] for e in events if e["kind"] in ("step", "epoch")), default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--encoder", default="efficientnet_lite0")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--crops-per-image", type=int, default=4)
    parser.add_argument("--save-every", type=float, default=0.5, help="minutes")
    parser.add_argument("--kill-after", type=float, default=60.0, help="seconds")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="kill_resume_"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    started = time.monotonic()
    subprocess.run(train_cmd(args.data, root / "straight", args), check=True, env=env, capture_output=True)
    straight_s = time.monotonic() - started

    killed = root / "killed"
    proc = subprocess.Popen(train_cmd(args.data, killed, args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(args.kill_after)
    done_before_kill = steps_logged(killed)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(killed / "last.pt", weights_only=True)
    age = time.time() - (killed / "last.pt").stat().st_mtime
    leftovers = sorted(p.name for p in killed.iterdir() if p.name.endswith(".tmp"))
    started = time.monotonic()
    resume = subprocess.run([sys.executable, "-m", "buildseg", "train", "--resume", str(killed), "--no-progress"],
                            env=env, capture_output=True, text=True)
    resume_s = time.monotonic() - started
    assert resume.returncode == 0, resume.stderr[-2000:]

    a = torch.load(root / "straight" / "last.pt", weights_only=True)
    b = torch.load(killed / "last.pt", weights_only=True)
    same = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    print(f"data {args.data}, {args.encoder}, crop 64, batch 2, {args.epochs} epochs, --save-every {args.save_every} min")
    print("| measure | value |")
    print("|---|---:|")
    print(f"| straight run | {straight_s:.0f} s, {a['step']} steps |")
    print(f"| killed (SIGKILL) after | {args.kill_after:.0f} s |")
    print(f"| steps logged before the kill (>=) | {done_before_kill} |")
    print(f"| last.pt at the kill | epoch {saved['epoch']}, batch {saved['batch_in_epoch']}, step {saved['step']}, "
          f"written {age:.0f} s before the resume |")
    print(f"| temporary files left by the kill | {', '.join(leftovers) or 'none'} |")
    print(f"| resumed run | {resume_s:.0f} s to step {b['step']}, epoch {b['epoch']} |")
    print(f"| final weights equal to the straight run | {'yes, bit for bit' if same else 'NO'} |")
    print(f"| best val Dice straight / resumed | {a['best_score']:.4f} / {b['best_score']:.4f} |")


if __name__ == "__main__":
    main()
