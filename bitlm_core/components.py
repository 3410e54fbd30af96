"""From a run spec to a run's components: complete, resolve, bind, build.

* :func:`complete_spec` fills in what depends on what is installed: ``sample.sampler`` without
  a name becomes the sampler the objective's record names, ``telemetry.metrics: all`` every
  installed metric. The run folder keeps the completed spec.
* :func:`resolve_spec` checks every slot's name and binds its options against the factory's
  signature (what ``bitlm validate`` does) without calling any factory.
* :class:`Components` builds a run's components (everything but the model and callbacks).

Telemetry slots take one option of bitlm's own, ``weight`` (see :func:`telemetry_weights`),
which is not passed to the metric's factory. Nothing here imports torch (factories may).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from bitlm_core.errors import PluginError, SpecError
from bitlm_core.plugins import BUILTIN_NAME
from bitlm_core.records import ComponentSpec
from bitlm_core.registry import Registry, get_registry
from bitlm_core.spec import Component, RunSpec

DEFAULT_SAMPLER = "autoregressive"  # for objectives whose record names no sampler
RESERVED_OPTIONS = {"telemetry": ("weight",)}  # options bitlm reads itself, per kind
LEGACY_WEIGHTS = ("K", "S")  # telemetry.lambda_K and lambda_S


@dataclass(frozen=True)
class Resolved:
    path: str  # key path in the spec, e.g. "data.encoder"
    kind: str
    record: ComponentSpec
    options: dict[str, Any]  # as the spec gives them (bitlm's own options included)

    @property
    def factory_options(self) -> dict[str, Any]:
        """The options passed to the factory: all but bitlm's own."""
        reserved = RESERVED_OPTIONS.get(self.kind, ())
        return {k: v for k, v in self.options.items() if k not in reserved}


def complete_spec(spec: RunSpec, registry: Registry | None = None) -> RunSpec:
    """``spec`` with the defaults that depend on installed components filled in."""
    registry = registry or get_registry()
    if spec.sample.sampler.name is None:
        record = registry.resolve("objective", spec.objective.name, "objective.name")
        sampler = spec.sample.sampler.model_copy(
            update={"name": getattr(record, "sampler", None) or DEFAULT_SAMPLER})
        spec = spec.model_copy(update={"sample": spec.sample.model_copy(
            update={"sampler": sampler})})
    if spec.telemetry.metrics == "all":
        metrics = [Component(name=name) for name in registry.names("telemetry")]
        spec = spec.model_copy(update={"telemetry": spec.telemetry.model_copy(
            update={"metrics": metrics})})
    return spec


def slots(spec: RunSpec) -> Iterator[tuple[str, str, Any]]:
    """(key path, kind, component) for every component slot of a completed spec."""
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
    for i, callback in enumerate(spec.callbacks):
        yield f"callbacks[{i}]", "callback", callback


def resolve_spec(spec: RunSpec, registry: Registry | None = None) -> dict[str, Resolved]:
    """Resolve names and bind options for every slot (completing the spec first); raise a
    SpecError on the first bad one."""
    registry = registry or get_registry()
    return _resolve(complete_spec(spec, registry), registry)


def _resolve(spec: RunSpec, registry: Registry) -> dict[str, Resolved]:
    out: dict[str, Resolved] = {}
    for path, kind, comp in slots(spec):
        record = registry.resolve(kind, comp.name, f"{path}.name")
        if kind == "callback" and record.plugin == BUILTIN_NAME:
            raise SpecError(f"{path}: '{record.name}' is one of bitlm's own callbacks, which "
                            "always run; leave it out (its spec keys set it up, e.g. "
                            "train.eval_every)")
        resolved = Resolved(path, kind, record, dict(comp.options))
        registry.bind(record, resolved.factory_options, path)
        out[path] = resolved
    weights = telemetry_weights(spec, out, registry)
    for path, weight in weights.items():  # validate shows the weight a lambda_X key gave
        res = out[path]
        out[path] = Resolved(path, res.kind, res.record, {**res.options, "weight": weight})
    return out


