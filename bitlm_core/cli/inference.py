"""``bitlm eval`` and ``bitlm sample``: use a trained run."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import List, Optional

import typer

from bitlm_core.cli.errors import err, out, print_text
from bitlm_core.errors import BitlmError, DataError


MAX_SAMPLE_BYTES = 1_000_000  # a sample is text to read; longer ones are a mistake


class FrameOutput:
    """Where a sample's frames go as they are made: the text itself on stdout (``stream``),
    or a progress bar on stderr while it must be judged before it is shown."""

    def __init__(self, encoder, prompt: str, n_bytes: int, stream: bool):
        import codecs

        self.encoder, self.prompt, self.n_bytes, self.stream = encoder, prompt, n_bytes, stream
        self.streamed = False
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.bar = self.task = None

    def __enter__(self) -> "FrameOutput":
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        if self.stream:
            out.file.write(self.prompt)
            self.streamed = True
        elif self.n_bytes >= 100:  # a progress bar for what takes more than a moment
            self.bar = Progress(TextColumn("sampling"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("bytes"), console=err, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("sampling", total=self.n_bytes)
        return self

    def frame(self, bits) -> None:
        if self.stream:
            byte = self.encoder.decode(bits.cpu(), repair=True)
            out.file.write(self.decoder.decode(byte))
            out.file.flush()
        elif self.bar is not None:
            self.bar.advance(self.task)

    def __exit__(self, *exc) -> None:
        if self.stream:
            out.file.write(self.decoder.decode(b"", final=True) + "\n")
            out.file.flush()
        if self.bar is not None:
            self.bar.stop()


def eval_(
    run_dir: Path = typer.Argument(..., help="Run folder written by `bitlm run`."),
    text: Path = typer.Option(..., "--text", help="Text file to score (UTF-8), any length."),
    stride: Optional[int] = typer.Option(None, "--stride", min=1,
                                         help="Bytes the scoring window moves each time "
                                              "(default: half the model's context). Smaller "
                                              "gives every byte more context and costs more."),
    as_json: bool = typer.Option(False, "--json", help='Print {"bits_per_byte": ..., '
                                 '"bytes": ...}.'),
    coded: bool = typer.Option(False, "--coded", help="Also count what `bitlm compress` "
                               "would write for the text (its header and the coder's words "
                               "included), coding it as compress does: slower."),
    segment: int = typer.Option(4096, "--segment", min=1, max=1 << 30,
                                help="--coded: bytes per segment, as `bitlm compress "
                                     "--segment`."),
    adapt: bool = typer.Option(False, "--adapt", help="--coded with online adaptation, as "
                               "`bitlm compress --adapt` (implies --coded)."),
    adapt_every: int = typer.Option(64, "--adapt-every", min=1, max=1 << 20,
                                    help="--adapt: bytes of each segment between updates."),
    adapt_lr: float = typer.Option(5e-4, "--adapt-lr", min=1e-8, max=0.5,
                                   help="--adapt: learning rate of the updates."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads."),
    device: str = typer.Option("auto", "--device", help="Where the model runs: auto (cuda, "
                               "else mps, else cpu), cpu, cuda, cuda:N or mps; any run loads "
                               "on any device."),
) -> None:
    """Bits per byte of a run's model on any text file, scored with a sliding window; with
    --coded, also the size of a compressed file of it."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from bitlm_core.app.evaluate import evaluate_bytes, read_text_file
    from bitlm_core.app.loading import load_run
    from bitlm_core.engine.runtime import set_threads

    set_threads(threads)
    loaded = load_run(run_dir, device=device)
    data = read_text_file(text)
    if coded or adapt:
        from bitlm_core.app.evaluate import MAX_CODED_BYTES
        from bitlm_core.errors import DataError

        if len(data) > MAX_CODED_BYTES:
            raise DataError(f"--coded counts texts of up to {MAX_CODED_BYTES:,} bytes (what "
                            f"`bitlm compress` takes); {text} has {len(data):,}")
    with Progress(TextColumn("scoring"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total} windows"), TimeRemainingColumn(), console=err,
                  transient=True, disable=as_json) as bar:
        task = bar.add_task("scoring", total=None)
        result = evaluate_bytes(loaded, data, str(text), stride=stride,
                                progress=lambda done, total: bar.update(
                                    task, completed=done, total=total))
    if coded or adapt:
        from bitlm_core.app.coding import Adapt
        from bitlm_core.app.evaluate import coded_size

        with Progress(TextColumn("coding"), BarColumn(), TextColumn("{task.completed}/"
                      "{task.total} bytes per segment"), TimeRemainingColumn(), console=err,
                      transient=True, disable=as_json) as bar:
            task = bar.add_task("coding", total=None)
            result["coded"] = coded_size(
                loaded, data, segment, Adapt(every=adapt_every, lr=adapt_lr) if adapt else None,
                progress=lambda done, total: bar.update(task, completed=done, total=total))
    if as_json:
        out.print_json(json.dumps(result))
    else:
        label = "bound on bits per byte" if result["is_bound"] else "bits per byte"
        out.print(f"{label}: {result['bits_per_byte']:.4f} over {result['bytes']:,} bytes "
                  f"({text}, model at step {loaded.step}; window {result['window']} bytes, "
                  f"stride {result['stride']})", soft_wrap=True)
        if "act_blocks" in result:
            out.print(f"halting depth: {result['act_blocks']:.2f} of "
                      f"{len(loaded.model.blocks)} blocks per position on average")
        c = result.get("coded")
        if c is not None and c["stream_bits_per_byte"] is not None:
            out.print(f"compressed ({'adaptive, ' if c['adapt'] else ''}segments of "
                      f"{c['segment']:,} bytes): {c['code_bits_per_byte']:.4f} bits per byte "
                      f"coded, a stream of {c['stream_bytes']:,} bytes "
                      f"({c['stream_bits_per_byte']:.4f} bits per byte with its "
                      f"{c['header_bytes']}-byte header)", soft_wrap=True)


