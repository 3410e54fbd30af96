"""``bitlm report RUN... [--out DIR]``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def report(
    runs: List[Path] = typer.Argument(..., metavar="RUN...", help="Run folders written by "
                                      "`bitlm run`; several are overlaid in one report."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for report.html and plots/ "
                                       "(default: the run folder, when one run is given)."),
) -> None:
    """Write report.html (self-contained, opens offline) and PNG plots: bits per byte against
    steps and time, learning rate, telemetry with the gate's floors, compression, growth events
    and the samples with their verdicts."""
    from bitlm_core.errors import DataError

    from bitlm_report.html import HtmlReport

    if out is None:
        if len(runs) > 1:
            raise DataError(f"{len(runs)} runs are overlaid in one report: say where it goes "
                            "with --out DIR")
        out = runs[0]
    for path in HtmlReport().write(runs, out):
        typer.echo(str(path))


def report_command():
    """The command's factory (``bitlm_commands``)."""
    return report
