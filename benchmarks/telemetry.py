"""LZ76 complexity throughput: the fast exact count against plain baselines, in one run.

Run from the repository root (the telemetry_kcs plugin must be installed)::

    python benchmarks/telemetry.py            # n = 1e3, 1e4, 1e5; baselines within budget
    python benchmarks/telemetry.py --budget 5 --repeats 1

Table 1: bits per second of

* ``fast``: :func:`bitlm_telemetry_kcs.lz76.lz76_phrase_count` (galloping ``bytes.find``),
* ``reference``: :func:`bitlm_telemetry_kcs.lz76.lz76_phrase_count_reference`, the plain
  transcription of the definition (Python strings, ``in`` per candidate phrase),
* ``per-bit scan``: the classic Kaspar-Schuster scan as a pure Python loop over bits (the
  "pure Python" figure of FACTS.md: ~54 s at 1e5),

on fair-coin bits and on parity9-framed English text (the core's quickstart corpus), at
n = 1e3, 1e4, 1e5. Every method must return the same c(n) (checked). A baseline runs at a size
only when its time, extrapolated quadratically from the previous size, fits in ``--budget``
seconds; otherwise the cell says ``skipped (est. N s)``. Speed-up = baseline time / fast time.

Table 2: the cost of one call of each metric on a training-sized batch, to judge the overhead
of telemetry (compare with the step time of your model; times are per call).

Table 3: the overhead of telemetry in training: the quickstart model's training step time
(median of ``--steps`` steps) against one telemetry evaluation with all three metrics (the
step's training batch and a held-out batch through the model, then the metrics), and the share of training time that is at
the default interval (``telemetry.every`` = 100 steps) and at every 10 steps.
"""

from __future__ import annotations

import argparse
import gzip
import platform
import time
from importlib import resources
from typing import Callable

import numpy as np


def kaspar_schuster_scan(bits: np.ndarray) -> int:
    """LZ76 c(n) by the Kaspar-Schuster (1987) scan, one Python step per comparison."""
    s = bits.tolist()
    n = len(s)
    if n < 2:
        return n
    count, start, i, k, k_max = 1, 1, 0, 1, 1  # phrase 1 is s[0]; `start` begins the next one
    while True:
        if s[i + k - 1] == s[start + k - 1]:
            k += 1
            if start + k > n:  # the current phrase runs into the end: count it, stop
                count += 1
                break
        else:
            k_max = max(k, k_max)
            i += 1
            if i == start:  # no earlier start extends further: the phrase ends here
                count += 1
                start += k_max
                if start + 1 > n:
                    break
                i, k, k_max = 0, 1, 1
            else:
                k = 1
    return count


