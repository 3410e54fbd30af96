"""Codec encode time in a fresh process, where the allocator returns freed megabytes to the OS.

``benchmarks/codecs.py`` measures in a process that has already made large allocations, as a
training run has. This script does nothing but hold one random bit array and encode it, best
of ``--repeats`` calls, so every call that returns a fresh megabyte may pay page faults. It
prints ``pack`` and ``np.packbits(a).tobytes()`` against ``np.packbits`` in the same process.

    python benchmarks/codecs_fresh.py               # 8 M bits
"""

from __future__ import annotations

import argparse
import time


def best(fn, repeats: int) -> float:
    fn()
    t = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - start)
    return t


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=8_000_000)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from bitlm_compression_pack.codec import compress

    arr = np.random.default_rng(0).integers(0, 2, args.bits, dtype=np.uint8)
    tensor = torch.from_numpy(arr)
    ref = best(lambda: np.packbits(arr), args.repeats)
    rows = [("np.packbits", ref), ("np.packbits(a).tobytes()",
                                   best(lambda: np.packbits(arr).tobytes(), args.repeats)),
            ("pack (CRC-32C)", best(lambda: compress(tensor), args.repeats))]
    print(f"| {args.bits:,} bits, fresh process | ms | x packbits |")
    print("|---|---:|---:|")
    for name, t in rows:
        print(f"| {name} | {t * 1e3:.3f} | {ref / t:.2f} |")


if __name__ == "__main__":
    main()
