"""Distillation: a small student trained with a teacher run against the same student alone.

The teacher is the quickstart model (4 blocks; ``--teacher RUN`` reuses a run folder of the
quickstart spec, e.g. ``runs/quickstart`` from ``make run``; otherwise it is trained here). The
students have 2 blocks and train for the same steps on the same split: one with the ``causal``
objective (the baseline of the same run), the others with ``distill`` at several ``alpha``.
Prints held-out bits per byte (the students' own cross-entropy) and training seconds.

    python benchmarks/distill.py --teacher runs/quickstart --jobs 2
    python benchmarks/distill.py --steps 200 --alphas 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def student_spec(alpha: float | None, teacher: Path, steps: int) -> dict:
    objective = ({"name": "causal"} if alpha is None else
                 {"name": "distill", "options": {"teacher": str(teacher), "alpha": alpha}})
    return {
        "name": "distill-bench",
        "data": {"corpus": {"name": "quickstart"}, "seq_len": 128},
        "model": {"layout": "framed", "d_model": 128, "n_layers": 2, "n_heads": 4},
        "objective": objective,
        "train": {"steps": steps, "batch_size": 32, "lr": 0.003, "warmup_steps": 50,
                  "eval_every": steps, "checkpoint_every": steps, "threads": 1,
                  "log_every": 100},
        "sample": {"count": 0},
    }


def train(alpha: float | None, teacher: Path, steps: int, root: Path) -> tuple:
    from bitlm_core.app.run import execute
    from bitlm_core.spec import validate_spec

    label = "causal" if alpha is None else f"distill alpha {alpha}"
    summary = execute(validate_spec(student_spec(alpha, teacher, steps)),
                      root / label.replace(" ", "_"), log=lambda m: None)
    return label, summary["held_out_bits_per_byte"], summary["train_seconds"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, help="run folder of the quickstart spec to reuse")
    p.add_argument("--steps", type=int, default=800, help="training steps per student")
    p.add_argument("--alphas", default="0.5,0.9", help="comma-separated distill weights")
    p.add_argument("--jobs", type=int, default=1, help="students trained at once (1 core each)")
    p.add_argument("--out", help="keep the run folders here (default: a temporary folder)")
    args = p.parse_args(argv)

    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bitlm-distill-"))
    teacher = args.teacher
    if teacher is None:
        import bitlm_core

        spec = load_spec(Path(bitlm_core.__file__).parent / "data" / "quickstart.yaml",
                         ["train.threads=1", "sample.count=0"])
        teacher = root / "teacher"
        execute(spec, teacher, log=lambda m: None)
    summary = json.loads((teacher / "summary.json").read_text())
    alphas = [None] + [float(a) for a in args.alphas.split(",") if a]
    jobs = [(a, teacher.resolve(), args.steps, root) for a in alphas]
    if args.jobs > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(args.jobs, mp.get_context("spawn")) as pool:
            rows = list(pool.map(train, *zip(*jobs)))
    else:
        rows = [train(*j) for j in jobs]

    print(f"\nquickstart corpus, framed d_model 128, students: 2 blocks, {args.steps} steps, "
          f"1 thread each, {args.jobs} at once; teacher: {teacher}\n")
    print("| model | held-out bits per byte | train s |")
    print("|---|---:|---:|")
    print(f"| teacher (4 blocks, {summary['steps']} steps) | "
          f"{summary['held_out_bits_per_byte']:.3f} | {summary['train_seconds']:.0f} |")
    for label, bpb, seconds in rows:
        print(f"| student, {label} | {bpb:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
