"""Quantization: file size, speed and held-out bits per byte of every weight format, in one run.

Two models on the quickstart corpus (framed, joint local predictor):

* the quickstart model (128 x 4), trained ``--steps`` steps in fp32, and again the same steps
  with ``train.qat: {bits: 4, group_size: 32, start_step: steps / 2}`` (4-bit
  quantization-aware training for the second half);
* a larger model (d_model 512 x 4 blocks, 8 heads), trained ``--large-steps`` steps in fp32.

Each fp32 run is then stored by every quantizer (``bitlm quantize --scheme``): int8-rowwise
(int8 storage, runs as float), int8-dynamic (int8 inference), int4 (4-bit post-training), and
the QAT run by int4 (4-bit QAT). For each: the weight file's size, the held-out bits per byte
(the run's own held-out split, every window), evaluation throughput (held-out bytes per
second) and sampling throughput (bytes per second of ``bitlm sample``'s loop, 200 bytes after
a prompt), all on one thread, the formats taking turns in every round (medians of
``--repeats`` rounds). Ratios are against the fp32 model of the same row group, measured in
the same run. Training is one thread too, so the runs are reproducible.

    python benchmarks/quantization.py --repeats 9         # about an hour on a 2-core CPU
    python benchmarks/quantization.py --steps 200 --large-steps 50 --repeats 3  # a quick look

``--keep DIR`` keeps the runs, and a second call with it measures them again without training.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
SAMPLE_BYTES = 200


def train(spec: dict, out: Path) -> Path:
    from bitlm_core.app.run import execute
    from bitlm_core.spec import validate_spec

    execute(validate_spec(spec), out, log=lambda m: None)
    return out


def quickstart(steps: int, **train) -> dict:
    from bitlm_core.spec import quickstart_dict

    spec = quickstart_dict()
    spec["train"].update(steps=steps, threads=1, eval_every=max(1, steps // 4),
                         checkpoint_every=steps, **train)
    spec["telemetry"] = {"metrics": []}
    spec["output"] = {"report": False}
    return spec


def measure(folders: dict[str, Path], repeats: int) -> dict[str, dict]:
    """Size, held-out bits per byte and throughputs of each run folder; the timings take
    turns (every format once per round), so a slower spell of the machine hits them all."""
    import torch

    from bitlm_core.app.generate import generate
    from bitlm_core.app.loading import load_run
    from bitlm_core.app.run import load_dataset
    from bitlm_core.engine.evaluation import evaluate
    from bitlm_core.store.checkpoint import latest_checkpoint

    torch.set_num_threads(1)
    runs = {name: load_run(folder, log=lambda m: None, device="cpu")
            for name, folder in folders.items()}
    out = {name: {"size": (latest_checkpoint(folders[name]) / "model.safetensors")
                  .stat().st_size, "eval_s": [], "sample_s": []} for name in runs}
    with torch.no_grad():
        for name, run in runs.items():
            dataset, _ = load_dataset(run.spec, run.comps, folders[name])
            out[name]["dataset"] = dataset
            evaluate(run.model, run.comps.objective, dataset, 16, max_batches=1)  # warm-up
            generate(run.model, run.comps.encoder, run.comps.sampler, "It was ", 20)
        for i in range(repeats):
            for name, run in runs.items():
                m = out[name]
                start = time.perf_counter()
                result = evaluate(run.model, run.comps.objective, m["dataset"], 16)
                m["eval_s"].append(time.perf_counter() - start)
                m["bpb"], m["bytes"] = result["bits_per_byte"], result["bytes"]
                start = time.perf_counter()
                generate(run.model, run.comps.encoder, run.comps.sampler, "It was ",
                         SAMPLE_BYTES, seed=i)
                m["sample_s"].append(time.perf_counter() - start)
    return {name: {"size": m["size"], "bpb": m["bpb"],
                   "eval": m["bytes"] / statistics.median(m["eval_s"]),
                   "sample": SAMPLE_BYTES / statistics.median(m["sample_s"])}
            for name, m in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800, help="quickstart model's steps")
    parser.add_argument("--large-steps", type=int, default=300, help="d_model 512 steps")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="folder to keep the runs in")
    args = parser.parse_args()

    from bitlm_core.app.quantize import quantize_run

    root = args.keep or Path(tempfile.mkdtemp(prefix="bitlm-bench-quant-"))
    root.mkdir(parents=True, exist_ok=True)
    large = quickstart(args.large_steps, warmup_steps=min(50, args.large_steps // 5),
                       lr=1e-3)
    large["model"].update(d_model=512, n_layers=4, n_heads=8)
    groups = {
        "quickstart (128 x 4)": (quickstart(args.steps), quickstart(
            args.steps, qat={"bits": 4, "group_size": 32, "start_step": args.steps // 2})),
        "d_model 512 x 4": (large, None),
    }
    rows = []
    for group, (spec, qat_spec) in groups.items():
        tag = "small" if qat_spec is not None else "large"
        fp32 = root / f"{tag}-fp32"
        if not (fp32 / "summary.json").exists():
            print(f"training {group} (fp32) ...", flush=True)
            train(spec, fp32)
        formats = [("fp32", fp32)]
        for scheme in ("int8-rowwise", "int8-dynamic", "int4"):
            out = root / f"{tag}-{scheme}"
            quantize_run(fp32, out, force=True, scheme=scheme)
            formats.append((scheme if scheme != "int4" else "int4 (post-training)", out))
        if qat_spec is not None:
            qat = root / f"{tag}-qat"
            if not (qat / "summary.json").exists():
                print(f"training {group} (4-bit QAT) ...", flush=True)
                train(qat_spec, qat)
            out = root / f"{tag}-qat-int4"
            quantize_run(qat, out, force=True, scheme="int4")
            formats.append(("int4 (QAT)", out))
        print(f"measuring {group} ...", flush=True)
        figures = measure(dict(formats), args.repeats)
        for name, m in figures.items():
            rows.append((group, name, m, figures["fp32"]))
    print()
    print(f"quickstart corpus; {args.steps} steps (quickstart model), {args.large_steps} "
          f"(d_model 512); one thread; median of {args.repeats}")
    print("| model | weights | file | vs fp32 | held-out bpb | vs fp32 | eval bytes/s | vs fp32 "
          "| sample bytes/s | vs fp32 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for group, name, m, b in rows:
        print(f"| {group} | {name} | {m['size'] / 1e6:.2f} MB | {m['size'] / b['size']:.2f}x | "
              f"{m['bpb']:.4f} | {100 * (m['bpb'] / b['bpb'] - 1):+.2f}% | {m['eval']:,.0f} | "
              f"{m['eval'] / b['eval']:.2f}x | {m['sample']:.1f} | "
              f"{m['sample'] / b['sample']:.2f}x |")
    print(f"\nruns in {root}")


if __name__ == "__main__":
    main()
