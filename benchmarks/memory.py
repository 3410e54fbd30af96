"""Memory and speed of the memory-saving layers and precisions, the training-step estimate that
`bitlm run` checks against, and `bitlm eval` on texts of growing size.

Depth table: for plain, checkpointed (``model.checkpointing: blocks``) and reversible models of
2, 4, 8 and 16 blocks (framed, d_model 256, batch 8 x 128 bytes, one thread), the peak
activation memory of one training step (peak resident memory of its forward and backward
minus what the process held before them, parameters, gradients and optimizer state already
allocated; a fresh process per configuration, peak reset through /proc/self/clear_refs) and
the whole step's time (median of the timed steps); ratios against the plain model of the same depth, and the growth
from 2 to 16 blocks.

Precision table: step time of bf16 autocast and of torch.compile against fp32 eager, same
model (8 x 256), same process kind; compile's own time apart.

Table 1: for the quickstart model (framed and flat), bitlm's estimate of a training step's
memory (``bitlm_core.app.build.training_memory``) against what a few training steps really
added to a process: peak resident memory of the steps minus the same process's peak before
them. The ratio is estimate over measurement: the check refuses specs by it, so it should be
near 1 and not far below.

Table 2: peak resident memory of ``bitlm eval`` (a fresh process each) on texts of 1x, 2x and
4x a base size, with a tiny run; the baseline is the 1x text. Flat means memory does not grow
with the text.

    python benchmarks/memory.py [--steps 3] [--text-mb 1] [--only depth,precision] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LAYER_CHILD = r"""
import json, os, statistics, sys, time, torch
from bitlm_core.app.build import build_model
from bitlm_core.app.run import load_dataset
from bitlm_core.components import Components
from bitlm_core.engine.trainer import Trainer, TrainState
from bitlm_core.spec import load_spec

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

overrides, steps, folder, device = (json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                   sys.argv[4])
torch.set_num_threads(1)
spec = load_spec(None, ["train.threads=1", "telemetry.metrics=[]", "model.d_model=256",
                        "model.n_heads=8", "data.seq_len=128", "train.batch_size=8",
                        "attention.name=auto", f"train.device={device}", *overrides])
comps = Components.build(spec)
model = build_model(spec, comps).to(device)
gpu = torch.device(device).type == "cuda"
dataset, _ = load_dataset(spec, comps, __import__("pathlib").Path(folder))
trainer = Trainer(spec, model, comps.objective, dataset, folder, lambda s: {}, log=lambda m: None)
for p in model.parameters():  # gradients and AdamW's moments exist before the measured step
    p.grad = torch.zeros_like(p)
trainer.optimizer.step()
state = TrainState()
if spec.train.compile:
    trainer.compile(state)
# activations: the peak of one forward and backward (the optimizer's update is not part of it)
batch = trainer.batch(0, 0)
if gpu:  # the allocator's own statistics
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
else:
    before = rss("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
comps.objective(trainer.net, batch.bits).loss.backward()
peak = torch.cuda.max_memory_allocated() if gpu else rss("VmHWM:")
del batch
times = []
for i in range(steps):
    start = time.perf_counter()
    trainer.step(state)
    if gpu:
        torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
    state.step += 1
print(json.dumps({"activations": peak - before, "step": statistics.median(times[1:] or times),
                  "compile": trainer.compile_seconds}))
"""


DEVICE = "cpu"  # --device


def layer_run(overrides: list[str], steps: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = subprocess.run([sys.executable, "-c", LAYER_CHILD, json.dumps(overrides),
                              str(steps), folder, DEVICE], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{overrides}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def depth_table(steps: int) -> None:
    modes = {"plain": [], "checkpointed": ["model.checkpointing=blocks"],
             "reversible": ["model.reversible=true"]}
    depths = (2, 4, 8, 16)
    r = {(m, d): layer_run(extra + [f"model.n_layers={d}"], steps)
         for d in depths for m, extra in modes.items()}
    print("| model | blocks | peak activations | vs plain | step s | vs plain |")
    print("|---|---:|---:|---:|---:|---:|")
    for m in modes:
        for d in depths:
            x, p = r[m, d], r["plain", d]
            print(f"| {m} | {d} | {x['activations'] / 2**20:,.0f} MiB | "
                  f"{x['activations'] / p['activations']:.2f} | {x['step']:.3f} | "
                  f"{x['step'] / p['step']:.2f} |")
    print("\nGrowth of peak activation memory from 2 to 16 blocks:")
    for m in modes:
        print(f"- {m}: {r[m, 16]['activations'] / r[m, 2]['activations']:.2f}x")


def precision_table(steps: int) -> None:
    base = ["model.n_layers=8"]
    rows = {"fp32 eager": base, "bf16 eager": base + ["train.precision=bf16"],
            "fp32 compiled": base + ["train.compile=true"],
            "bf16 compiled": base + ["train.precision=bf16", "train.compile=true"]}
    r = {name: layer_run(extra, steps) for name, extra in rows.items()}
    ref = r["fp32 eager"]["step"]
    print("| 8 x 256, batch 8 x 128 | step s | speed vs fp32 eager | compile s |")
    print("|---|---:|---:|---:|")
    for name, x in r.items():
        print(f"| {name} | {x['step']:.3f} | {ref / x['step']:.2f}x | "
              f"{x['compile']:.1f} |")


STEP_CHILD = r"""
import json, resource, sys, torch
from bitlm_core.app.build import build_model, training_memory
from bitlm_core.app.run import load_dataset
from bitlm_core.components import Components
from bitlm_core.engine.trainer import Trainer, TrainState
from bitlm_core.spec import load_spec
layout, steps, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
spec = load_spec(None, [f"model.layout={layout}", "train.threads=1", "telemetry.metrics=[]"])
comps = Components.build(spec)
model = build_model(spec, comps)
dataset, _ = load_dataset(spec, comps, __import__("pathlib").Path(folder))
trainer = Trainer(spec, model, comps.objective, dataset, folder, lambda s: {})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
state = TrainState()
for _ in range(steps):
    trainer.step(state)
    state.step += 1
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"estimate": sum(training_memory(spec, comps).values()),
                  "added": after - before}))
