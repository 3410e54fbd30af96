"""``bitlm codec``: compress and decompress files with any installed codec, and measure them.

A file's bits are what the model sees: its bytes through an encoder (``parity9`` by default,
9 bits per byte; ``--encoder raw8`` for 8). ``decompress`` finds the codec from the stream's
first bytes (each codec's ``magic``), decodes within ``--max-bits``, and turns the bits back
into bytes with the same encoder, checking every parity bit. Outputs are written atomically
and an existing file is kept unless ``--force`` is given.

Like the rest of the CLI, importing this module imports neither torch nor numpy. The group is
registered through the ``bitlm_commands`` hook (by bitlm's built-ins), as a plugin's would be;
what the commands do without the CLI is :mod:`bitlm_core.app.codec`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from bitlm_core.app.codec import codec_for_stream, installed_codecs, measure_codec
from bitlm_core.cli.errors import out
from bitlm_core.errors import BitlmError, CodecError

codec_app = typer.Typer(
    help="Compress, decompress and measure bit streams with the installed codecs.\n\n"
         "A file's bits are its bytes through an encoder (parity9: 9 bits per byte).",
    no_args_is_help=True,
)

DEFAULT_MAX_BITS = 1 << 28  # 268 M bits (30 MB of parity9 text): at most about 1 GB of memory
EncoderOpt = typer.Option("parity9", "--encoder", help="How bytes become bits: parity9 or raw8.")
ForceOpt = typer.Option(False, "--force", "-f", help="Overwrite OUT if it exists.")
MaxBitsOpt = typer.Option(DEFAULT_MAX_BITS, "--max-bits", min=0,
                          help="Refuse inputs and streams of more bits (a guard against "
                               "decompression bombs and files too large for memory: about 3.5 "
                               "bytes of memory per bit).")


def _read(path: Path, limit: int, what: str) -> bytes:
    """At most ``limit`` bytes of ``path`` (a file, or a device such as a pipe), or an error
    saying it is larger: nothing unbounded is ever read."""
    if path.is_dir():
        raise BitlmError(f"{path} is a directory; give a file")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise BitlmError(f"{path}: no such file") from None
    except OSError as exc:
        raise BitlmError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise BitlmError(f"{path} is larger than {limit:,} bytes, the most {what} takes with "
                         "--max-bits as given; raise --max-bits if you mean it")
    return data


def _check_out(path: Path, force: bool) -> None:
    """Before any work: OUT may be written."""
    if path.is_dir():
        raise BitlmError(f"{path} is a directory; give a file to write")
    if path.exists() and not force:
        raise BitlmError(f"{path} exists; pass --force to overwrite it")


def _write_atomic(path: Path, data: bytes, force: bool) -> None:
    from bitlm_core.store.atomic import atomic_write_bytes

    _check_out(path, force)
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise BitlmError(f"cannot write {path}: {exc.strerror or exc}") from None


def _encoder(name: str):
    from bitlm_core.registry import get_registry

    return get_registry().build("encoder", name, path="--encoder")


def _rate(bits_per_s: float) -> str:
    for unit, scale in (("Gb/s", 1e9), ("Mb/s", 1e6), ("kb/s", 1e3)):
        if bits_per_s >= scale:
            return f"{bits_per_s / scale:.2f} {unit}"
    return f"{bits_per_s:.0f} b/s"


@codec_app.command()
def compress(
    src: Path = typer.Argument(..., metavar="IN", help="File to compress (any bytes)."),
    dst: Path = typer.Argument(..., metavar="OUT", help="Stream to write."),
    codec: str = typer.Option(..., "--codec", "-c", help="Codec name (`bitlm plugins list --all` lists "
                              "them)."),
    encoder: str = EncoderOpt,
    force: bool = ForceOpt,
    max_bits: int = MaxBitsOpt,
) -> None:
    """Compress a file's bits into a self-describing stream."""
    import torch

    from bitlm_core.registry import get_registry

    _check_out(dst, force)
    enc = _encoder(encoder)
    bits = torch.from_numpy(enc.encode_np(_read(src, max_bits // enc.frame_bits, "compress")))
    c = get_registry().build("compressor", codec, path="--codec")
    stream = c.compress(bits)
    _write_atomic(dst, stream, force)
    ratio = bits.numel() / (8 * len(stream)) if stream else float("inf")
    note = "  (the stream is larger than the bits: this codec expands them)" if ratio < 1 \
        else ""
    out.print(f"{src} -> {dst}: {bits.numel():,} bits ({encoder}) in {len(stream):,} bytes "
              f"with {c.name}, ratio {ratio:.3f}{note}", soft_wrap=True)


@codec_app.command()
def decompress(
    src: Path = typer.Argument(..., metavar="IN", help="Stream written by `bitlm codec compress`."),
    dst: Path = typer.Argument(..., metavar="OUT", help="File to write."),
    encoder: str = EncoderOpt,
    max_bits: int = MaxBitsOpt,
    force: bool = ForceOpt,
) -> None:
    """Decompress a stream; the codec is read from the stream's header."""
    _check_out(dst, force)
    # no stream is larger than its bits at one byte each (identity), plus its header
    data = _read(src, max_bits + (1 << 20), "decompress")
    codec = codec_for_stream(data, installed_codecs())
    bits = codec.decompress(data, max_bits=max_bits)
    enc = _encoder(encoder)
    if bits.dim() != 1 or bits.numel() % enc.frame_bits:
        raise CodecError(f"{src} holds {bits.numel()} bits, not a whole number of "
                         f"{enc.frame_bits}-bit frames; was it written with --encoder "
                         f"{'raw8' if enc.frame_bits == 9 else 'parity9'}?")
    payload = enc.decode(bits)
    _write_atomic(dst, payload, force)
    out.print(f"{src} -> {dst}: {codec.name} stream, {bits.numel():,} bits, "
              f"{len(payload):,} bytes", soft_wrap=True)


@codec_app.command()
def stats(
    src: Path = typer.Argument(..., metavar="FILE", help="File whose bits to measure."),
    encoder: str = EncoderOpt,
    codecs: Optional[List[str]] = typer.Option(None, "--codec", "-c",
                                               help="Only these codecs (repeatable)."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timings are the best of this many."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
    max_bits: int = MaxBitsOpt,
) -> None:
    """Ratio and encode/decode speed of every installed codec on a file's bits."""
    import torch

    enc = _encoder(encoder)
    bits = torch.from_numpy(enc.encode_np(_read(src, max_bits // enc.frame_bits, "stats")))
    available = installed_codecs()
    for name in codecs or []:
        if name not in available:
            raise BitlmError(f"unknown codec '{name}'; installed: {', '.join(available)}")
    rows = [measure_codec(c, bits, repeats) for name, c in available.items()
            if not codecs or name in codecs]
    if as_json:
        out.print_json(json.dumps({"file": str(src), "encoder": encoder, "codecs": rows}))
        return
    table = Table(title=f"{src}: {bits.numel():,} bits ({encoder})")
    for col in ("codec", "output bits", "ratio", "encode", "decode"):
        table.add_column(col, justify="left" if col == "codec" else "right")
    for r in rows:
        ratio = f"{r['ratio']:.3f}" + (" (expands)" if r["expands"] else "")
        table.add_row(r["codec"], f"{r['output_bits']:,}", ratio,
                      _rate(r["encode_bits_per_s"]), _rate(r["decode_bits_per_s"]))
    out.print(table)
    out.print("ratio: input bits over output bits (below 1: the stream is larger than the "
              "bits). Speeds in input bits per second.")


def commands() -> typer.Typer:
    """The ``codec`` group, for the ``bitlm_commands`` record of bitlm's built-ins."""
    return codec_app