def sample(
    run_dir: Path = typer.Argument(..., help="Run folder written by `bitlm run`."),
    prompt: str = typer.Option("", "--prompt", help="Text the sample continues."),
    n_bytes: int = typer.Option(200, "--bytes", min=0, max=MAX_SAMPLE_BYTES,
                                help="Bytes to generate (printed as they are made, unless a "
                                     "safety gate must judge them first)."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="Random seed."),
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
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads."),
    device: str = typer.Option("auto", "--device", help="Where the model runs: auto (cuda, "
                               "else mps, else cpu), cpu, cuda, cuda:N or mps; any run loads "
                               "on any device."),
) -> None:
    """Generate text from a run's model; every byte is parity-valid."""
    from bitlm_core.app.generate import SafetyWarning, safe_sample_with_retry
    from bitlm_core.app.loading import load_run
    from bitlm_core.components import build, check_interface
    from bitlm_core.engine.runtime import set_threads
    from bitlm_core.registry import get_registry

    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes from the terminal that are not UTF-8
        raise DataError("--prompt is not valid UTF-8 text; give it as UTF-8") from None
    set_threads(threads)
    loaded = load_run(run_dir, device=device)
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
    judged = gate is not None or loaded.spec.safety.gate.name != "none" or max_retries > 0
    with warnings.catch_warnings(), FrameOutput(comps.encoder, prompt, n_bytes,
                                                stream=not judged) as show:
        warnings.simplefilter("ignore", SafetyWarning)  # a blocked sample is reported below
        tried = safe_sample_with_retry(
            loaded.model, comps.encoder, samplers, prompt, n_bytes, gate=the_gate,
            telemetry=telemetry, seed=seed, max_retries=max_retries, strict=strict,
            log=(lambda m: err.print(m, markup=False)) if max_retries else None,
            on_frame=show.frame)
    if not show.streamed:
        print_text(tried.result.text)
    if not tried.allowed:
        err.print("[yellow]warning:[/] safety gate flagged this sample: "
                  + "; ".join(tried.result.decision.reasons), markup=True)
