"""What ``bitlm run``, ``bitlm eval`` and ``bitlm sample`` do, without the CLI around them.

A run folder holds everything a run produced::

    spec.yaml          the fully resolved spec (every default filled in)
    data/              the corpus as packed, memory-mapped bits
    checkpoints/       see bitlm_core.checkpoint
    metrics.jsonl      one JSON record per logged step or evaluation
    samples.txt        generated text
    summary.json       final figures

Running the same spec into an existing folder resumes from its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from bitlm_core.components import Resolved, build, resolve_spec
from bitlm_core.errors import (BitsError, CheckpointError, CodecError, DataError, SafetyError,
                               SpecError)
from bitlm_core.spec import RunSpec, validate_spec
from bitlm_core.textstats import vocabulary, word_share

SPEC_FILE = "spec.yaml"


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


@dataclass
class Components:
    """The built components of a run (everything but the model)."""

    resolved: dict[str, Resolved]
    encoder: Any
    attention: Any
    objective: Any
    compressor: Any
    gate: Any
    sampler: Any
    telemetry: dict[str, Any] = field(default_factory=dict)
    scaling: Any = None

    @classmethod
    def build(cls, spec: RunSpec) -> "Components":
        r = resolve_spec(spec)
        telemetry = {}
        for path, res in r.items():
            if res.kind == "telemetry":
                metric = build(res)
                telemetry[getattr(metric, "name", res.record.name)] = metric
        objective = build(r["objective"])
        sampler = build(r["sample.sampler"])
        if getattr(sampler, "causal", True) != getattr(objective, "causal", True):
            raise SpecError(
                f"sample.sampler '{spec.sample.sampler.name}' and objective "
                f"'{spec.objective.name}' disagree: one is causal and the other is not; pick a "
                "sampler made for the objective"
            )
        return cls(resolved=r, encoder=build(r["data.encoder"]), attention=build(r["attention"]),
                   objective=objective, compressor=build(r["compression"]),
                   gate=build(r["safety.gate"]), sampler=sampler, telemetry=telemetry,
                   scaling=build(r["scaling.strategy"]) if "scaling.strategy" in r else None)


def build_model(spec: RunSpec, comps: Components):
    import torch

    from bitlm_core.model import BitTransformerLM
    from bitlm_core.train import model_config

    torch.manual_seed(spec.train.seed)
    return BitTransformerLM(model_config(spec, comps.encoder, comps.objective), comps.attention)


def fit_to_checkpoint(model, saved: dict[str, Any]) -> None:
    """Grow a model built from the spec to the size a checkpoint was saved at (a run whose
    ``scaling.strategy`` grew its context, depth or width). Nothing saved is evaluated."""
    from bitlm_core.growth import fit_to_config

    fit_to_config(model, saved.get("model_config"))


# -- run folders ----------------------------------------------------------------------------
def prepare_run_dir(spec: RunSpec, run_dir: Path, restart: bool) -> bool:
    """Create or check the run folder; True when it holds a checkpoint to resume from."""
    from bitlm_core.checkpoint import latest_checkpoint

    saved = run_dir / SPEC_FILE
    if restart and saved.is_file():
        shutil.rmtree(run_dir)  # only ever a run folder: never a folder bitlm did not write
    if saved.is_file():
        previous = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        current = spec.to_dict()
        diff = [k for k in _diff_keys(previous, current) if not k.startswith("output.")]
        if diff:
            raise CheckpointError(
                f"run folder {run_dir} holds a run of a different spec (differs at: "
                f"{', '.join(diff[:6])}). Choose another folder with --out, or pass --restart "
                "to discard that run"
            )
        return latest_checkpoint(run_dir) is not None
    if run_dir.exists() and any(run_dir.iterdir()):
        raise CheckpointError(f"{run_dir} exists and is not a bitlm run folder (no {SPEC_FILE});"
                              " choose another folder with --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SPEC_FILE).write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False),
                                     encoding="utf-8")
    return False


def load_dataset(spec: RunSpec, comps: Components, run_dir: Path):
    from bitlm_core.dataset import prepare_dataset

    corpus = build(comps.resolved["data.corpus"])
    data = corpus.read()
    dataset = prepare_dataset(data, comps.encoder, spec.data.seq_len, spec.data.val_fraction,
                              run_dir / "data", source=f"corpus '{spec.data.corpus.name}'",
                              require_utf8=spec.data.require_utf8)
    return dataset, data[: len(data) - dataset.val.n_frames]


def execute(spec: RunSpec, run_dir: Path | None = None, restart: bool = False,
            log: Callable[[str], None] = print, progress=None) -> dict[str, Any]:
    """Train (or resume), evaluate, sample; return the summary written to summary.json."""
    from bitlm_core.checkpoint import latest_checkpoint, load_optimizer, load_weights, read_state
    from bitlm_core.train import TrainState, Trainer, evaluate, set_threads

    run_dir = Path(run_dir or spec.run_dir())
    comps = Components.build(spec)
    resume = prepare_run_dir(spec, run_dir, restart)
    set_threads(spec.train.threads)
    dataset, train_text = load_dataset(spec, comps, run_dir)
    model = build_model(spec, comps)
    attention = getattr(comps.attention, "name", spec.attention.name)
    log(f"run folder {run_dir}  |  {spec.model.layout} model, {model.num_parameters():,} "
        f"parameters, attention {attention}  |  {dataset.train.n_frames:,} training bytes, "
        f"{dataset.val.n_frames:,} held-out")

    def meta(state: TrainState) -> dict[str, Any]:
        return {"model_config": model.cfg.to_dict(), "spec": spec.to_dict(),
                "elapsed": state.elapsed, "metrics": state.metrics}

    ckpt = latest_checkpoint(run_dir) if resume else None
    saved = read_state(ckpt) if ckpt is not None else None
    if saved is not None:
        fit_to_checkpoint(model, saved)  # before the optimizer is built over its parameters
        dataset = dataclasses.replace(dataset, seq_frames=model.cfg.max_frames)
    trainer = Trainer(spec, model, comps.objective, dataset, run_dir, meta,
                      compressor=comps.compressor if spec.compression.prob > 0 else None,
                      encoder=comps.encoder, telemetry=comps.telemetry,
                      scaling=comps.scaling, progress=progress, log=log)
    state = TrainState()
    if saved is not None:
        load_weights(ckpt, model)
        load_optimizer(ckpt, trainer.optimizer, saved)
        state = TrainState(step=saved["step"], elapsed=saved.get("elapsed", 0.0),
                           metrics=saved.get("metrics", {}))
        log(f"resuming from {ckpt.name} (step {state.step} of {spec.train.steps})")
    if state.step < spec.train.steps:
        state = trainer.fit(state)
    final = evaluate(model, comps.objective, trainer.dataset, spec.train.batch_size)
    trainer.write_metrics({"split": "val", "step": state.step, "final": True, **final})
    label = "bound on " if final["bound"] else ""
    log(f"held-out {label}bits per byte: {final['bits_per_byte']:.4f} over {final['bytes']:,} "
        f"bytes")
    samples = []
    for i in range(spec.sample.count):
        result = generate(model, comps.encoder, comps.sampler, spec.sample.prompt,
                          spec.sample.bytes, seed=spec.sample.seed + i, gate=comps.gate,
                          telemetry=comps.telemetry, strict=spec.safety.strict)
        samples.append(result)
    vocab = vocabulary(train_text)
    shares = [word_share(s.text.encode("utf-8"), vocab) for s in samples]
    shares = [x for x in shares if x is not None]
    words_known = sum(shares) / len(shares) if shares else None
    if words_known is not None:
        log(f"sampled words found in the training text: {words_known:.0%}")
    decompressed = ([decompress_sample(s, comps) for s in samples]
                    if spec.compression.decompress_output else [None] * len(samples))
    with open(run_dir / "samples.txt", "w", encoding="utf-8") as f:
        for i, (s, d) in enumerate(zip(samples, decompressed)):
            f.write(f"--- sample {i} (seed {spec.sample.seed + i}"
                    f"{', blocked: ' + '; '.join(s.decision.reasons) if not s.decision else ''})"
                    f" ---\n{s.text}\n")
            if d is not None:
                f.write(f"--- sample {i} read as a {spec.compression.name} stream ---\n{d}\n")
    summary = {
        "run_dir": str(run_dir), "steps": state.step, "train_seconds": round(state.elapsed, 2),
        "parameters": model.num_parameters(), "layout": spec.model.layout,
        "held_out_bits_per_byte": final["bits_per_byte"], "held_out_bytes": final["bytes"],
        "is_bound": final["bound"], "samples": [s.text for s in samples],
        "sample_words_in_training_text": words_known,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


# -- using a finished run -------------------------------------------------------------------
@dataclass
class LoadedRun:
    run_dir: Path
    spec: RunSpec
    comps: Components
    model: Any
    step: int
    checkpoint: Path  # the step folder the weights came from
    state: dict[str, Any]  # its state.json


def load_run(run_dir: Path | str) -> LoadedRun:
    """Rebuild a run's model from its resolved spec and newest checkpoint (never unpickles)."""
    from bitlm_core.checkpoint import latest_checkpoint, load_weights, read_state

    run_dir = Path(run_dir)
    spec_path = run_dir / SPEC_FILE
    if not spec_path.is_file():
        raise CheckpointError(f"{run_dir} is not a bitlm run folder (no {SPEC_FILE}); give the "
                              "folder that `bitlm run` wrote (default runs/<name>)")
    spec = validate_spec(yaml.safe_load(spec_path.read_text(encoding="utf-8")) or {},
                         str(spec_path))
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir} has no checkpoint yet; run `bitlm run` to train it")
    state = read_state(ckpt)
    comps = Components.build(spec)
    model = build_model(spec, comps)
    fit_to_checkpoint(model, state)
    load_weights(ckpt, model)
    model.eval()
    return LoadedRun(run_dir, spec, comps, model, state["step"], ckpt, state)


