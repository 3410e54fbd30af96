"""The ``bitlm`` command line (Typer + rich).

Start-up stays fast: this module imports neither torch nor numpy; commands that need them
import them when they run. Errors from bad input print one clear message and exit with status
2; ``--debug`` (or ``BITLM_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

# One thread that waits passively beats two busy-waiting ones for small models on a 2-core
# machine (BENCHMARKS.md); must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bitlm_core.codec_cli import codec_app  # noqa: E402
from bitlm_core.errors import BitlmError  # noqa: E402

app = typer.Typer(
    name="bitlm",
    help="Train, evaluate and sample bit-native transformer language models.\n\n"
         "`bitlm run` with no spec trains the embedded quickstart.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
plugins_app = typer.Typer(help="Inspect installed plugins and the components they provide.",
                          no_args_is_help=True)
app.add_typer(plugins_app, name="plugins")
app.add_typer(codec_app, name="codec")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)
_default_showwarning = warnings.showwarning
_state = {"debug": os.environ.get("BITLM_DEBUG", "") not in ("", "0")}


@contextmanager
def user_errors():
    """Turn bitlm errors into one message and an exit status; keep tracebacks for --debug."""
    try:
        yield
    except BitlmError as exc:
        if _state["debug"]:
            raise
        err.print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        if _state["debug"]:
            raise
        err.print("interrupted. Run the same command again to resume from the last checkpoint.")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:  # a bug, not bad input: say so, and how to see more
        if _state["debug"]:
            raise
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc}\n"
                  "Run again with --debug for the traceback.", markup=True, soft_wrap=True)
        raise typer.Exit(1) from None


def _version(value: bool) -> None:
    if value:
        from bitlm_core import __version__

        out.print(f"bitlm {__version__}")
        raise typer.Exit()


def _show_plugin_warning(message, category, filename, lineno, file=None, line=None):
    from bitlm_core.plugins import PluginWarning

    if issubclass(category, PluginWarning):
        err.print(f"[yellow]warning:[/] {message}", markup=True, soft_wrap=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    _state["debug"] = debug or os.environ.get("BITLM_DEBUG", "") not in ("", "0")
    warnings.showwarning = _show_plugin_warning


OverrideOpt = typer.Option(None, "--override", "-o", metavar="KEY=VALUE",
                           help="Override a spec value by dotted path, e.g. -o train.steps=200. "
                                "Repeatable; values are parsed as YAML.")


# -- run / validate ---------------------------------------------------------------------------
@app.command()
def run(
    spec: Optional[Path] = typer.Argument(None, help="Run spec (YAML). Omit for the quickstart."),
    override: Optional[List[str]] = OverrideOpt,
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: "
                                           "output.dir of the spec, else runs/<name>)."),
    restart: bool = typer.Option(False, "--restart", help="Discard an existing run in the "
                                 "folder instead of resuming it."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train a model from a spec, evaluate held-out bits per byte, and sample text.

    Running again into the same folder resumes from the newest checkpoint.
    """
    with user_errors():
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        from bitlm_core.run import execute
        from bitlm_core.spec import load_spec

        run_spec = load_spec(spec, override or [])
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
        label = "bound on held-out" if summary["is_bound"] else "held-out"
        out.print(f"{label} bits per byte: {summary['held_out_bits_per_byte']:.4f} "
                  f"({summary['held_out_bytes']:,} bytes, {summary['steps']} steps)")
        for i, text in enumerate(summary["samples"]):
            out.print(f"--- sample {i} ---")
            out.print(text, markup=False)
        if summary.get("sample_words_in_training_text") is not None:
            out.print(f"sampled words found in the training text: "
                      f"{summary['sample_words_in_training_text']:.0%}")
        out.print(f"run folder: {summary['run_dir']}")


@app.command()
def validate(
    spec: Path = typer.Argument(..., help="Run spec (YAML) to check."),
    override: Optional[List[str]] = OverrideOpt,
) -> None:
    """Check a spec: keys, types, component names and their options. Builds no tensors."""
    with user_errors():
        from bitlm_core.components import resolve_spec
        from bitlm_core.spec import load_spec

        run_spec = load_spec(spec, override or [])
        resolved = resolve_spec(run_spec)
        table = Table(title=f"{spec} is valid", show_lines=False)
        for col in ("slot", "component", "from", "options"):
            table.add_column(col)
        for path, res in resolved.items():
            table.add_row(path, res.record.name, res.record.plugin or "",
                          json.dumps(res.options) if res.options else "")
        out.print(table)
        out.print(f"run folder: {run_spec.run_dir()}")


