"""Resolve every component slot of a run spec against the registry, and build components.

:func:`resolve_spec` checks names and binds options (what ``bitlm validate`` does) without
calling any factory; :func:`build` calls one factory. Neither imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from bitlm_core.records import ComponentSpec
from bitlm_core.registry import Registry, get_registry
from bitlm_core.spec import Component, RunSpec


@dataclass(frozen=True)
class Resolved:
    path: str  # key path in the spec, e.g. "data.encoder"
    kind: str
    record: ComponentSpec
    options: dict[str, Any]


def slots(spec: RunSpec) -> Iterator[tuple[str, str, Component]]:
    """(key path, kind, component) for every component slot the spec fills."""
    yield "data.corpus", "corpus", spec.data.corpus
    yield "data.encoder", "encoder", spec.data.encoder
    yield "attention", "attention", spec.attention
    yield "objective", "objective", spec.objective
    yield "compression", "compressor", spec.compression
    for i, metric in enumerate(spec.telemetry.metrics):
        yield f"telemetry.metrics[{i}]", "telemetry", metric
    yield "safety.gate", "safety", spec.safety.gate
    if spec.scaling.strategy is not None:
        yield "scaling.strategy", "scaling", spec.scaling.strategy
    yield "sample.sampler", "sampler", spec.sample.sampler


def resolve_spec(spec: RunSpec, registry: Registry | None = None) -> dict[str, Resolved]:
    """Resolve names and bind options for every slot; raise ResolutionError on the first bad one."""
    registry = registry or get_registry()
    out: dict[str, Resolved] = {}
    for path, kind, comp in slots(spec):
        record = registry.resolve(kind, comp.name, f"{path}.name")
        registry.bind(record, comp.options, path)
        out[path] = Resolved(path, kind, record, dict(comp.options))
    return out


def build(resolved: Resolved, registry: Registry | None = None, **overrides) -> Any:
    """Call the factory of a resolved slot (``overrides`` replace spec options)."""
    registry = registry or get_registry()
    options = {**resolved.options, **overrides}
    return registry.build(resolved.kind, resolved.record.name, options, resolved.path)
