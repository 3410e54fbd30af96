"""Training-step time of the quickstart model with 1 and 2 torch threads.

Each configuration runs in its own process (OMP_WAIT_POLICY must be set before torch is
imported), trains the same model on the same batches, and reports the median step time. The
table compares each configuration with 1 thread, passive waiting (bitlm's default).

    python benchmarks/threads.py [--steps 12] [--layout framed]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from bitlm_core.spec import load_spec
from bitlm_core.app.build import build_model
from bitlm_core.components import Components
from bitlm_core.engine.optim import make_optimizer
threads, steps, layout = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(threads)
spec = load_spec(None, [f"model.layout={layout}"] + (["data.seq_len=32"] if layout == "flat" else []))
comps = Components.build(spec)
model = build_model(spec, comps)
opt = make_optimizer(model, spec.train)
g = torch.Generator().manual_seed(0)
bits = torch.randint(0, 2, (spec.train.batch_size, spec.data.seq_len * 9), generator=g,
                     dtype=torch.uint8)
times = []
for _ in range(steps):
    t = time.perf_counter()
    out = comps.objective(model, bits)
    out.loss.backward()
    opt.step(); opt.zero_grad()
    times.append(time.perf_counter() - t)
print(json.dumps(times[2:]))
"""


def measure(threads: int, policy: str, steps: int, layout: str) -> float:
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(steps), layout],
                         env=env, capture_output=True, text=True, check=True)
    return statistics.median(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--layout", default="framed", choices=["framed", "flat"])
    args = parser.parse_args()
    configs = [(1, "PASSIVE"), (1, "ACTIVE"), (2, "PASSIVE"), (2, "ACTIVE")]
    results = {c: measure(*c, args.steps, args.layout) for c in configs}
    base = results[(1, "PASSIVE")]
    print(f"quickstart model, layout {args.layout}, median of {args.steps - 2} steps, "
          f"cpus {os.cpu_count()}")
    print(f"| threads | OMP_WAIT_POLICY | s/step | vs 1 thread passive |")
    print(f"|---:|---|---:|---:|")
    for (threads, policy), t in results.items():
        print(f"| {threads} | {policy} | {t:.3f} | {base / t:.2f}x |")


if __name__ == "__main__":
    main()
