"""Telemetry during training and sampling: metric values, drift alerts, regularisers.

* :func:`next_bit_probs` gives a causal model's P(bit = 1) at every position, without gradients.
* :func:`metric_values` averages each telemetry metric over a batch; :func:`sample_metrics`
  measures the bits a sample added after its prompt.
* :func:`detect_metric_drift` compares the mean of the last ``window`` values of a metric with
  the mean of the ``window`` before them.
* :class:`Regularisers` adds ``weight * (1 - value)`` of each weighted, differentiable metric
  of the model's predictions to the loss (``telemetry.metrics[i].options.weight``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from bitlm_core.errors import BitlmError


def next_bit_probs(model, bits):
    """P(bit = 1) at every position of ``bits`` (B, L) from one causal forward pass, without
    gradients, in evaluation mode (the model's mode is restored). The pass runs on the
    model's device; the probabilities come back on ``bits``' device."""
    import torch

    from bitlm_core.engine.device import model_device
    from bitlm_core.model import eval_mode

    with eval_mode(model), torch.no_grad():
        logits = model(bits.to(model_device(model)), causal=True).float()
        return torch.softmax(logits, dim=-1)[..., 1].to(bits.device)


def halting_depth(model) -> dict[str, float]:
    """``{"act_blocks": mean blocks used per position}`` of the model's latest forward pass
    when it has adaptive computation time, else nothing: beside the metrics, for the drift
    check, the progress line and safety gates."""
    from bitlm_core.model.act import latest_ponder

    ponder = latest_ponder(model)
    return {} if ponder is None else {"act_blocks": float(ponder["blocks"])}


def metric_values(telemetry: Mapping[str, Any], bits, probs=None) -> dict[str, float]:
    """Each metric's mean over the rows of ``bits``; metrics that cannot be computed (one that
    needs ``probs`` when there are none) are left out."""
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
    context's worth of the sample, so metrics of the predictions can be computed; for a
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
        return {**metric_values(telemetry, new.view(1, -1), probs), **halting_depth(model)}
    return metric_values(telemetry, new.view(1, -1), probs)


class Regularisers:
    """Telemetry metrics of the model's predictions added to the loss.

    ``terms`` maps a key (the metric's K/C/S symbol, else its name) to ``(weight, metric)``;
    each adds ``weight * (1 - metric(bits, probs).mean())`` to the loss, in order, and its value
    is logged as ``reg/<key>``. Predictions are clamped to [1e-6, 1 - 1e-6] first: certain
    predictions (a parity bit) have an infinite entropy gradient.
    """

    def __init__(self, terms: Mapping[str, tuple[float, Any]]):
        self.terms = dict(terms)

    def __bool__(self) -> bool:
        return bool(self.terms)

    def __call__(self, loss, bits, probs) -> tuple[Any, dict[str, float]]:
        """(loss with every term added, each metric's value)."""
        probs = probs.clamp(1e-6, 1.0 - 1e-6)
        values = {}
        for key, (weight, metric) in self.terms.items():
            value = metric(bits, probs).mean()
            loss = loss + weight * (1.0 - value)
            values[key] = float(value.detach())
        return loss, values


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
