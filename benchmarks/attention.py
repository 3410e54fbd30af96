"""Attention speed: the ``sdpa`` backend against the ``reference`` backend, in one run.

Prints a table of forward and forward+backward times (median of several repeats after warm-up
iterations) at several sequence lengths, and the ratio reference / sdpa (higher is better for
sdpa). Both backends come from the bitlm registry, so the ``bitlm-attention-sdpa`` plugin must be
installed. Causal self-attention, fp32, H heads of size D, batch shrinking with length.

"forward" is timed under ``torch.no_grad()`` (what evaluation and generation pay);
"fwd+bwd" is a forward pass with autograd plus the backward pass of ``(out * g).sum()``.

Two model-level tables follow: training steps per second of a flat model (one position per
bit, 1,026-bit windows) with each backend, and generation of 1,024 bits with the key/value
cache against a full forward pass per bit (the ``cache: false`` sampler), same seed, checking
that both give the same bits. ``--no-models`` skips them.

Usage::

    python benchmarks/attention.py            # 256 .. 4096 positions, 1 thread
    python benchmarks/attention.py --quick    # 256 and 512 only, fewer repeats
    python benchmarks/attention.py --threads 2 --chunk-size 256 --overlap 64
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable

# One thread often beats two on small CPU workloads (OpenMP busy-waiting); must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

LENGTHS = (256, 512, 1024, 2048, 4096)
QUICK_LENGTHS = (256, 512)


def batch_for(length: int) -> int:
    """Batch size: 4 at short lengths, down to 1 at 2048 and beyond (keeps runs short)."""
    return max(1, min(4, 2048 // length))


def median_time(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_backends(chunk_size: int, overlap: int) -> dict[str, object]:
    from bitlm_core.registry import get_registry

    registry = get_registry()
    if "sdpa" not in registry.names("attention"):
        sys.exit("the 'sdpa' attention backend is not installed: "
                 "pip install -e plugins/attention_sdpa (then rerun)")
    backends = {"reference": registry.build("attention", "reference"),
                "sdpa": registry.build("attention", "sdpa")}
    if chunk_size:
        backends["chunked"] = registry.build("attention", "sdpa",
                                             {"chunk_size": chunk_size, "overlap": overlap})
    return backends


def measure(backend, q, k, v, grad, warmup: int, repeats: int) -> tuple[float, float]:
    """(forward seconds, forward+backward seconds) for causal self-attention."""
    import torch

    def forward():
        with torch.no_grad():
            return backend(q, k, v, causal=True)[0]

    def forward_backward():
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        out, _ = backend(qg, kg, vg, causal=True)
        (out * grad).sum().backward()

    return (median_time(forward, warmup, repeats),
            median_time(forward_backward, warmup, repeats))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"lengths {QUICK_LENGTHS}, 1 warm-up, 3 repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--lengths", type=int, nargs="+", help=f"default {LENGTHS}")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=32, help="head size D")
    parser.add_argument("--warmup", type=int, default=None, help="default 2 (quick: 1)")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (quick: 3)")
    parser.add_argument("--chunk-size", type=int, default=0,
                        help="also time chunked sdpa with this chunk size (0: off)")
    parser.add_argument("--overlap", type=int, default=0, help="overlap for --chunk-size")
    parser.add_argument("--no-models", action="store_true",
                        help="skip the training and generation tables")
    parser.add_argument("--gen-bits", type=int, default=1024, help="bits generated per sample")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else LENGTHS)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    backends = build_backends(args.chunk_size, args.overlap)

    print(f"# attention: causal self-attention, fp32, H={args.heads}, D={args.dim}, "
          f"threads={torch.get_num_threads()}, warm-up {warmup}, median of {repeats}")
    print(f"# torch {torch.__version__}, python {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs")
    header = ["T", "B", "ref fwd ms", "sdpa fwd ms", "fwd x", "ref f+b ms", "sdpa f+b ms",
              "f+b x", "max abs diff"]
    if "chunked" in backends:
        header += [f"chunk{args.chunk_size}/{args.overlap} f+b ms"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for length in lengths:
        b = batch_for(length)
        q, k, v, grad = (torch.randn(b, args.heads, length, args.dim) for _ in range(4))
        with torch.no_grad():
            diff = (backends["sdpa"](q, k, v, causal=True)[0]
                    - backends["reference"](q, k, v, causal=True)[0]).abs().max().item()
        ref_f, ref_fb = measure(backends["reference"], q, k, v, grad, warmup, repeats)
        sdpa_f, sdpa_fb = measure(backends["sdpa"], q, k, v, grad, warmup, repeats)
        row = [str(length), str(b), f"{ref_f * 1e3:.1f}", f"{sdpa_f * 1e3:.1f}",
               f"{ref_f / sdpa_f:.1f}", f"{ref_fb * 1e3:.1f}", f"{sdpa_fb * 1e3:.1f}",
               f"{ref_fb / sdpa_fb:.1f}", f"{diff:.1e}"]
        if "chunked" in backends:
            _, chunk_fb = measure(backends["chunked"], q, k, v, grad, warmup, repeats)
            row.append(f"{chunk_fb * 1e3:.1f}")
        print("| " + " | ".join(row) + " |", flush=True)
    if not args.no_models:
        model_tables(backends, args.gen_bits, warmup, repeats)


def flat_model(backend, frames: int = 114):
    """A flat model of 0.8M parameters whose context is ``frames`` bytes (1,026 bits)."""
    import torch

    from bitlm_core.model import BitTransformerLM, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(layout="flat", max_frames=frames, d_model=128, n_layers=4, n_heads=4,
                      d_ff=512)
    return BitTransformerLM(cfg, backend)


def model_tables(backends: dict, gen_bits: int, warmup: int, repeats: int) -> None:
    import torch
    import torch.nn.functional as F

    from bitlm_core.builtins.encoders import Parity9Encoder
    from bitlm_core.builtins.samplers import AutoregressiveSampler

    print("\n# training a flat model: 1,026-bit windows, batch 8, AdamW step included")
    print("| backend | ms/step | steps/s | x reference |")
    print("|---|---:|---:|---:|")
    bits = torch.randint(0, 2, (8, 114 * 9), dtype=torch.uint8)
    base = None
    for name in ("reference", "sdpa"):
        model = flat_model(backends[name]).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            logits = model(bits, causal=True)
            F.cross_entropy(logits.reshape(-1, 2), bits.reshape(-1).long()).backward()
            opt.step()

        t = median_time(step, warmup, repeats)
        base = base or t
        print(f"| {name} | {t * 1e3:.0f} | {1 / t:.2f} | {base / t:.1f} |", flush=True)

    print(f"\n# generating {gen_bits} bits from a 9-bit prompt (flat model, sdpa, 1 sample)")
    print("| decoding | seconds | bits/s | x no cache | same bits |")
    print("|---|---:|---:|---:|---|")
    enc = Parity9Encoder()
    model = flat_model(backends["sdpa"], frames=128).eval()  # room for prompt + output
    prompt = enc.encode(b"T")
    frames = -(-gen_bits // 9)
    results = {}
    for cache in (False, True):
        sampler = AutoregressiveSampler(cache=cache)
        start = time.perf_counter()
        out = sampler.sample(model, prompt, frames, torch.Generator().manual_seed(0), enc)
        results[cache] = (time.perf_counter() - start, out)
    slow = results[False][0]
    same = torch.equal(results[False][1], results[True][1])
    for cache in (False, True):
        t = results[cache][0]
        print(f"| {'key/value cache' if cache else 'full forward per bit'} | {t:.2f} | "
              f"{frames * 9 / t:,.0f} | {slow / t:.1f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
