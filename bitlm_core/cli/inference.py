"""``bitlm eval`` and ``bitlm sample``: use a trained run."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import List, Optional

import typer

from bitlm_core.cli.errors import err, out
from bitlm_core.errors import BitlmError


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
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from bitlm_core.app.evaluate import evaluate_bytes, read_text_file
    from bitlm_core.app.loading import load_run
    from bitlm_core.engine.runtime import set_threads

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
    from bitlm_core.app.generate import SafetyWarning, safe_sample_with_retry
    from bitlm_core.app.loading import load_run
    from bitlm_core.components import build, check_interface
    from bitlm_core.engine.runtime import set_threads
    from bitlm_core.registry import get_registry

    set_threads(threads)
    loaded = load_run(run_dir)
    overrides = {k: v for k, v in (("temperature", temperature), ("top_p", top_p),
                                   ("top_k", top_k)) if v is not None}
    samplers = [build(loaded.comps.resolved["sample.sampler"], **overrides)]
    registry = get_registry()
    comps = loaded.comps
    trained_causal = comps.causal
    for name in fallback or []:
        extra = check_interface(registry.resolve("sampler", name, "--fallback"),
                                registry.build("sampler", name, path="--fallback"))
        if bool(extra.causal) != trained_causal:
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
