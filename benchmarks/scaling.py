"""Progressive scaling: a model grown halfway through training against fixed-size models.

Trains, on the same corpus, split and number of steps, a small model, the large model it grows
into, and the small model grown into the large one halfway through by a scaling strategy:
``depth`` (2 -> 4 blocks) and ``width`` (feed-forward 256 -> 512 units), each with its default
``init: copy`` and with ``init: random``. The growth is made to happen at the middle
evaluation (``min_delta`` 10 makes every evaluation after the first a plateau), so the rows
compare like with like. Prints held-out bits per byte, training seconds
and parameters; the fixed-size models are the baselines of the same run.

    python benchmarks/scaling.py                  # quickstart corpus, 800 steps per model
    python benchmarks/scaling.py --steps 200 --jobs 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# name -> (model overrides, scaling strategy or None)
RUNS = {
    "2 blocks": ({"n_layers": 2}, None),
    "4 blocks": ({"n_layers": 4}, None),
    "2 -> 4 blocks (depth)": ({"n_layers": 2},
                              {"name": "depth", "options": {"add": 2, "max_layers": 4}}),
    "2 -> 4 blocks (depth; init random)": (
        {"n_layers": 2},
        {"name": "depth", "options": {"add": 2, "max_layers": 4, "init": "random"}}),
    "d_ff 256": ({"n_layers": 4, "d_ff": 256}, None),  # "4 blocks" has d_ff 512 (4 x d_model)
    "d_ff 256 -> 512 (width)": ({"n_layers": 4, "d_ff": 256},
                                {"name": "width", "options": {"factor": 2, "max_d_ff": 512}}),
    "d_ff 256 -> 512 (width; init random)": (
        {"n_layers": 4, "d_ff": 256},
        {"name": "width", "options": {"factor": 2, "max_d_ff": 512, "init": "random"}}),
}


def spec_for(name: str, args) -> dict:
    model, strategy = RUNS[name]
    corpus = ({"name": "file", "options": {"path": str(Path(args.corpus).resolve())}}
              if args.corpus else {"name": "quickstart"})
    spec = {
        "name": "scaling-bench",
        "data": {"corpus": corpus, "seq_len": 128},
        "model": {"layout": "framed", "d_model": 128, "n_heads": 4, **model},
        "train": {"steps": args.steps, "batch_size": 32, "lr": 0.003, "warmup_steps": 50,
                  "eval_every": max(1, args.steps // 4), "eval_batches": 8,
                  "checkpoint_every": args.steps, "threads": 1, "log_every": 100,
                  "seed": args.seed},
        "sample": {"count": 0},
    }
    if strategy:
        spec["scaling"] = {"strategy": strategy, "patience": 1, "min_delta": 10.0,
                           "max_growths": 1}
    return spec


def train(name: str, args, root: Path) -> tuple[str, float, float, int, str]:
    import json

    from bitlm_core.app.run import execute
    from bitlm_core.spec import validate_spec

    folder = root / "".join(c if c.isalnum() else "_" for c in name)
    summary = execute(validate_spec(spec_for(name, args)), folder, log=lambda m: None)
    grown = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
    grown = [f"step {r['step']}: {r['change']}" for r in grown if r.get("split") == "scaling"]
    return (name, summary["held_out_bits_per_byte"], summary["train_seconds"],
            summary["parameters"], "; ".join(grown))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", help="text file (.gz ok); default: the quickstart corpus")
    p.add_argument("--steps", type=int, default=800, help="training steps per model")
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated rows to train")
    p.add_argument("--jobs", type=int, default=1, help="models trained at once (1 core each)")
    p.add_argument("--seed", type=int, default=0, help="train.seed of every run")
    p.add_argument("--out", help="keep the run folders here (default: a temporary folder)")
    args = p.parse_args(argv)

    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        p.error(f"unknown run {unknown[0]!r}; choose from: {', '.join(RUNS)}")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bitlm-scaling-"))
    if args.jobs > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(args.jobs, mp.get_context("spawn")) as pool:
            rows = list(pool.map(train, names, [args] * len(names), [root] * len(names)))
    else:
        rows = [train(n, args, root) for n in names]

    where = args.corpus or "quickstart corpus"
    print(f"\n{where}: framed, d_model 128, {args.steps} steps each, seed {args.seed}, 1 thread "
          f"per model, {args.jobs} at once\n")
    print("| model | held-out bits per byte | train s | parameters at the end | growth |")
    print("|---|---:|---:|---:|---|")
    for name, bpb, seconds, params, grown in rows:
        print(f"| {name} | {bpb:.3f} | {seconds:.0f} | {params:,} | {grown or '-'} |")


if __name__ == "__main__":
    main()