def telemetry_weights(spec: RunSpec, resolved: Mapping[str, Resolved],
                      registry: Registry) -> dict[str, float]:
    """The regulariser weight of every weighted telemetry slot, by key path.

    A slot's ``options.weight``, or for the metric whose record has symbol ``K`` (``S``) the
    older ``telemetry.lambda_K`` (``lambda_S``); giving both is an error, as is a lambda with no
    such metric among ``telemetry.metrics``.
    """
    weights: dict[str, float] = {}
    for path, res in resolved.items():
        if res.kind != "telemetry" or "weight" not in res.options:
            continue
        weight = res.options["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise SpecError(f"{path}.options.weight must be a number >= 0, got {weight!r}")
        if weight:
            weights[path] = float(weight)
    for symbol in LEGACY_WEIGHTS:
        lam = getattr(spec.telemetry, f"lambda_{symbol}")
        if not lam:
            continue
        paths = [p for p, r in resolved.items()
                 if r.kind == "telemetry" and getattr(r.record, "symbol", None) == symbol]
        if not paths:
            names = [r.name for r in registry.records["telemetry"].values()
                     if getattr(r, "symbol", None) == symbol]
            hint = (f"add {{name: {names[0]}}} to telemetry.metrics" if names else
                    f"no installed telemetry metric has symbol {symbol} (`bitlm plugins show "
                    "telemetry` lists them)")
            raise SpecError(f"telemetry.lambda_{symbol} weights the metric with symbol {symbol}: "
                            f"{hint}, or set lambda_{symbol}: 0")
        for path in paths:
            if path in weights:
                raise SpecError(f"telemetry.lambda_{symbol} and {path}.options.weight both "
                                "weight one metric; give the weight once (options.weight)")
            weights[path] = float(lam)
    return weights


def build(resolved: Resolved, registry: Registry | None = None, **overrides) -> Any:
    """Call the factory of a resolved slot (``overrides`` replace spec options)."""
    registry = registry or get_registry()
    options = {**resolved.factory_options, **overrides}
    return registry.build(resolved.kind, resolved.record.name, options, resolved.path)


#: Attributes bitlm reads from components of these kinds (see bitlm_core.interfaces).
REQUIRED = {"objective": ("causal", "is_bound"), "sampler": ("causal", "sample"),
            "callback": ("on_fit_start", "on_step", "on_eval", "on_checkpoint", "on_interrupt",
                         "on_end"),
            "quantizer": ("quantize", "dequantize", "prepare")}


def check_interface(record: ComponentSpec, component: Any) -> Any:
    """``component`` when it has what bitlm reads from its kind, else a PluginError naming the
    plugin that provided it."""
    missing = [a for a in REQUIRED.get(record.kind, ()) if not hasattr(component, a)]
    if missing:
        raise PluginError(f"{record.kind} '{record.name}' from {record.origin} has no "
                          f"{', '.join(missing)}, which every {record.kind} declares (see "
                          "bitlm_core.interfaces)")
    return component


@dataclass
class Components:
    """The built components of a run (everything but the model and its callbacks)."""

    spec: RunSpec  # completed (complete_spec): what the run folder keeps
    resolved: dict[str, Resolved]
    encoder: Any
    attention: Any
    objective: Any
    compressor: Any
    gate: Any
    sampler: Any
    telemetry: dict[str, Any] = field(default_factory=dict)  # by metric name
    regularisers: dict[str, tuple[float, Any]] = field(default_factory=dict)  # reg/<key>
    scaling: Any = None

    @property
    def causal(self) -> bool:
        """Whether the run's model is causal (its objective's mask)."""
        return bool(self.objective.causal)

    @classmethod
    def build(cls, spec: RunSpec, registry: Registry | None = None) -> "Components":
        registry = registry or get_registry()
        spec = complete_spec(spec, registry)
        r = _resolve(spec, registry)

        def make(path: str) -> Any:
            return check_interface(r[path].record, build(r[path], registry))

        objective, sampler = make("objective"), make("sample.sampler")
        if bool(sampler.causal) != bool(objective.causal):
            raise SpecError(
                f"sample.sampler '{spec.sample.sampler.name}' and objective "
                f"'{spec.objective.name}' disagree: one is causal and the other is not; pick a "
                "sampler made for the objective (or leave sample.sampler.name out)")
        telemetry, regularisers, weighted = {}, {}, {}
        for path, res in r.items():
            if res.kind != "telemetry":
                continue
            metric = probe_metric(path, res, make(path))
            name = getattr(metric, "name", res.record.name)
            if name in telemetry:
                raise SpecError(f"{path} is a second metric named '{name}'; both would log "
                                f"as telemetry/.../{name}: keep one of them")
            telemetry[name] = metric
            weight = res.options.get("weight", 0.0)
            if weight:
                key = getattr(res.record, "symbol", None) or res.record.name
                if key in weighted:
                    raise SpecError(f"{weighted[key]} and {path} both weight {key} (logged as "
                                    f"reg/{key}); give the weight to one of them")
                weighted[key] = path
                regularisers[key] = (weight, check_regulariser(path, res, metric, objective,
                                                               spec))
        return cls(spec=spec, resolved=r, encoder=make("data.encoder"),
                   attention=make("attention"), objective=objective,
                   compressor=make("compression"), gate=make("safety.gate"), sampler=sampler,
                   telemetry=telemetry, regularisers=regularisers,
                   scaling=make("scaling.strategy") if "scaling.strategy" in r else None)


DEFAULT_BOUNDS = (0.0, 1.0)  # where a metric's values lie unless it declares ``bounds``


def output_problem(value: Any, rows: int, bounds: tuple[float, float]) -> str | None:
    """What is wrong with a telemetry metric's output for ``rows`` rows, or None: it must be a
    floating tensor of shape (rows,), finite, within ``bounds``."""
    import torch

    if not isinstance(value, torch.Tensor):
        return f"a {type(value).__name__}, not a tensor"
    if not value.is_floating_point():
        return f"a tensor of {value.dtype}, not of floats"
    if tuple(value.shape) != (rows,):
        return f"shape {tuple(value.shape)} for {rows} rows, not ({rows},)"
    if not bool(torch.isfinite(value).all()):
        return "values that are not finite"
    low, high = float(value.min()), float(value.max())
    if low < bounds[0] or high > bounds[1]:
        return f"values in [{low:.4g}, {high:.4g}], outside its bounds {tuple(bounds)}"
    return None


def probe_metric(path: str, res: Resolved, metric: Any) -> Any:
    """Call a telemetry metric once on a small batch (with and without probabilities) and
    check its output, so that a plugin's bug is named before training starts, not at the first
    telemetry step."""
    import torch

    from bitlm_core.errors import BitlmError
    from bitlm_core.plugins import describe_exception

    g = torch.Generator().manual_seed(0)
    bits = (torch.rand(2, 144, generator=g) < 0.5).to(torch.uint8)
    probs = torch.rand(2, 144, generator=g).clamp(0.01, 0.99)
    where = f"{res.record.kind} '{res.record.name}' from {res.record.origin} at {path}"
    for given in (probs, None):
        try:
            value = metric(bits, given)
        except BitlmError:  # a metric may refuse to work without probabilities
            continue
        except Exception as exc:
            raise PluginError(f"{where} raised on a test batch: {describe_exception(exc)}")
        problem = output_problem(value, 2, getattr(metric, "bounds", DEFAULT_BOUNDS))
        if problem:
            raise PluginError(f"{where} returned {problem}; a metric returns one float per row "
                              "(see bitlm_core.interfaces.TelemetryMetric)")
    return metric


def check_regulariser(path: str, res: Resolved, metric: Any, objective: Any,
                      spec: RunSpec) -> Any:
    """A weighted metric, or a SpecError when it cannot regularise this run."""
    if not objective.causal:
        raise SpecError(f"telemetry weights ({path}, or telemetry.lambda_K and lambda_S) "
                        f"regularise the causal model's predictions; objective "
                        f"'{spec.objective.name}' gives none. Set them to 0, or train with "
                        "objective: causal")
    if not getattr(metric, "differentiable", False):
        raise SpecError(f"{path} ('{res.record.name}') has a regulariser weight, but it is not "
                        "differentiable as configured, so it can be logged and gated, not "
                        "trained on; see its options with `bitlm plugins show telemetry`, or "
                        "set the weight to 0")
    return metric