def english_bits(n_bits: int) -> np.ndarray:
    from bitlm_core.bits import bytes_to_frames

    text = gzip.decompress((resources.files("bitlm_core") / "data" / "quickstart.txt.gz")
                           .read_bytes())
    return bytes_to_frames(text[100_000:100_000 + n_bits // 9 + 1]).reshape(-1)[:n_bits].copy()


def best_time(fn: Callable[[np.ndarray], int], bits: np.ndarray, repeats: int) -> tuple[float, int]:
    best, result = float("inf"), -1
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn(bits)
        best = min(best, time.perf_counter() - t0)
    return best, result


def lz_table(sizes: list[int], budget: float, repeats: int) -> None:
    from bitlm_telemetry_kcs.lz76 import (lz76_phrase_count, lz76_phrase_count_reference,
                                          normalised_complexity)

    baselines = {"reference": lz76_phrase_count_reference, "per-bit scan": kaspar_schuster_scan}
    for name, fn in baselines.items():  # the baselines must agree with each other and with fast
        for case in ("1001111011000010", "0" * 50, "01" * 33):
            a = np.frombuffer(case.encode(), np.uint8) - 48
            assert fn(a) == lz76_phrase_count(a), (name, case)

    streams = {"random": lambda n: np.random.default_rng(0).integers(0, 2, n, dtype=np.uint8),
               "text": english_bits}
    print("| stream | n | c(n) | C | fast bits/s | reference bits/s | speed-up "
          "| per-bit scan bits/s | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for stream, make in streams.items():
        previous: dict[str, tuple[int, float]] = {}
        for n in sizes:
            bits = make(n)
            t_fast, count = best_time(lz76_phrase_count, bits, repeats)
            cells = [stream, f"{n:.0e}".replace("e+0", "e"), str(count),
                     f"{normalised_complexity(count, n):.3f}", f"{n / t_fast:,.0f}"]
            for name, fn in baselines.items():
                if name in previous:
                    n0, t0 = previous[name]
                    estimate = t0 * (n / n0) ** 2
                else:
                    estimate = 0.0
                if estimate > budget:
                    cells += [f"skipped (est. {estimate:.0f} s)", "-"]
                    continue
                t_base, base_count = best_time(fn, bits, 1 if estimate > 1 else repeats)
                assert base_count == count, (name, stream, n, base_count, count)
                previous[name] = (n, t_base)
                cells += [f"{n / t_base:,.0f}", f"{t_base / t_fast:.1f}x"]
            print("| " + " | ".join(cells) + " |")


def metric_table(repeats: int) -> None:
    import torch

    torch.set_num_threads(1)  # FACTS.md: one thread beats two at these sizes; stable timings
    from bitlm_telemetry_kcs.metrics import LZComplexity, Negentropy, Symbiosis

    print("| batch (B x L) | negentropy (bits) | negentropy (probs) | lz_complexity | symbiosis |")
    print("|---|---:|---:|---:|---:|")
    metrics = [(Negentropy(), False), (Negentropy(source="probs"), True), (LZComplexity(), False),
               (Symbiosis(), True)]
    for rows, length in ((8, 1026), (8, 4104), (32, 1026)):
        bits = torch.from_numpy(np.stack([english_bits(length + 9 * r)[9 * r:]
                                          for r in range(rows)]))
        probs = torch.rand(rows, length)
        cells = [f"{rows} x {length}"]
        for metric, needs_probs in metrics:
            args = (bits, probs) if needs_probs else (bits,)
            metric(*args)  # warm-up
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                metric(*args)
                best = min(best, time.perf_counter() - t0)
            cells.append(f"{best * 1e3:.2f} ms")
        print("| " + " | ".join(cells) + " |")


def overhead_table(steps: int, repeats: int) -> None:
    import statistics
    import tempfile
    from pathlib import Path

    import torch

    from bitlm_core.app.build import build_model
    from bitlm_core.app.run import load_dataset
    from bitlm_core.components import Components
    from bitlm_core.spec import load_spec
    from bitlm_core.engine.callbacks import Telemetry
    from bitlm_core.engine.trainer import Trainer, TrainState

    torch.set_num_threads(1)
    spec = load_spec(None, ["train.threads=1", "telemetry.metrics=[{name: negentropy, options: "
                            "{source: probs}}, {name: lz_complexity}, {name: symbiosis}]"])
    comps = Components.build(spec)
    with tempfile.TemporaryDirectory() as tmp:
        dataset, _ = load_dataset(spec, comps, Path(tmp))
        model = build_model(spec, comps)
        trainer = Trainer(spec, model, comps.objective, dataset, Path(tmp), lambda s: {},
                          telemetry=comps.telemetry, log=lambda m: None)
        state, step_times, telemetry = TrainState(), [], Telemetry()
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.step(state)
            step_times.append(time.perf_counter() - t0)
            state.step += 1
        tel_times = []
        for _ in range(repeats + 1):  # what training runs: the step's batch and a held-out one
            t0 = time.perf_counter()
            values = telemetry.record(trainer, state.step)
            tel_times.append(time.perf_counter() - t0)
    step = statistics.median(step_times[2:])
    tel = min(tel_times[1:])
    print(f"quickstart model, batch {spec.train.batch_size} x {spec.data.seq_len} bytes, one "
          f"thread; metrics: {', '.join(sorted(values))}\n")
    print("| training step | one telemetry evaluation | overhead every 100 steps (default) | "
          "every 10 steps |")
    print("|---:|---:|---:|---:|")
    print(f"| {step * 1e3:.0f} ms | {tel * 1e3:.1f} ms | {tel / (100 * step):.2%} | "
          f"{tel / (10 * step):.2%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--budget", type=float, default=30.0,
                        help="seconds a baseline may take at one size (estimated), else skipped")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--steps", type=int, default=12, help="training steps timed (table 3)")
    args = parser.parse_args()
    print(f"# LZ76 throughput ({platform.python_version()}, {platform.machine()}; "
          f"best of {args.repeats}, one thread)\n")
    lz_table(args.sizes, args.budget, args.repeats)
    print("\n# One call of each metric (parity9 English text rows, random probs)\n")
    metric_table(args.repeats)
    print("\n# Telemetry overhead in training\n")
    overhead_table(args.steps, args.repeats)


if __name__ == "__main__":
    main()
