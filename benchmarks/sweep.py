"""Held-out bits per byte of the quickstart spec under a few overrides, side by side.

Each variant trains the quickstart spec (plus the shared ``--base`` overrides) in its own run
folder and reports held-out bits per byte; variants run two at a time (one thread each) so a
pair sees the same machine load. Used to choose defaults, e.g. gradient clipping:

    python benchmarks/sweep.py --base train.steps=200 \\
        --variant train.grad_clip=1.0 --variant train.grad_clip=0.1 \\
        --variant train.grad_clip=0.05 --variant train.grad_clip=0.025
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--variant", action="append", required=True, metavar="KEY=VALUE[,KEY=VALUE]")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bitlm-sweep-"))
    common = ["sample.count=0", "train.threads=1"] + args.base
    results = {}
    for i in range(0, len(args.variant), args.jobs):
        batch = args.variant[i:i + args.jobs]
        procs = []
        for j, variant in enumerate(batch):
            overrides = common + variant.split(",")
            cmd = [sys.executable, "-m", "bitlm_core.cli", "run", "-q", "--out",
                   str(root / f"v{i + j}")] + [a for o in overrides for a in ("-o", o)]
            procs.append((variant, i + j, subprocess.Popen(cmd, stdout=subprocess.DEVNULL)))
        for variant, k, proc in procs:
            if proc.wait() != 0:
                raise SystemExit(f"variant {variant} failed (exit {proc.returncode})")
            summary = json.loads((root / f"v{k}" / "summary.json").read_text())
            results[variant] = summary
    print(f"quickstart spec with {' '.join(args.base) or 'no overrides'}; {args.jobs} at a time")
    print("| variant | steps | train s | held-out bpb |")
    print("|---|---:|---:|---:|")
    for variant, s in results.items():
        print(f"| {variant} | {s['steps']} | {s['train_seconds']:.0f} | "
              f"{s['held_out_bits_per_byte']:.3f} |")


if __name__ == "__main__":
    main()
