"""The model as a compressor against the classic compressors, on held-out text.

For each corpus the held-out text is its last 5%. Each classic compressor is given the first
95% as context: its figure is the compressed size of the whole corpus minus that of the first
95%, in bits per held-out byte. bitlm compresses the held-out text alone with a run's model
(``bitlm compress``, static and ``--adapt``), and the stream is decompressed and compared with
the original, both timed. The model's own size is printed for a reader who wants to count it
(it is not in the bitlm figures, as a compressor's program is not in theirs). "bitlm eval
(score)" is the model's sliding-window score of the same text (`bitlm eval`): what the
stream would take with no header, no segment starts and unquantised probabilities.

    pip install pyppmd brotli zstandard        # the compressors measured beside bitlm
    bitlm run examples/shakespeare-30min.yaml  # 30 minutes on a 2-core CPU
    python benchmarks/compress.py --run runs/shakespeare-30min
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import lzma
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPORA = {"shakespeare": ROOT.parent / "shared/corpora/shakespeare.txt.gz",
           "austen": ROOT.parent / "shared/corpora/austen.txt.gz"}


def classic() -> dict:
    """name -> compress(bytes) -> bytes, each at its strongest common setting."""
    out = {"gzip -9": lambda b: gzip.compress(b, 9, mtime=0),
           "bzip2 -9": lambda b: bz2.compress(b, 9),
           "xz -9e": lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME)}
    try:
        import zstandard

        out["zstd -19"] = lambda b: zstandard.ZstdCompressor(level=19).compress(b)
    except ImportError:
        print("zstandard not installed: zstd left out", file=sys.stderr)
    try:
        import brotli

        out["brotli -11"] = lambda b: brotli.compress(b, quality=11, lgwin=24)
    except ImportError:
        print("brotli not installed: brotli left out", file=sys.stderr)
    try:
        import pyppmd

        out["PPMd order 8"] = lambda b: pyppmd.compress(b, max_order=8, mem_size=256 << 20)
    except ImportError:
        print("pyppmd not installed: PPMd left out", file=sys.stderr)
    return out


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started


def bitlm_rows(run: Path, held: bytes, folder: Path, segment: int, adapt) -> list[tuple]:
    from bitlm_compress.files import compress_file, decompress_file
    from bitlm_core.app.coding import Adapt

    rows = []
    src = folder / "held.txt"
    src.write_bytes(held)
    for label, how in (("bitlm, static", None),
                       ("bitlm, adaptive", Adapt(every=adapt[0], lr=adapt[1]))):
        packed, back = folder / "held.bitlm", folder / "back.txt"
        report, c_s = timed(compress_file, run, src, packed, segment, how, True)
        _, d_s = timed(decompress_file, packed, back, None, True)
        if back.read_bytes() != held:
            raise SystemExit(f"{label}: the round trip changed the text")
        rows.append((label, 8 * report["stream_bytes"] / len(held), len(held) / 1e3 / c_s,
                     len(held) / 1e3 / d_s))
    return rows


def segment_rows(loaded, held: bytes, lengths: list[int]) -> list[tuple]:
    """Static code length and coding speed for each segment length (counted, not written)."""
    from bitlm_core.app.coding import FrameTable, code_length

    table = FrameTable(loaded.comps.encoder, loaded.model.frame_bits)
    rows = []
    for n in lengths:
        bits, s = timed(code_length, loaded.model, table, held, n)
        rows.append((n, bits / len(held), len(held) / 1e3 / s))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=ROOT / "runs/shakespeare-30min")
    p.add_argument("--corpora", default="shakespeare,austen")
    p.add_argument("--segment", type=int, default=4096)
    p.add_argument("--adapt-every", type=int, default=64)
    p.add_argument("--adapt-lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--held-bytes", type=int, default=0,
                   help="compress only the first N held-out bytes with bitlm (0: all)")
    p.add_argument("--segments", default="256,1024,4096,16384",
                   help="segment lengths whose cost is measured on the first --segment-bytes "
                        "of the first corpus's held-out text ('' to skip)")
    p.add_argument("--segment-bytes", type=int, default=65536)
    p.add_argument("--repeated", type=int, default=1_000_000,
                   help="also round-trip a file of this many copies of one byte (0: skip)")
    args = p.parse_args()
    import torch

    from bitlm_core.app.loading import load_run

    torch.set_num_threads(args.threads)
    loaded = load_run(args.run, log=lambda m: None, device="cpu")
    weights = loaded.checkpoint / "model.safetensors"
    print(f"model: {args.run} at step {loaded.step}, {loaded.model.num_parameters():,} "
          f"parameters, {weights.stat().st_size:,} bytes of weights; segments of "
          f"{args.segment} bytes; adaptive: every {args.adapt_every} bytes, lr {args.adapt_lr};"
          f" {args.threads} thread(s)")
    compressors = classic()
    if args.segments:
        data = gzip.open(CORPORA[args.corpora.split(",")[0]]).read()
        held = data[-int(len(data) * 0.05):][:args.segment_bytes]
        print(f"\nsegment length, static, first {len(held):,} held-out bytes "
              f"({args.corpora.split(',')[0]})")
        print(f"{'segment bytes':>13} {'bits/byte':>9} {'coding KB/s':>12}")
        for n, bpb, kbs in segment_rows(loaded, held, [int(x) for x in
                                                       args.segments.split(",")]):
            print(f"{n:>13} {bpb:>9.3f} {kbs:>12.1f}")
    if args.repeated:
        with tempfile.TemporaryDirectory() as tmp:
            from bitlm_compress.files import compress_file, decompress_file

            src, packed, back = Path(tmp) / "e", Path(tmp) / "e.bitlm", Path(tmp) / "back"
            src.write_bytes(b"e" * args.repeated)
            report, c_s = timed(compress_file, args.run, src, packed, args.segment)
            _, d_s = timed(decompress_file, packed, back)
            same = back.read_bytes() == src.read_bytes()
            print(f"\n{args.repeated:,} bytes of one byte (static): {report['stream_bytes']:,} "
                  f"bytes, {'round trip exact' if same else 'ROUND TRIP FAILED'}; "
                  f"{c_s:.1f} s to compress, {d_s:.1f} s to decompress")
    for name in args.corpora.split(","):
        data = gzip.open(CORPORA[name]).read()
        n_held = int(len(data) * 0.05)
        first, held = data[:-n_held], data[-n_held:]
        if args.held_bytes:  # every compressor on the same, shorter held-out text
            held = held[:args.held_bytes]
            data, n_held = first + held, len(held)
        rows = []
        for label, fn in compressors.items():
            (whole, c_s) = timed(fn, data)
            rows.append((label, 8 * (len(whole) - len(fn(first))) / n_held,
                         len(data) / 1e3 / c_s, None))
        print(f"  {name}: classic compressors done", file=sys.stderr)
        from bitlm_core.app.evaluate import evaluate_bytes

        scored = evaluate_bytes(loaded, held, name)["bits_per_byte"]
        rows.append(("bitlm eval (score)", scored, None, None))
        with tempfile.TemporaryDirectory() as tmp:
            rows += bitlm_rows(args.run, held, Path(tmp), args.segment,
                               (args.adapt_every, args.adapt_lr))
        print(f"\n{name}: {len(held):,} held-out bytes (last 5% of {len(data):,})")
        print(f"{'compressor':<18} {'bits/byte':>9} {'vs PPMd':>8} {'compress KB/s':>14} "
              f"{'decompress KB/s':>16}")
        ppmd = next((r[1] for r in rows if r[0].startswith("PPMd")), None)
        for label, bpb, c, d in rows:
            vs = f"{bpb / ppmd:.3f}" if ppmd else "-"
            print(f"{label:<18} {bpb:>9.3f} {vs:>8} "
                  f"{(f'{c:.1f}' if c is not None else '-'):>14} "
                  f"{(f'{d:.1f}' if d is not None else '-'):>16}")


if __name__ == "__main__":
    main()
