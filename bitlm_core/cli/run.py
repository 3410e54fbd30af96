"""``bitlm run`` and ``bitlm validate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from bitlm_core.cli.errors import err, out, print_text

OverrideOpt = typer.Option(None, "--override", "-o", metavar="KEY=VALUE",
                           help="Override a spec value by dotted path, e.g. -o train.steps=200. "
                                "Repeatable; values are parsed as YAML.")


def run(
    spec: Optional[Path] = typer.Argument(None, help="Run spec (YAML). Omit for the quickstart."),
    override: Optional[List[str]] = OverrideOpt,
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: "
                                           "output.dir of the spec, else runs/<name>)."),
    restart: bool = typer.Option(False, "--restart", help="Discard an existing run in the "
                                 "folder instead of resuming it."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    nproc: Optional[int] = typer.Option(
        None, "--nproc", min=1, max=4096, metavar="N",
        help="Train in N processes on this machine (torchrun's launcher, one process per GPU "
             "or CPU share); the spec needs distributed.strategy ddp, fsdp or pipeline. For "
             "several machines, run torchrun yourself (README)."),
) -> None:
    """Train a model from a spec, evaluate held-out bits per byte, and sample text.

    Running again into the same folder resumes from the newest checkpoint.
    """
    from bitlm_core.spec import load_spec

    run_spec = load_spec(spec, override or [])
    if nproc is not None:
        import sys

        from bitlm_core.cli.launch import launch, worker_args
        from bitlm_core.engine.distributed import launched
        from bitlm_core.errors import SpecError

        if launched() is not None:
            raise SpecError("--nproc starts a job, and this process is already one of a "
                            "job's (torchrun set WORLD_SIZE); drop --nproc")
        if nproc > 1 and run_spec.distributed.strategy == "none":
            raise SpecError(f"--nproc {nproc} trains in {nproc} processes, and the spec's "
                            "distributed.strategy is none; set it to ddp, fsdp or pipeline, "
                            "e.g. -o distributed.strategy=ddp")
        from bitlm_core.app.run import check_job_memory
        from bitlm_core.components import Components
        from bitlm_core.engine.distributed import check_stages

        check_stages(run_spec, nproc)

        check_job_memory(Components.build(run_spec), nproc)  # what every worker would refuse
        raise typer.Exit(launch(nproc, worker_args(sys.argv[1:])))
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    from bitlm_core.app.run import execute
    from bitlm_core.engine.distributed import launched

    where = launched()
    if where is not None and where[0] != 0:  # rank 0 alone shows progress and prints
        quiet = True
    progress = None if quiet else Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=err, transient=False)
    log = (lambda msg: None) if quiet else err.print
    if progress is not None:
        with progress:
            summary = execute(run_spec, out_dir, restart=restart, progress=progress,
                              log=progress.console.print)
    else:
        summary = execute(run_spec, out_dir, restart=restart, log=log)
    if summary is None:  # another process of a job than rank 0
        return
    label = "bound on held-out" if summary["is_bound"] else "held-out"
    out.print(f"{label} bits per byte: {summary['held_out_bits_per_byte']:.4f} "
              f"({summary['held_out_bytes']:,} bytes, {summary['steps']} steps)")
    for i, text in enumerate(summary["samples"]):
        out.print(f"--- sample {i} ---")
        print_text(text)
    if summary.get("sample_words_in_training_text") is not None:
        out.print(f"sampled words found in the training text: "
                  f"{summary['sample_words_in_training_text']:.0%}")
    out.print(f"run folder: {summary['run_dir']}")


def validate(
    spec: Path = typer.Argument(..., help="Run spec (YAML) to check."),
    override: Optional[List[str]] = OverrideOpt,
) -> None:
    """Check a spec: keys, types, component names and options, and that every component
    builds and fits the others (as `bitlm run` would). Builds no model and no tensors."""
    from bitlm_core.app.control import check_spec
    from bitlm_core.spec import load_spec

    run_spec = load_spec(spec, override or [])
    comps = check_spec(run_spec)
    table = Table(title=f"{spec} is valid", show_lines=False)
    for col in ("slot", "component", "from", "options"):
        table.add_column(col)
    for path, res in comps.resolved.items():
        table.add_row(path, res.record.name, res.record.plugin or "",
                      json.dumps(res.options) if res.options else "")
    out.print(table)
    out.print(f"run folder: {run_spec.run_dir()}")
