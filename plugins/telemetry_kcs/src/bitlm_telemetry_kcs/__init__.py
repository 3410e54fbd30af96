"""bitlm-telemetry-kcs: K (negentropy), C (LZ76 complexity) and S (symbiosis) telemetry metrics,
and the ``kcs`` safety gate that puts floors on them.

Importing the package is free: names are loaded on first use (PEP 562), so the entry point
module :mod:`bitlm_telemetry_kcs.plugin` imports neither numpy nor torch. torch itself is
imported only when a metric is called.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "KCSGate": "gate",
    "LZComplexity": "metrics",
    "MissingProbabilitiesError": "metrics",
    "Negentropy": "metrics",
    "Symbiosis": "metrics",
    "lz76_complexity": "lz76",
    "lz76_phrase_count": "lz76",
    "lz76_phrase_count_reference": "lz76",
    "lz76_phrases_reference": "lz76",
    "normalised_complexity": "lz76",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bitlm_telemetry_kcs' has no attribute {name!r}")
    return getattr(importlib.import_module(f"bitlm_telemetry_kcs.{module}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
