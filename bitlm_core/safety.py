"""Gated generation: telemetry on each sample, a safety gate's verdict, retries, drift alerts.

* :func:`sample_metrics` computes the run's telemetry metrics on a sample's new bits, with the
  model's causal probabilities for the metrics that need them (symbiosis).
* :func:`hil_safe_inference` samples once and lets the gate judge: strict mode raises
  :class:`SafetyError` naming the metric, its value and its floor; otherwise a
  :class:`SafetyWarning` is issued and the sample is returned with its decision.
* :func:`safe_sample_with_retry` tries again with new seeds, then with the other samplers it
  is given (for example ``diffusion``), up to ``max_retries`` retries, and records every attempt.
* :func:`detect_metric_drift` compares the mean of the last ``window`` values of a metric with
  the mean of the ``window`` before them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from bitlm_core.errors import SafetyError


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

    result: Any  # bitlm_core.run.SampleResult
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def allowed(self) -> bool:
        return bool(self.result.decision)


def next_bit_probs(model, bits):
    """P(bit = 1) at every position of ``bits`` (B, L) from one causal forward pass, without
    gradients, in evaluation mode (the model's mode is restored)."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.softmax(model(bits, causal=True).float(), dim=-1)[..., 1]
    finally:
        model.train(was_training)


def metric_values(telemetry: Mapping[str, Any], bits, probs=None) -> dict[str, float]:
    """Each metric's mean over the rows of ``bits``; metrics that cannot be computed (one that
    needs ``probs`` when there are none) are left out."""
    from bitlm_core.errors import BitlmError

    values: dict[str, float] = {}
    for name, metric in telemetry.items():
        try:
            values[name] = float(metric(bits, probs).float().mean())
        except BitlmError:
            continue
    return values


def sample_metrics(model, encoder, bits, prompt_bits: int, telemetry: Mapping[str, Any],
                   causal: bool = True) -> dict[str, float]:
    """Telemetry of the bits a sample added after its prompt.

    For a causal model the probabilities come from one causal forward pass over the last
    context's worth of the sample, so metrics that need them (symbiosis) can be computed; for a
    non-causal one (``causal=False``) those metrics are left out (a gate then reports them
    missing).
    """
    new = bits[prompt_bits:]
    if not telemetry or new.numel() == 0:
        return {}
    probs = None
    if causal and getattr(model, "cfg", None) is not None:
        Fb = encoder.frame_bits
        keep = min(new.numel(), (model.cfg.max_frames - 1) * Fb)
        window = bits[bits.numel() - min(bits.numel(), model.cfg.max_frames * Fb):]
        p = next_bit_probs(model, window.view(1, -1))[0]
        probs = p[p.numel() - keep:].view(1, -1)
        new = new[new.numel() - keep:]
    return metric_values(telemetry, new.view(1, -1), probs)


def _blocked_message(decision, what: str = "sample") -> str:
    return (f"safety gate blocked the {what}: " + "; ".join(decision.reasons)
            + ". Lower the floor in safety.gate.options if this output is acceptable, or "
              "allow retries (--max-retries).")


def hil_safe_inference(model, encoder, sampler, prompt: str, n_bytes: int, *, gate,
                       telemetry: Mapping[str, Any], seed: int = 0, strict: bool = False):
    """One gated sample. Strict: :class:`SafetyError` when blocked; else warn and return it."""
    from bitlm_core.run import generate

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
                           log: Optional[Callable[[str], None]] = None) -> SafeSample:
    """Sample until the gate allows, at most ``1 + max_retries`` attempts.

    Attempt ``i`` uses seed ``seed + i``. The first sampler is tried first; once it has been
    blocked, later attempts go round the other samplers given (``samplers[1:]``) and back, so a
    fallback such as ``diffusion`` gets its turn. Every attempt is logged and kept in the
    result. When every attempt is blocked, strict mode raises :class:`SafetyError` listing them;
    otherwise the last attempt is returned with a :class:`SafetyWarning`.
    """
    from bitlm_core.run import generate

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
                          telemetry=telemetry, strict=False)
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


@dataclass(frozen=True)
class Drift:
    """The relative change of a metric's recent mean against the window before it."""

    metric: str
    previous: float
    recent: float
    change: float  # |recent - previous| / max(|previous|, eps)
    threshold: float

    @property
    def alert(self) -> bool:
        return self.change > self.threshold

    def __str__(self) -> str:
        return (f"{self.metric} drifted from {self.previous:.4g} to {self.recent:.4g} "
                f"({self.change:.0%} change, threshold {self.threshold:.0%})")


def detect_metric_drift(history: Sequence[float], window: int, threshold: float,
                        metric: str = "metric", eps: float = 1e-8) -> Optional[Drift]:
    """Mean of the last ``window`` values against the mean of the ``window`` before them.

    Returns ``None`` until there are ``2 * window`` finite values; otherwise a :class:`Drift`
    whose ``alert`` says whether the relative change exceeds ``threshold``.
    """
    if window < 1:
        raise ValueError(f"drift window must be >= 1, got {window}")
    if threshold < 0:
        raise ValueError(f"drift threshold must be >= 0, got {threshold}")
    values = [float(v) for v in history if v is not None and math.isfinite(float(v))]
    if len(values) < 2 * window:
        return None
    previous = sum(values[-2 * window:-window]) / window
    recent = sum(values[-window:]) / window
    change = abs(recent - previous) / max(abs(previous), eps)
    return Drift(metric, previous, recent, change, threshold)
