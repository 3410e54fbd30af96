"""The ``none`` safety gate: lets everything through. The default of ``safety.gate``."""

from __future__ import annotations

from typing import Mapping

from bitlm_core.interfaces import GateDecision


class NoGate:
    name = "none"

    def check(self, metrics: Mapping[str, float]) -> GateDecision:
        return GateDecision(True, (), dict(metrics))

    def reset(self) -> None:
        pass
