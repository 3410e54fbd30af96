"""Codec throughput: encode and decode speed of every installed codec, against numpy.

For each codec and each kind of data (English text bits, uniformly random bits, sparse bits
with 1% ones, long runs) this prints the compression ratio (input bits over output bits; below
1 means the codec expands the stream) and the encode and decode throughput in *input* bits per
second, next to ``np.packbits`` / ``np.unpackbits`` on the same data in the same run (the
reference columns, and the ratios against them). Times are the best of ``--repeats`` runs.

Usage::

    python benchmarks/codecs.py                       # 8 M bits per data set
    python benchmarks/codecs.py --bits 1000000 --codecs rle,pack --repeats 9
    python benchmarks/codecs.py --corpus /path/to/text.txt.gz

Codecs whose factory takes a ``checksum`` option are also measured with ``checksum=False``.
"""

from __future__ import annotations

import argparse
import gzip
import inspect
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm up (page faults, lazy imports)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def read_text(path: Path | None, n_bytes: int) -> bytes:
    if path is None:
        import bitlm_core

        path = Path(bitlm_core.__file__).parent / "data" / "quickstart.txt.gz"
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < n_bytes:
        raw = raw * (n_bytes // len(raw) + 1)
    return raw[:n_bytes]


def datasets(n_bits: int, corpus: Path | None) -> dict[str, np.ndarray]:
    from bitlm_core.bits import bytes_to_frames

    rng = np.random.default_rng(0)
    text = bytes_to_frames(read_text(corpus, n_bits // 9)).reshape(-1)
    runs = rng.geometric(1 / 10_000, size=n_bits // 1000 + 1)  # mean run 10,000 bits
    long_runs = np.repeat((np.arange(runs.size) % 2).astype(np.uint8), runs)[:n_bits]
    return {
        "text (parity9)": text,
        "random": rng.integers(0, 2, n_bits, dtype=np.uint8),
        "sparse (1% ones)": (rng.random(n_bits) < 0.01).astype(np.uint8),
        "long runs (mean 10k)": long_runs,
    }


def codecs(names: list[str] | None) -> dict[str, Any]:
    from bitlm_core.registry import get_registry

    registry = get_registry()
    chosen = names or registry.names("compressor")
    out: dict[str, Any] = {}
    for name in chosen:
        record = registry.resolve("compressor", name)
        out[name] = record.load()()
        if "checksum" in inspect.signature(record.load()).parameters:
            out[f"{name} (checksum=False)"] = record.load()(checksum=False)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=8_000_000, help="bits per data set")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (best is kept)")
    parser.add_argument("--codecs", default="", help="comma-separated names (default: all)")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="text file (.gz ok) for the text bits; default: core quickstart")
    args = parser.parse_args(argv)

    import torch

    data = datasets(args.bits, args.corpus)
    chosen = codecs([c for c in args.codecs.split(",") if c] or None)
    print(f"# codecs: {args.bits:,} bits per data set, best of {args.repeats}; python "
          f"{platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
          f"{platform.machine()}")
    print(f"# command: python {' '.join(sys.argv)}")
    print()
    print("| data | codec | ratio (in/out bits) | encode Gbit/s | x packbits | "
          "decode Gbit/s | x unpackbits |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for data_name, arr in data.items():
        n = arr.size
        packed = np.packbits(arr)
        ref_enc = n / best_time(lambda: np.packbits(arr), args.repeats) / 1e9
        ref_dec = n / best_time(lambda: np.unpackbits(packed, count=n), args.repeats) / 1e9
        print(f"| {data_name} | numpy packbits/unpackbits | {n / (8 * packed.size):.3f} | "
              f"{ref_enc:.2f} | 1.00 | {ref_dec:.2f} | 1.00 |")
        tensor = torch.from_numpy(arr)
        for codec_name, codec in chosen.items():
            stream = codec.compress(tensor)
            if not torch.equal(codec.decompress(stream, max_bits=n).to(torch.uint8), tensor):
                raise SystemExit(f"{codec_name} failed to round-trip {data_name}")
            enc = n / best_time(lambda: codec.compress(tensor), args.repeats) / 1e9
            dec = n / best_time(lambda: codec.decompress(stream, max_bits=n), args.repeats) / 1e9
            print(f"| {data_name} | {codec_name} | {n / (8 * len(stream)):.3f} | {enc:.2f} | "
                  f"{enc / ref_enc:.2f} | {dec:.2f} | {dec / ref_dec:.2f} |")


if __name__ == "__main__":
    main()
