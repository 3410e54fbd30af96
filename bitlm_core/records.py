"""The typed records that plugins provide, one dataclass per component kind.

A record is a frozen dataclass with a ``name`` (what a spec writes), a ``factory`` (called with
the spec's ``options`` as keyword arguments; its signature is what options are bound against),
and a one-line ``description``. The factory may be given lazily as ``"package.module:Attribute"``:
it is imported only when a spec uses it, so a plugin whose component module imports torch at
the top still lists instantly. ``plugin`` and ``distribution`` are filled in by the registry
with where the record came from, so error messages and ``bitlm plugins list`` can name it.

Records are cheap to create: building one must not import torch. Heavy imports belong inside the
factory. Some kinds declare more than a name: an attention backend its ``priority`` (what
``auto`` picks), a telemetry metric its K/C/S ``symbol``, an objective the ``sampler`` made for
it. These fields are keyword-only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    factory: Callable[..., Any] | str
    description: str = ""
    plugin: str | None = field(default=None, compare=False)
    distribution: str | None = field(default=None, compare=False)

    kind: ClassVar[str] = "component"

    def with_origin(self, plugin: str, distribution: str | None) -> "ComponentSpec":
        return dataclasses.replace(self, plugin=plugin, distribution=distribution)

    def load(self) -> Callable[..., Any]:
        """The factory itself, importing it first when it was given as "module:attribute"."""
        if callable(self.factory):
            return self.factory
        import importlib

        module, _, attr = str(self.factory).partition(":")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj

    @property
    def lazy(self) -> bool:
        return not callable(self.factory)

    @property
    def origin(self) -> str:
        if self.distribution and self.distribution != self.plugin:
            return f"plugin '{self.plugin}' (distribution {self.distribution})"
        return f"plugin '{self.plugin}'"


@dataclass(frozen=True)
class EncoderSpec(ComponentSpec):
    """Turns bytes into bits and back (``parity9``, ``raw8``)."""

    kind: ClassVar[str] = "encoder"


@dataclass(frozen=True)
class AttentionBackendSpec(ComponentSpec):
    """Computes attention given q, k, v (``reference``, ``sdpa``).

    ``priority``: ``attention: {name: auto}`` picks the installed backend with the highest
    priority that accepts the options asked for. ``reference`` declares 0; a backend meant to
    replace it declares more. A backend that declares none (``None``) is never picked by
    ``auto``: it is used when a spec names it.
    """

    kind: ClassVar[str] = "attention"
    priority: Optional[int] = field(default=None, kw_only=True)


@dataclass(frozen=True)
class CompressorSpec(ComponentSpec):
    """A lossless codec for bit streams (``identity``, ``rle``, ``pack``)."""

    kind: ClassVar[str] = "compressor"


@dataclass(frozen=True)
class TelemetryMetricSpec(ComponentSpec):
    """A per-sequence metric of bits or of the model's predictions (``negentropy``...).

    ``symbol``: the letter the run spec's older ``telemetry.lambda_<symbol>`` keys weigh
    (``K``, ``C`` or ``S``); also the key its regulariser value is logged under (``reg/K``).
    """

    kind: ClassVar[str] = "telemetry"
    symbol: Optional[str] = field(default=None, kw_only=True)


@dataclass(frozen=True)
class SafetyGateSpec(ComponentSpec):
    """Decides whether an output may be released (``none``, ``kcs``)."""

    kind: ClassVar[str] = "safety"


@dataclass(frozen=True)
class ScalingStrategySpec(ComponentSpec):
    """Grows a model during training (``depth``, ``width``, ``context``)."""

    kind: ClassVar[str] = "scaling"


@dataclass(frozen=True)
class ObjectiveSpec(ComponentSpec):
    """Turns (model, batch) into a loss (``causal``, ``diffusion``).

    ``sampler``: the sampler made for models trained with it, used when ``sample.sampler``
    names none (bitlm's ``autoregressive`` when the objective declares none).
    """

    kind: ClassVar[str] = "objective"
    sampler: Optional[str] = field(default=None, kw_only=True)


@dataclass(frozen=True)
class SamplerSpec(ComponentSpec):
    """Generates bits from a model (``autoregressive``, ``diffusion``)."""

    kind: ClassVar[str] = "sampler"


@dataclass(frozen=True)
class CorpusSpec(ComponentSpec):
    """Provides training text as bytes (``quickstart``, ``file``)."""

    kind: ClassVar[str] = "corpus"


@dataclass(frozen=True)
class CallbackSpec(ComponentSpec):
    """Watches a training run through its events (``evaluation``, ``checkpoint``, ...).

    The factory returns a :class:`bitlm_core.engine.callbacks.Callback`; a spec adds plugin
    callbacks under ``callbacks``, after bitlm's own.
    """

    kind: ClassVar[str] = "callback"


@dataclass(frozen=True)
class CommandSpec(ComponentSpec):
    """A ``bitlm`` command or command group (``codec``, ``quantize``).

    The factory is called with no arguments when the CLI starts and returns a ``typer.Typer``
    (a group: ``bitlm NAME SUBCOMMAND``) or a function with Typer-annotated parameters (one
    command: ``bitlm NAME``). ``description`` is its line in ``bitlm --help``. Keep the
    factory's module light (typer and rich only): it is imported for ``bitlm --help`` too.
    """

    kind: ClassVar[str] = "command"


@dataclass(frozen=True)
class ReporterSpec(ComponentSpec):
    """Writes what a person reads about finished runs (``report.html`` and plots).

    The factory returns a :class:`bitlm_core.interfaces.Reporter`. ``bitlm run`` calls every
    installed reporter on the run folder when it ends (unless ``output.report`` is false).
    """

    kind: ClassVar[str] = "reporter"


@dataclass(frozen=True)
class QuantizerSpec(ComponentSpec):
    """A way to store (and run) a trained model's weights in fewer bits: ``bitlm quantize
    --scheme NAME`` writes a run folder in it, and loading such a folder asks the same
    quantizer to read it back. The factory returns a :class:`bitlm_core.interfaces.Quantizer`.
    """

    kind: ClassVar[str] = "quantizer"


@dataclass(frozen=True)
class Kind:
    """One kind of component: the hook that provides it and its record type."""

    name: str
    hook: str
    record: type[ComponentSpec]
    title: str


KINDS: dict[str, Kind] = {
    k.name: k
    for k in [
        Kind("encoder", "bitlm_encoders", EncoderSpec, "encoders"),
        Kind("attention", "bitlm_attention_backends", AttentionBackendSpec, "attention backends"),
        Kind("compressor", "bitlm_compressors", CompressorSpec, "compressors"),
        Kind("telemetry", "bitlm_telemetry_metrics", TelemetryMetricSpec, "telemetry metrics"),
        Kind("safety", "bitlm_safety_gates", SafetyGateSpec, "safety gates"),
        Kind("scaling", "bitlm_scaling_strategies", ScalingStrategySpec, "scaling strategies"),
        Kind("objective", "bitlm_objectives", ObjectiveSpec, "objectives"),
        Kind("sampler", "bitlm_samplers", SamplerSpec, "samplers"),
        Kind("corpus", "bitlm_corpora", CorpusSpec, "corpora"),
        Kind("callback", "bitlm_callbacks", CallbackSpec, "training callbacks"),
        Kind("command", "bitlm_commands", CommandSpec, "commands"),
        Kind("reporter", "bitlm_reporters", ReporterSpec, "reporters"),
        Kind("quantizer", "bitlm_quantizers", QuantizerSpec, "quantizers"),
    ]
}