"""


def training_table(steps: int) -> None:
    print("| layout | estimate | added by training | estimate / added |")
    print("|---|---:|---:|---:|")
    for layout in ("framed", "flat"):
        with tempfile.TemporaryDirectory() as folder:
            out = subprocess.run([sys.executable, "-c", STEP_CHILD, layout, str(steps), folder],
                                 capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {layout} | {r['estimate'] / 2**20:,.0f} MiB | {r['added'] / 2**20:,.0f} MiB "
              f"| {r['estimate'] / r['added']:.2f} |")


def peak_of(args: list[str], cwd: Path) -> int:
    """Peak resident memory (bytes) of a `bitlm` command run in its own process."""
    code = ("import resource, runpy, sys; sys.argv = ['bitlm'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('bitlm_core.cli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         cwd=cwd, check=True)
    return int(next(line for line in out.stdout.splitlines() if line.startswith("PEAK"))
               .split()[1])


def eval_table(text_mb: float) -> None:
    import random

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        words = "the cat sat on the mat and the dog sat on the log".split()
        rng = random.Random(0)
        base = " ".join(rng.choice(words) for _ in range(int(text_mb * 2**20 / 4)))
        (root / "corpus.txt").write_text(base[:200_000])
        spec = {"name": "m", "data": {"corpus": {"name": "file", "options": {
            "path": "corpus.txt"}}, "seq_len": 32}, "model": {"d_model": 32, "n_layers": 1,
            "n_heads": 2}, "train": {"steps": 2, "batch_size": 4, "eval_every": 2},
            "sample": {"bytes": 4}}
        (root / "spec.json").write_text(json.dumps(spec))
        subprocess.run([sys.executable, "-m", "bitlm_core.cli", "run", "spec.json", "--out",
                        "run", "-q"], cwd=root, check=True, capture_output=True)
        sizes = {}
        for factor in (1, 2, 4):
            (root / f"text{factor}.txt").write_text(base * factor)
            sizes[factor] = peak_of(["eval", "run", "--text", f"text{factor}.txt", "--stride",
                                     "32"], root)
    print("| text | peak memory of `bitlm eval` | vs 1x |")
    print("|---:|---:|---:|")
    for factor, peak in sizes.items():
        print(f"| {factor * text_mb:g} MB | {peak / 2**20:,.0f} MiB | "
              f"{peak / sizes[1]:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="training steps measured")
    parser.add_argument("--text-mb", type=float, default=1.0, help="the base text's size")
    parser.add_argument("--only", default="depth,precision,estimate,eval",
                        help="tables to print, comma-separated")
    parser.add_argument("--device", default="cpu", help="depth and precision tables: cpu "
                        "(peak RSS) or cuda (torch.cuda.max_memory_allocated)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    only = set(args.only.split(","))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "depth" in only:
        print("Memory-saving layers against depth (framed, 256 wide, batch 8 x 128, one "
              "thread):\n")
        depth_table(max(args.steps, 2))
    if "precision" in only:
        print("\nPrecision and compile (one thread):\n")
        precision_table(max(args.steps, 4))
    if "estimate" in only:
        print("\nTraining-step memory, quickstart model, one thread:\n")
        training_table(args.steps)
    if "eval" in only:
        print("\n`bitlm eval` on texts of growing size (a tiny run, stride = context):\n")
        eval_table(args.text_mb)


if __name__ == "__main__":
    main()
