"""Masked diffusion against the causal model: held-out bits per byte and sampling trade-offs.

Trains two models of the same shape on the same corpus, split and number of steps: one with the
``causal`` objective (exact bits per byte) and one with the ``diffusion`` objective (an upper
bound on bits per byte, from the masked-diffusion ELBO). Then, for the diffusion model, samples
``--sample-bytes`` bytes after a prompt with the ``diffusion`` sampler at several step counts and
reports the time per sample, parity bits it had to repair, and the share of generated words
found in the training text; the causal model's autoregressive sampler is the reference row.

    python benchmarks/diffusion.py                       # quickstart corpus, 600 steps each
    python benchmarks/diffusion.py --steps 100 --sampler-steps 8,32   # a quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def spec_for(objective: str, args) -> dict:
    corpus = ({"name": "file", "options": {"path": str(Path(args.corpus).resolve())}}
              if args.corpus else {"name": "quickstart"})
    return {
        "name": f"diffusion-bench-{objective}",
        "data": {"corpus": corpus, "seq_len": args.seq},
        "model": {"layout": args.layout, "d_model": 128, "n_layers": 4, "n_heads": 4},
        "objective": ({"name": objective} if objective == "causal"
                      else {"name": objective, "options": {"unit": args.unit}}),
        "train": {"steps": args.steps, "batch_size": 32, "lr": 0.003, "warmup_steps": 50,
                  "eval_every": args.steps, "checkpoint_every": args.steps,
                  "threads": args.threads, "log_every": 50},
        "sample": {"count": 0,
                   "sampler": {"name": "autoregressive" if objective == "causal"
                               else "diffusion"}},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", help="text file (.gz ok); default: the quickstart corpus")
    p.add_argument("--steps", type=int, default=600, help="training steps per model")
    p.add_argument("--layout", default="framed", choices=["framed", "flat"])
    p.add_argument("--seq", type=int, default=128, help="window in bytes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sampler-steps", default="8,32,128")
    p.add_argument("--sample-bytes", type=int, default=256)
    p.add_argument("--samples", type=int, default=3, help="samples per sampler setting")
    p.add_argument("--prompt", default="It was ")
    p.add_argument("--unit", default="bit", choices=["bit", "frame"],
                   help="what diffusion masks: single bits or whole byte frames")
    p.add_argument("--out", help="keep the run folders here (default: a temporary folder)")
    args = p.parse_args(argv)

    from bitlm_core.components import build
    from bitlm_core.registry import get_registry
    from bitlm_core.app.generate import generate
    from bitlm_core.app.loading import load_run
    from bitlm_core.app.run import execute
    from bitlm_core.spec import validate_spec
    from bitlm_core.app.textstats import vocabulary, word_share

    if "diffusion" not in get_registry().names("objective"):
        sys.exit("the diffusion plugin is not installed: pip install -e plugins/diffusion")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bitlm-diffusion-"))
    rows, runs = [], {}
    for objective in ("causal", "diffusion"):
        spec = validate_spec(spec_for(objective, args))
        started = time.perf_counter()
        summary = execute(spec, root / objective, log=lambda m: None)
        runs[objective] = load_run(root / objective)
        rows.append((objective, summary["held_out_bits_per_byte"], summary["is_bound"],
                     summary["train_seconds"], time.perf_counter() - started))
        print(f"trained {objective}: {summary['held_out_bits_per_byte']:.3f} bpb", flush=True)

    loaded = runs["causal"]
    corpus = build(loaded.comps.resolved["data.corpus"]).read()
    held_out = int(len(corpus) * loaded.spec.data.val_fraction)
    vocab = vocabulary(corpus[: len(corpus) - held_out])

    where = args.corpus or "quickstart corpus"
    print(f"\n{where}: {args.steps} steps each, layout {args.layout}, {args.seq}-byte windows, "
          f"{args.threads} thread(s), diffusion unit {args.unit}\n")
    print("| objective | held-out bits per byte | train s |")
    print("|---|---:|---:|")
    for objective, bpb, bound, seconds, _ in rows:
        label = f"{bpb:.3f} (bound)" if bound else f"{bpb:.3f}"
        print(f"| {objective} | {label} | {seconds:.0f} |")
    gap = rows[1][1] - rows[0][1]
    print(f"\ndiffusion bound minus causal: {gap:+.3f} bits per byte\n")

    print(f"| sampler | s per {args.sample_bytes}-byte sample | parity bits repaired | "
          f"words in training text |")
    print("|---|---:|---:|---:|")
    registry = get_registry()
    settings = [("autoregressive (causal model)", runs["causal"], loaded.comps.sampler)]
    for n in (int(x) for x in args.sampler_steps.split(",")):
        settings.append((f"diffusion ({args.unit}), {n} steps", runs["diffusion"],
                         registry.build("sampler", "diffusion",
                                        {"steps": n, "unit": args.unit})))
    example = {}
    for label, run, sampler in settings:
        times, fixed, shares = [], 0, []
        for seed in range(args.samples):
            result = generate(run.model, run.comps.encoder, sampler, args.prompt,
                              args.sample_bytes, seed=seed)
            times.append(result.seconds)
            fixed += result.parity_fixed
            share = word_share(result.text[len(args.prompt):].encode("utf-8"), vocab)
            shares.append(share or 0.0)
            example.setdefault(label, result.text)
        print(f"| {label} | {sum(times) / len(times):.2f} | {fixed / args.samples:.1f} | "
              f"{sum(shares) / len(shares):.0%} |", flush=True)
    print()
    for label, text in example.items():
        print(f"{label}: {text[:160]!r}")


if __name__ == "__main__":
    main()