# -- plugins ----------------------------------------------------------------------------------
@plugins_app.command("list")
def plugins_list(
    all_: bool = typer.Option(False, "--all", help="Also list every component and its "
                              "description."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List plugins: name, package, version, status (active, disabled, failed) and what each
    provides."""
    import warnings

    with user_errors():
        from bitlm_core.plugins import PluginWarning
        from bitlm_core.registry import get_registry

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PluginWarning)  # shown in the table instead
            registry = get_registry(raise_conflicts=False)
        infos = list(registry.manager.infos.values())
        if as_json:
            data = {"plugins": [i.as_dict() for i in infos], "conflicts": registry.conflicts}
            if all_:
                data["components"] = [
                    {"kind": kind, "name": r.name, "plugin": r.plugin,
                     "description": r.description}
                    for kind, records in registry.records.items() for r in records.values()]
            out.print_json(json.dumps(data))
            return
        table = Table(title="bitlm plugins")
        for col in ("plugin", "package", "version", "status", "provides"):
            table.add_column(col, overflow="fold")
        for i in infos:
            status = {"active": "[green]active[/]", "disabled": "[yellow]disabled[/]"}.get(
                i.status, f"[red]failed[/]: {i.error}")
            provides = "; ".join(f"{k}: {', '.join(v)}" for k, v in i.provides.items())
            table.add_row(i.name, i.distribution or "", i.version or "", status, provides)
        out.print(table)
        for conflict in registry.conflicts:
            err.print(f"[bold red]conflict:[/] {conflict}", markup=True, soft_wrap=True)
        if all_:
            _components_table(registry, list(registry.records))


def _components_table(registry, kinds: list[str], load_lazy: bool = False) -> None:
    """One row per component. Lazy factories are imported (torch and all) only when
    ``load_lazy``: ``plugins list --all`` must stay fast, ``plugins show`` may take its time."""
    import inspect

    table = Table(title="components")
    for col in ("kind", "name", "plugin", "options", "description"):
        table.add_column(col, overflow="fold")
    for kind in kinds:
        for r in sorted(registry.records[kind].values(), key=lambda r: r.name):
            if r.lazy and not load_lazy:
                params = ["(see `bitlm plugins show " + kind + "`)"]
            else:
                try:
                    params = [f"{n}={p.default!r}" if p.default is not p.empty else n
                              for n, p in inspect.signature(r.load()).parameters.items()
                              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
                except Exception as exc:  # a lazy factory that fails to import
                    params = [f"(cannot load: {type(exc).__name__}: {exc})"]
            table.add_row(kind, r.name, r.plugin or "", ", ".join(params), r.description)
    out.print(table)


@plugins_app.command("show")
def plugins_show(kind: str = typer.Argument(..., help="Component kind, e.g. attention, "
                                            "compressor, encoder, sampler.")) -> None:
    """Show the components of one kind, with their options and where they come from."""
    with user_errors():
        from bitlm_core.errors import BitlmError as _Err
        from bitlm_core.records import KINDS
        from bitlm_core.registry import close_matches, get_registry

        aliases = {k: k for k in KINDS}
        for k, spec in KINDS.items():
            aliases[spec.title.replace(" ", "-")] = k
            aliases[spec.title.split()[-1]] = k
            aliases[k + "s"] = k
        aliases.update({"compression": "compressor", "gate": "safety", "gates": "safety",
                        "metrics": "telemetry", "backend": "attention",
                        "backends": "attention"})
        resolved = aliases.get(kind.lower())
        if resolved is None:
            hint = close_matches(kind.lower(), list(aliases))
            raise _Err(f"unknown component kind '{kind}'"
                       + (f"; did you mean {', '.join(hint)}?" if hint else "")
                       + f"\n  kinds: {', '.join(KINDS)}")
        _components_table(get_registry(), [resolved], load_lazy=True)


# -- eval / sample ----------------------------------------------------------------------------
@app.command("eval")
def eval_(
    run_dir: Path = typer.Argument(..., help="Run folder written by `bitlm run`."),
    text: Path = typer.Option(..., "--text", help="Text file to score (UTF-8), any length."),
    stride: Optional[int] = typer.Option(None, "--stride", min=1,
                                         help="Bytes the scoring window moves each time "
                                              "(default: half the model's context). Smaller "
                                              "gives every byte more context and costs more."),
    as_json: bool = typer.Option(False, "--json", help='Print {"bits_per_byte": ..., '
                                 '"bytes": ...}.'),
    threads: int = typer.Option(1, "--threads", help="torch threads."),
) -> None:
    """Bits per byte of a run's model on any text file, scored with a sliding window."""
    with user_errors():
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        from bitlm_core.run import evaluate_bytes, load_run, read_text_file
        from bitlm_core.train import set_threads

        set_threads(threads)
        loaded = load_run(run_dir)
        data = read_text_file(text)
        with Progress(TextColumn("scoring"), BarColumn(), TextColumn("{task.completed}/"
                      "{task.total} windows"), TimeRemainingColumn(), console=err,
                      transient=True, disable=as_json) as bar:
            task = bar.add_task("scoring", total=None)
            result = evaluate_bytes(loaded, data, str(text), stride=stride,
                                    progress=lambda done, total: bar.update(
                                        task, completed=done, total=total))
        if as_json:
            out.print_json(json.dumps(result))
        else:
            label = "bound on bits per byte" if result["is_bound"] else "bits per byte"
            out.print(f"{label}: {result['bits_per_byte']:.4f} over {result['bytes']:,} bytes "
                      f"({text}, model at step {loaded.step}; window {result['window']} bytes, "
                      f"stride {result['stride']})", soft_wrap=True)


@app.command()
def quantize(
    run_dir: Path = typer.Argument(..., help="Run folder written by `bitlm run`."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the quantized run (new or "
                                 "empty)."),
    force: bool = typer.Option(False, "--force", help="Replace a quantized run already at --out "
                               "(never a training run or other files)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Store a run's weight matrices as int8 (one scale per row), about 4x smaller.

    The quantized run folder works with `bitlm eval` and `bitlm sample`; it has no optimizer
    state, so it cannot be trained further.
    """
    with user_errors():
        from bitlm_core.quantize import quantize_run

        report = quantize_run(run_dir, out_dir, force=force)
        if as_json:
            out.print_json(json.dumps(report))
        else:
            out.print(f"quantized {report['quantized_tensors']} of {report['tensors']} tensors "
                      f"({report['scheme']}) from {report['source']}: "
                      f"{report['bytes_before']:,} -> {report['bytes_after']:,} bytes "
                      f"({report['bytes_before'] / report['bytes_after']:.1f}x smaller); "
                      f"run folder {out_dir}", soft_wrap=True)


@app.command()
def sample(
    run_dir: Path = typer.Argument(..., help="Run folder written by `bitlm run`."),
    prompt: str = typer.Option("", "--prompt", help="Text the sample continues."),
    n_bytes: int = typer.Option(200, "--bytes", min=0, help="Bytes to generate."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0,
                                                help="Sampling temperature (0 is greedy)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling threshold."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=0, help="Top-k (1 is greedy)."),
    gate: Optional[str] = typer.Option(None, "--gate", help="Safety gate to judge the sample "
                                       "(e.g. kcs); default: the run's safety.gate."),
    strict: Optional[bool] = typer.Option(None, "--strict/--no-strict",
                                          help="A blocked sample is an error (exit 3) instead "
                                               "of a warning; default: the run's "
                                               "safety.strict."),
    max_retries: int = typer.Option(0, "--max-retries", min=0,
                                    help="Sample again (new seed, then the --fallback "
                                         "samplers) up to this many times while blocked."),
    fallback: Optional[List[str]] = typer.Option(None, "--fallback",
                                                 help="Sampler to retry with after a blocked "
                                                      "attempt (repeatable), e.g. diffusion."),
    threads: int = typer.Option(1, "--threads", help="torch threads."),
) -> None:
    """Generate text from a run's model; every byte is parity-valid."""
    with user_errors():
        from bitlm_core.components import build
        from bitlm_core.registry import get_registry
        from bitlm_core.run import load_run
        from bitlm_core.safety import SafetyWarning, safe_sample_with_retry
        from bitlm_core.train import set_threads

        set_threads(threads)
        loaded = load_run(run_dir)
        overrides = {k: v for k, v in (("temperature", temperature), ("top_p", top_p),
                                       ("top_k", top_k)) if v is not None}
        samplers = [build(loaded.comps.resolved["sample.sampler"], **overrides)]
        registry = get_registry()
        comps = loaded.comps
        trained_causal = bool(getattr(comps.objective, "causal", True))
        for name in fallback or []:
            extra = registry.build("sampler", name, path="--fallback")
            if bool(getattr(extra, "causal", True)) != trained_causal:
                kind = "causal" if trained_causal else "non-causal"
                raise BitlmError(f"--fallback {name}: this sampler needs a "
                                 f"{'non-causal' if trained_causal else 'causal'} model, and "
                                 f"this run's model was trained with the {kind} objective "
                                 f"'{loaded.spec.objective.name}'; pick a {kind} sampler")
            samplers.append(extra)
        telemetry = dict(comps.telemetry)
        the_gate = comps.gate
        if gate is not None:
            the_gate = registry.build("safety", gate, path="--gate")
            for name in registry.names("telemetry"):  # the metrics a gate may need
                telemetry.setdefault(name, registry.build("telemetry", name))
        strict = loaded.spec.safety.strict if strict is None else strict
        with warnings.catch_warnings():  # a blocked sample is reported once, below
            warnings.simplefilter("ignore", SafetyWarning)
            tried = safe_sample_with_retry(
                loaded.model, comps.encoder, samplers, prompt, n_bytes, gate=the_gate,
                telemetry=telemetry, seed=seed, max_retries=max_retries, strict=strict,
                log=(lambda m: err.print(m, markup=False)) if max_retries else None)
        out.print(tried.result.text, markup=False)
        if not tried.allowed:
            err.print("[yellow]warning:[/] safety gate flagged this sample: "
                      + "; ".join(tried.result.decision.reasons), markup=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
