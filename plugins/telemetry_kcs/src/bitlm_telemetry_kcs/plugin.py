"""Registers this distribution's components with bitlm: three telemetry metrics and one gate.

Only records are created here; the metric and gate classes are imported inside the hook bodies,
and torch only when a metric is called, so ``bitlm plugins list`` stays fast.
"""

from __future__ import annotations

from bitlm_core.hookspecs import hookimpl
from bitlm_core.records import SafetyGateSpec, TelemetryMetricSpec


@hookimpl
def bitlm_telemetry_metrics():
    from bitlm_telemetry_kcs.metrics import LZComplexity, Negentropy, Symbiosis

    yield TelemetryMetricSpec("negentropy", Negentropy,
                              "K = 1 - H/H_max of frame-aligned blocks (or of the predictions)",
                              symbol="K")
    yield TelemetryMetricSpec("lz_complexity", LZComplexity,
                              "C = c(n) log2(n) / n, exact LZ76 phrase count", symbol="C")
    yield TelemetryMetricSpec("symbiosis", Symbiosis,
                              "S = exp(-mean KL(reference || model)); needs probs", symbol="S")


@hookimpl
def bitlm_safety_gates():
    from bitlm_telemetry_kcs.gate import KCSGate

    yield SafetyGateSpec("kcs", KCSGate,
                         "floors on LZ complexity (0.3) and symbiosis (0.5), EMA, burn-in")