def evaluate_bytes(run: LoadedRun, data: bytes, source: str, batch_size: int = 16,
                   stride: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Bits per byte of ``run``'s model on any text, however long.

    A causal model scores the text with a sliding window of its context (``data.seq_len``
    bytes, or what ``scaling`` grew it to) moved by ``stride`` bytes (default half the
    context): every byte is scored once, with at least ``context - stride`` bytes before it,
    so the figure does not depend on where windows happen to start. A bound (diffusion)
    objective scores non-overlapping windows.
    """
    import torch

    from bitlm_core.dataset import check_text
    from bitlm_core.longcontext import score_sliding
    from bitlm_core.train import score_batches

    check_text(data, source, run.spec.data.require_utf8)
    enc, objective = run.comps.encoder, run.comps.objective
    Fb, W = enc.frame_bits, run.model.cfg.max_frames  # data.seq_len, or more if it grew
    bits = torch.from_numpy(enc.encode_np(data))
    is_bound = bool(getattr(objective, "is_bound", False))
    if getattr(objective, "causal", True) and not is_bound:
        stride = max(1, W // 2) if stride is None else stride
        if not 1 <= stride <= W:
            raise DataError(f"--stride must be between 1 and the model's context ({W} bytes), "
                            f"got {stride}")
        bpb, n_bytes = score_sliding(run.model, bits, Fb, W, stride, batch_size, progress)
        return {"bits_per_byte": bpb, "bytes": n_bytes, "is_bound": False,
                "window": W, "stride": stride}
    if stride is not None:
        raise DataError(f"--stride applies to causal models; this run's objective "
                        f"'{run.spec.objective.name}' is scored in non-overlapping windows of "
                        f"{W} bytes (its figure is a bound); leave --stride out")
    full = (len(data) // W) * W
    rows = bits[: full * Fb].view(-1, W * Fb)
    batches = list(rows.split(batch_size))
    if full < len(data):
        batches.append(bits[full * Fb:].view(1, -1))  # the last, shorter window
    bpb, n_bytes = score_batches(run.model, objective, batches, Fb)
    return {"bits_per_byte": bpb, "bytes": n_bytes, "is_bound": is_bound,
            "window": W, "stride": W}


@dataclass
class SampleResult:
    text: str
    bits: Any
    decision: Any
    parity_fixed: int = 0
    seconds: float = 0.0
    prompt_bits: int = 0  # how many of ``bits`` are the prompt's


def generate(model, encoder, sampler, prompt: str, n_bytes: int, seed: int = 0, gate=None,
             telemetry: dict[str, Any] | None = None, strict: bool = False) -> SampleResult:
    """Sample ``n_bytes`` after ``prompt``, decode to text, and pass it through ``gate``."""
    import numpy as np
    import torch

    from bitlm_core.builtins.safety import NoGate
    from bitlm_core.safety import sample_metrics

    enc = encoder
    prompt_bits = enc.encode(prompt.encode("utf-8"))
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    bits = sampler.sample(model, prompt_bits, n_bytes, gen, enc)
    frames = bits.cpu().numpy().reshape(-1, enc.frame_bits)
    frames, fixed = enc.enforce(frames)  # a no-op for samplers that already enforce parity
    fixed += getattr(sampler, "parity_fixed", 0)
    new = frames[len(prompt_bits) // enc.frame_bits:]
    text = enc.decode(torch.from_numpy(np.ascontiguousarray(new.reshape(-1)))).decode(
        "utf-8", errors="replace")
    full = torch.from_numpy(np.ascontiguousarray(frames.reshape(-1)))
    metrics = sample_metrics(model, enc, full, len(prompt_bits), telemetry or {},
                             causal=bool(getattr(sampler, "causal", True)))
    decision = (gate or NoGate()).check(metrics)
    if not decision and strict:
        raise SafetyError("safety gate blocked the sample: " + "; ".join(decision.reasons))
    return SampleResult(prompt + text, bits, decision, fixed, time.perf_counter() - start,
                        len(prompt_bits))


def decompress_sample(result: SampleResult, comps: Components) -> str:
    """``compression.decompress_output``: what the sample generated after its prompt, read as a
    codec stream, or why it is not one."""
    from bitlm_core.compression import model_output_decompress

    try:
        bits = model_output_decompress(result.bits[result.prompt_bits:], comps.compressor,
                                       comps.encoder)
    except (CodecError, BitsError) as exc:
        return f"(not a valid stream: {exc})"
    try:
        return comps.encoder.decode(bits).decode("utf-8", errors="replace")
    except BitsError as exc:
        return f"({bits.numel()} bits that are not {comps.encoder.name} text: {exc})"


def read_text_file(path: Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    return path.read_bytes()
