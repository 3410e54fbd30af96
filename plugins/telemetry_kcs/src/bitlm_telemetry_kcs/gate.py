"""The ``kcs`` safety gate: floors on LZ complexity (C), symbiosis (S) and optionally negentropy (K).

``check(metrics)`` takes the metric values of one output or one batch, keyed by metric name
(``lz_complexity``, ``symbiosis``, ``negentropy``, as the metrics of this plugin are named),
smooths each gated value with an exponential moving average, and blocks when a smoothed value
falls below its floor, once the burn-in is over::

    smoothed_1 = value_1                                  (first check: no bias towards 0)
    smoothed_t = ema * smoothed_{t-1} + (1 - ema) * value_t

Decisions by design:

* Floors: ``c_floor`` 0.3 (C of English text bits is ~0.35 even at n = 10^5; degenerate loops
  and stuck bits fall far below), ``s_floor`` 0.5 (the model does no better than a coin on the
  bits it produced or was given), ``k_floor`` 0.0. A floor of 0 switches that check off: the
  metric is then neither compared nor required. Metrics without a floor are ignored.
* Defaults ``ema=0.0`` and ``burn_in=0`` judge every check on its own values, at once: right
  for gating individual samples, where smoothing would let one degenerate output hide behind
  good earlier ones. For training telemetry set e.g. ``ema: 0.9, burn_in: 10``.
* Burn-in: the first ``burn_in`` checks always allow (they still update the averages), so an
  untrained model's early telemetry cannot stop a run.
* A gated metric missing from ``metrics`` (or NaN) blocks, with a reason saying so
  (``missing="block"``, the default: a gate should fail closed; a missing symbiosis usually
  means the caller forgot to pass the model's probabilities). ``missing="skip"`` ignores it
  instead. A missing value leaves that metric's average unchanged. Missing metrics do not block
  during burn-in either.

The decision's ``metrics`` are the values compared with the floors (smoothed), plus any other
values that were passed, unchanged. Each reason names the metric, its value and its floor.
"""

from __future__ import annotations

import math
from typing import Mapping

from bitlm_core.interfaces import GateDecision

__all__ = ["KCSGate"]


def _floor(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value) or value < 0:
        raise ValueError(f"kcs gate: {name} must be a finite number >= 0 (0 switches it off), "
                         f"got {value!r}")
    return float(value)


class KCSGate:
    """Blocks outputs whose (smoothed) LZ complexity, symbiosis or negentropy is below a floor.

    Options: ``c_floor`` (0.3, on ``lz_complexity``), ``s_floor`` (0.5, on ``symbiosis``),
    ``k_floor`` (0.0 = off, on ``negentropy``), ``ema`` (0.0: no smoothing; in [0, 1), the
    weight of the previous average), ``burn_in`` (0: checks before it can block),
    ``missing`` ("block" or "skip": what a gated metric absent from the dict does).
    """

    name = "kcs"

    def __init__(self, c_floor: float = 0.3, s_floor: float = 0.5, k_floor: float = 0.0,
                 ema: float = 0.0, burn_in: int = 0, missing: str = "block"):
        floors = {"lz_complexity": _floor("c_floor", c_floor),
                  "symbiosis": _floor("s_floor", s_floor),
                  "negentropy": _floor("k_floor", k_floor)}
        self.floors: dict[str, float] = {k: v for k, v in floors.items() if v > 0}
        if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0.0 <= ema < 1.0:
            raise ValueError(f"kcs gate: ema must be in [0, 1) (weight of the previous "
                             f"average; 0 = no smoothing), got {ema!r}")
        if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
            raise ValueError(f"kcs gate: burn_in must be an integer >= 0, got {burn_in!r}")
        if missing not in ("block", "skip"):
            raise ValueError(f"kcs gate: missing must be 'block' or 'skip', got {missing!r}")
        self.ema = float(ema)
        self.burn_in = burn_in
        self.missing = missing
        self.smoothed: dict[str, float] = {}
        self.checks = 0

    def reset(self) -> None:
        """Forget the averages and the check count (burn-in starts again)."""
        self.smoothed.clear()
        self.checks = 0

    def _update(self, name: str, value: float) -> float:
        previous = self.smoothed.get(name)
        if previous is None:
            current = value
        else:
            current = self.ema * previous + (1.0 - self.ema) * value
        self.smoothed[name] = current
        return current

    def check(self, metrics: Mapping[str, float]) -> GateDecision:
        """Update the averages with ``metrics`` and decide whether the output may pass."""
        self.checks += 1
        reported = {str(k): float(v) for k, v in metrics.items()}
        reasons = []
        for name, floor in self.floors.items():
            value = reported.get(name)
            if value is None or math.isnan(value):
                if self.missing == "block":
                    reasons.append(f"{name} is missing from the metrics (floor {floor:g}); "
                                   f"compute it, or set missing: skip")
                continue
            smoothed = self._update(name, value)
            reported[name] = smoothed
            if smoothed < floor:
                how = f"smoothed, ema {self.ema:g}" if self.ema else "not smoothed"
                reasons.append(f"{name} {smoothed:.4g} ({how}) is below its floor {floor:g}")
        if self.checks <= self.burn_in:
            return GateDecision(True, (), reported)
        return GateDecision(not reasons, tuple(reasons), reported)

    def __repr__(self) -> str:
        floors = ", ".join(f"{k}>={v:g}" for k, v in self.floors.items())
        return (f"KCSGate({floors}; ema={self.ema:g}, burn_in={self.burn_in}, "
                f"missing={self.missing!r})")
