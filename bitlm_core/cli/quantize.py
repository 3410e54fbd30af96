"""``bitlm quantize``, registered through the command hook like a plugin's command."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from bitlm_core.cli.errors import out


def quantize(
    run_dir: Path = typer.Argument(..., help="Run folder written by `bitlm run`."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the quantized run (new or "
                                 "empty)."),
    scheme: str = typer.Option("int8-rowwise", "--scheme", help="Weight format: int8-rowwise "
                               "(core: int8 storage, runs as float), or a plugin's, e.g. "
                               "int8-dynamic (int8 inference) and int4 (4-bit groups) from "
                               "bitlm-quantization; `bitlm plugins show quantizer` lists them."),
    force: bool = typer.Option(False, "--force", help="Replace a quantized run already at --out "
                               "(never a training run or other files)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Store a run's weights in fewer bits: int8 (one scale per row, about 4x smaller) by
    default, or another --scheme.

    The quantized run folder works with `bitlm eval`, `bitlm sample` and `bitlm compress`; it
    has no optimizer state, so it cannot be trained further.
    """
    from bitlm_core.app.quantize import quantize_run

    report = quantize_run(run_dir, out_dir, force=force, scheme=scheme)
    if as_json:
        out.print_json(json.dumps(report))
    else:
        out.print(f"quantized {report['quantized_tensors']} of {report['tensors']} tensors "
                  f"({report['scheme']}) from {report['source']}: "
                  f"{report['bytes_before']:,} -> {report['bytes_after']:,} bytes "
                  f"({report['bytes_before'] / report['bytes_after']:.1f}x smaller); "
                  f"run folder {out_dir}", soft_wrap=True)


def commands():
    """The ``quantize`` command, for the ``bitlm_commands`` record of bitlm's built-ins."""
    return quantize
