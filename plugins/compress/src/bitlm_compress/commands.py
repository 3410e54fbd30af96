"""``bitlm compress`` and ``bitlm decompress`` (typer and rich only at import: torch and
constriction load when a command runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from bitlm_core.cli.errors import err, out


def _bar(label: str, quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeRemainingColumn

    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("bytes "
                    "per segment"), TimeRemainingColumn(), console=err, transient=True,
                    disable=quiet)


def compress(
    run_dir: Path = typer.Argument(..., help="Run folder whose model codes the file."),
    src: Path = typer.Argument(..., help="File to compress (any bytes)."),
    dst: Path = typer.Argument(..., help="Stream to write."),
    segment: int = typer.Option(4096, "--segment", min=1, max=1 << 30,
                                help="Bytes per segment. Segments are coded side by side, each "
                                     "from an empty context: shorter is faster, longer gives "
                                     "each byte more context."),
    adapt: bool = typer.Option(False, "--adapt", help="Keep training the model on what it has "
                               "coded (online adaptation): smaller, slower, and decoding "
                               "needs the same torch build, threads and CPU."),
    adapt_every: int = typer.Option(64, "--adapt-every", min=1, max=1 << 20,
                                    help="--adapt: bytes of each segment between updates."),
    adapt_lr: float = typer.Option(5e-4, "--adapt-lr", min=1e-8, max=0.5,
                                   help="--adapt: learning rate of the updates."),
    threads: int = typer.Option(1, "--threads", min=1, max=4096, help="torch threads (decoding "
                                "uses the same number: it is recorded in the stream)."),
    force: bool = typer.Option(False, "--force", help="Replace DST if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Compress a file with a run's model: an arithmetic (range) coder on its bit
    probabilities. `bitlm decompress` restores it exactly."""
    import torch

    from bitlm_compress.files import compress_file
    from bitlm_core.app.coding import Adapt

    torch.set_num_threads(threads)
    with _bar("compressing", as_json) as bar:
        task = bar.add_task("compressing", total=None)
        report = compress_file(run_dir, src, dst, segment,
                               Adapt(every=adapt_every, lr=adapt_lr) if adapt else None, force,
                               lambda done, total: bar.update(task, completed=done,
                                                              total=total))
    if as_json:
        out.print_json(json.dumps(report))
        return
    bpb = report["bits_per_byte"]
    out.print(f"{src} ({report['input_bytes']:,} bytes) -> {dst} ({report['stream_bytes']:,} "
              f"bytes" + (f", {bpb:.4f} bits per byte" if bpb is not None else "")
              + f") in {report['seconds']:.1f} s, model of {report['run']} at step "
              f"{report['step']}" + (", adaptive" if report["adapt"] else ""), soft_wrap=True)


def decompress(
    src: Path = typer.Argument(..., help="Stream written by `bitlm compress`."),
    dst: Path = typer.Argument(..., help="File to restore the original into."),
    run_dir: Optional[Path] = typer.Option(None, "--run", help="Run folder that compressed it "
                                           "(default: the one the stream names)."),
    max_bytes: int = typer.Option(1 << 30, "--max-bytes", min=0,
                                  help="Refuse a stream that says it holds more bytes."),
    force: bool = typer.Option(False, "--force", help="Replace DST if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Restore a file from a stream of `bitlm compress`, checked against its SHA-256 (nothing
    is written unless it matches)."""
    from bitlm_compress.files import decompress_file

    with _bar("decompressing", as_json) as bar:
        task = bar.add_task("decompressing", total=None)
        report = decompress_file(src, dst, run_dir, force, max_bytes,
                                 lambda done, total: bar.update(task, completed=done,
                                                                total=total),
                                 log=lambda m: err.print(m, soft_wrap=True, markup=False))
    if as_json:
        out.print_json(json.dumps(report))
    else:
        out.print(f"{src} -> {dst} ({report['output_bytes']:,} bytes, checksum verified)",
                  soft_wrap=True)


def compress_command():
    return compress


def decompress_command():
    return decompress
