"""Training speed and held-out bits per byte in 1 and 2 processes, at equal global batch.

Each configuration trains the quickstart model (framed, 128 x 4) for the same steps on the same
windows (``distributed.global_batch``, so every step covers the same 32 windows however many
processes share it; a pipeline's two stages each see all 32, in micro-batches) and reports
training steps per second (the run's own training time, which leaves out start-up) and the
final held-out bits per byte. The baseline is one process on one
thread, measured in the same run; the ratio is what a second process buys on this machine.

    python benchmarks/distributed.py [--steps 150] [--global-batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = [  # (label, processes, strategy, threads per process, other overrides)
    ("1 process, 1 thread", 1, "none", 1, {}),
    ("1 process, 2 threads", 1, "none", 2, {}),
    ("DDP, 2 processes x 1 thread", 2, "ddp", 1, {}),
    ("FSDP, 2 processes x 1 thread", 2, "fsdp", 1, {}),
    ("pipeline, 2 stages, 4 micro-batches", 2, "pipeline", 1, {"distributed.microbatches": 4}),
    ("pipeline, 2 stages, 8 micro-batches", 2, "pipeline", 1, {"distributed.microbatches": 8}),
]


def train(folder: Path, processes: int, strategy: str, threads: int, steps: int,
          global_batch: int, extra: dict) -> dict:
    overrides = {"train.steps": steps, "train.threads": threads, "train.eval_every": steps,
                 "train.checkpoint_every": steps, "train.log_every": steps,
                 "distributed.strategy": strategy, "distributed.global_batch": global_batch,
                 "telemetry.metrics": "[]", "sample.count": 0, **extra}
    cmd = [sys.executable, "-m", "bitlm_core", "run", "-q", "--out", str(folder)]
    for key, value in overrides.items():
        cmd += ["-o", f"{key}={value}"]
    if processes > 1:
        cmd += ["--nproc", str(processes)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads((folder / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--global-batch", type=int, default=32)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, n, strategy, threads, extra) in enumerate(CONFIGS):
            s = train(Path(tmp) / str(i), n, strategy, threads, args.steps, args.global_batch,
                      extra)
            rows.append((label, args.steps / s["train_seconds"], s["held_out_bits_per_byte"]))
            print(f"  {label}: done", file=sys.stderr)
    base = rows[0][1]
    print(f"quickstart model, {args.steps} steps of {args.global_batch} windows (128 bytes each)")
    print(f"{'configuration':<38} {'steps/s':>8} {'vs 1x1':>7} {'held-out bpb':>13}")
    for label, speed, bpb in rows:
        print(f"{label:<38} {speed:>8.2f} {speed / base:>6.2f}x {bpb:>13.4f}")


if __name__ == "__main__":
    main()
