"""Generating text from a model: samples, their telemetry and gate verdicts, retries.

* :func:`generate` samples ``n_bytes`` after a prompt, decodes them, and lets a safety gate
  judge the sample's telemetry (computed on its new bits, with the model's own probabilities).
* :func:`hil_safe_inference` samples once and lets the gate judge: strict mode raises
  :class:`SafetyError` naming the metric, its value and its floor; otherwise a
  :class:`SafetyWarning` is issued and the sample is returned with its decision.
* :func:`safe_sample_with_retry` tries again with new seeds, then with the other samplers it
  is given (for example ``diffusion``), up to ``max_retries`` retries, and records every attempt.
* :func:`decompress_sample` reads a sample as a codec stream (``compression.decompress_output``).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from bitlm_core.components import Components
from bitlm_core.errors import BitsError, CodecError, DataError, SafetyError
from bitlm_core.interfaces import GateDecision


@dataclass
class SampleResult:
    text: str
    bits: Any
    decision: Any
    parity_fixed: int = 0
    seconds: float = 0.0
    prompt_bits: int = 0  # how many of ``bits`` are the prompt's


def takes_on_frame(sampler) -> bool:
    """Whether a sampler can report each frame as it makes it (``on_frame``)."""
    import inspect

    try:
        return "on_frame" in inspect.signature(sampler.sample).parameters
    except (TypeError, ValueError):
        return False


def generate(model, encoder, sampler, prompt: str, n_bytes: int, seed: int = 0, gate=None,
             telemetry: dict[str, Any] | None = None, strict: bool = False,
             on_frame: Optional[Callable[[Any], None]] = None) -> SampleResult:
    """Sample ``n_bytes`` after ``prompt``, decode to text, and pass it through ``gate``.

    ``on_frame(bits)`` is called with each new frame as the sampler makes it, for samplers
    that can (:func:`takes_on_frame`); it is ignored for the others."""
    import numpy as np
    import torch

    from bitlm_core.engine.telemetry import sample_metrics

    enc = encoder
    try:
        prompt_bits = enc.encode(prompt.encode("utf-8"))
    except UnicodeEncodeError:  # text from a terminal with bytes that are not UTF-8
        raise DataError("the prompt is not valid UTF-8 text; give it as UTF-8") from None
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    extra = {"on_frame": on_frame} if on_frame is not None and takes_on_frame(sampler) else {}
    bits = sampler.sample(model, prompt_bits, n_bytes, gen, enc, **extra)
    frames = bits.cpu().numpy().reshape(-1, enc.frame_bits)
    frames, fixed = enc.enforce(frames)  # a no-op for samplers that already enforce parity
    fixed += getattr(sampler, "parity_fixed", 0)
    new = frames[len(prompt_bits) // enc.frame_bits:]
    text = enc.decode(torch.from_numpy(np.ascontiguousarray(new.reshape(-1)))).decode(
        "utf-8", errors="replace")
    full = torch.from_numpy(np.ascontiguousarray(frames.reshape(-1)))
    metrics = sample_metrics(model, enc, full, len(prompt_bits), telemetry or {},
                             causal=bool(sampler.causal))
    decision = gate.check(metrics) if gate is not None else GateDecision(True, (), metrics)
    if not decision and strict:
        raise SafetyError("safety gate blocked the sample: " + "; ".join(decision.reasons))
    return SampleResult(prompt + text, bits, decision, fixed, time.perf_counter() - start,
                        len(prompt_bits))


def decompress_sample(result: SampleResult, comps: Components) -> str:
    """``compression.decompress_output``: what the sample generated after its prompt, read as a
    codec stream, or why it is not one."""
    from bitlm_core.engine.compression import model_output_decompress

    try:
        bits = model_output_decompress(result.bits[result.prompt_bits:], comps.compressor,
                                       comps.encoder)
    except (CodecError, BitsError) as exc:
        return f"(not a valid stream: {exc})"
    try:
        return comps.encoder.decode(bits).decode("utf-8", errors="replace")
    except BitsError as exc:
        return f"({bits.numel()} bits that are not {comps.encoder.name} text: {exc})"


class SafetyWarning(UserWarning):
    """A non-strict safety gate flagged an output; the output was still returned."""


@dataclass
class Attempt:
    """One try of :func:`safe_sample_with_retry`."""

    number: int
    sampler: str
    seed: int
    allowed: bool
    reasons: tuple[str, ...]
    metrics: Mapping[str, float]


@dataclass
class SafeSample:
    """The sample returned (the first allowed one, or the last tried) and every attempt."""

    result: SampleResult
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def allowed(self) -> bool:
        return bool(self.result.decision)


def _blocked_message(decision, what: str = "sample") -> str:
    return (f"safety gate blocked the {what}: " + "; ".join(decision.reasons)
            + ". Lower the floor in safety.gate.options if this output is acceptable, or "
              "allow retries (--max-retries).")


def hil_safe_inference(model, encoder, sampler, prompt: str, n_bytes: int, *, gate,
                       telemetry: Mapping[str, Any], seed: int = 0, strict: bool = False):
    """One gated sample. Strict: :class:`SafetyError` when blocked; else warn and return it."""
    result = generate(model, encoder, sampler, prompt, n_bytes, seed=seed, gate=gate,
                      telemetry=telemetry, strict=False)
    if not result.decision:
        if strict:
            raise SafetyError(_blocked_message(result.decision))
        warnings.warn(_blocked_message(result.decision), SafetyWarning, stacklevel=2)
    return result


def safe_sample_with_retry(model, encoder, samplers: Sequence[Any], prompt: str, n_bytes: int,
                           *, gate, telemetry: Mapping[str, Any], seed: int = 0,
                           max_retries: int = 3, strict: bool = False,
                           log: Optional[Callable[[str], None]] = None,
                           on_frame: Optional[Callable[[Any], None]] = None) -> SafeSample:
    """Sample until the gate allows, at most ``1 + max_retries`` attempts.

    Attempt ``i`` uses seed ``seed + i``. The first sampler is tried first; once it has been
    blocked, later attempts go round the other samplers given (``samplers[1:]``) and back, so a
    fallback such as ``diffusion`` gets its turn. Every attempt is logged and kept in the
    result. When every attempt is blocked, strict mode raises :class:`SafetyError` listing them;
    otherwise the last attempt is returned with a :class:`SafetyWarning`. ``on_frame`` is
    passed to :func:`generate` for every attempt.
    """
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    if not samplers:
        raise ValueError("safe_sample_with_retry needs at least one sampler")
    attempts: list[Attempt] = []
    result = None
    for i in range(1 + max_retries):
        sampler = samplers[0] if i == 0 else samplers[1 + (i - 1) % (len(samplers) - 1)] \
            if len(samplers) > 1 else samplers[0]
        if hasattr(gate, "reset"):
            gate.reset()  # each attempt is judged on its own
        result = generate(model, encoder, sampler, prompt, n_bytes, seed=seed + i, gate=gate,
                          telemetry=telemetry, strict=False, on_frame=on_frame)
        d = result.decision
        attempts.append(Attempt(i + 1, getattr(sampler, "name", type(sampler).__name__),
                                seed + i, bool(d), tuple(d.reasons), dict(d.metrics)))
        if log is not None:
            verdict = "allowed" if d else "blocked: " + "; ".join(d.reasons)
            log(f"attempt {i + 1}/{1 + max_retries} ({attempts[-1].sampler}, seed {seed + i}): "
                f"{verdict}")
        if d:
            return SafeSample(result, attempts)
    if len(attempts) == 1:
        if strict:
            raise SafetyError(_blocked_message(result.decision))
        warnings.warn(_blocked_message(result.decision), SafetyWarning, stacklevel=2)
        return SafeSample(result, attempts)
    summary = "; ".join(f"attempt {a.number} ({a.sampler}, seed {a.seed}): "
                        + ", ".join(a.reasons) for a in attempts)
    if strict:
        raise SafetyError(f"safety gate blocked all {len(attempts)} attempts: {summary}. Lower "
                          "the floors in safety.gate.options or allow more retries.")
    warnings.warn(f"safety gate blocked all {len(attempts)} attempts; returning the last. "
                  f"{summary}", SafetyWarning, stacklevel=2)
    return SafeSample(result, attempts)


