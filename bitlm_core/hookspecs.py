"""Hook specifications: one zero-argument provider hook per component kind.

A plugin is a module with functions marked ``@hookimpl`` whose names match the hooks below. Each
returns an iterable of records of one type (see :mod:`bitlm_core.records`). The core calls every
hook once, when the registry is built; it never fires hooks in a hot loop, and components are
called directly afterwards.

Keep hook bodies cheap: create records, and import torch or numpy only inside factories. Then
``bitlm --help`` and ``bitlm plugins list`` stay fast however many plugins are installed.

Register a plugin through an entry point in group ``bitlm``::

    [project.entry-points.bitlm]
    my_plugin = "my_package.plugin"
"""

from __future__ import annotations

from typing import Iterable

import pluggy

PROJECT = "bitlm"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def bitlm_encoders() -> Iterable["EncoderSpec"]:  # noqa: F821
    """Provide encoders that turn bytes into bit tensors and back.

    The factory returns an object with ``frame_bits`` (bits per byte frame), ``encode(data:
    bytes) -> torch.Tensor`` (uint8 bits) and ``decode(bits, repair=False) -> bytes``.

    Example::

        @hookimpl
        def bitlm_encoders():
            yield EncoderSpec("raw8", RawEncoder, "8 bits per byte, MSB first")
    """


@hookspec
def bitlm_attention_backends() -> Iterable["AttentionBackendSpec"]:  # noqa: F821
    """Provide attention backends.

    The factory returns a callable ``backend(q, k, v, *, causal, dropout_p=0.0,
    need_weights=False) -> (out, weights_or_None)`` with q of shape (B, H, Tq, D) and k, v of
    shape (B, H, Tk, D). When ``Tq < Tk`` (decoding with a key/value cache) the queries are the
    last ``Tq`` positions, so causal masking is aligned to the bottom right. It may also carry a
    ``supports_weights`` attribute (False when it cannot return attention maps). The record's
    ``priority`` decides what ``attention: {name: auto}`` picks: the highest that builds (a
    backend without one is used only when a spec names it).

    Example::

        @hookimpl
        def bitlm_attention_backends():
            yield AttentionBackendSpec("sdpa", SdpaAttention, "torch scaled_dot_product_attention",
                                       priority=10)
    """


@hookspec
def bitlm_compressors() -> Iterable["CompressorSpec"]:  # noqa: F821
    """Provide lossless bit-stream codecs.

    The factory returns an object with ``name``, ``magic`` (the bytes every stream starts with:
    how ``bitlm codec decompress`` finds the codec of a file), ``compress(bits) -> bytes`` and
    ``decompress(data, max_bits=...) -> torch.Tensor``; ``decompress`` raises
    :class:`bitlm_core.errors.CodecError` on a truncated, corrupted or oversized stream.
    ``bitlm_core.testing.check_codec_contract`` checks it all.

    Example::

        @hookimpl
        def bitlm_compressors():
            yield CompressorSpec("rle", RunLengthCodec, "run lengths as varints")
    """


@hookspec
def bitlm_telemetry_metrics() -> Iterable["TelemetryMetricSpec"]:  # noqa: F821
    """Provide telemetry metrics.

    The factory returns an object with ``name`` and ``__call__(bits, probs=None) -> Tensor`` of
    shape (B,), one value per sequence, where ``probs`` is the model's probability of a 1 at each
    position when available. Values lie in the metric's ``bounds`` (an optional attribute,
    default (0, 1)); bitlm checks a metric's output once on a small batch when a run is built.
    A metric that raises a ``BitlmError`` (for example because it needs ``probs`` and has none)
    is left out of that measurement. ``bitlm_core.testing.check_metric_contract`` checks it all.

    Regularisers: every metric slot of a spec takes the option ``weight`` (bitlm's, not passed
    to the factory); a weight above 0 adds ``weight * (1 - value)`` of the model's predictions
    to the loss. That needs ``differentiable = True`` on the metric object (its value has a
    gradient with respect to ``probs``). The record's ``symbol`` (``K``, ``C``, ``S``) is what
    the older keys ``telemetry.lambda_K`` and ``lambda_S`` weigh.

    Example::

        @hookimpl
        def bitlm_telemetry_metrics():
            yield TelemetryMetricSpec("lz_complexity", LZComplexity, "normalised LZ76 phrases",
                                      symbol="C")
    """


@hookspec
def bitlm_safety_gates() -> Iterable["SafetyGateSpec"]:  # noqa: F821
    """Provide safety gates.

    The factory returns an object with ``check(metrics: dict[str, float]) -> GateDecision``
    (:class:`bitlm_core.interfaces.GateDecision`), deciding whether an output may be released.

    Example::

        @hookimpl
        def bitlm_safety_gates():
            yield SafetyGateSpec("kcs", KCSGate, "floors on complexity and symbiosis")
    """


@hookspec
def bitlm_scaling_strategies() -> Iterable["ScalingStrategySpec"]:  # noqa: F821
    """Provide ways to grow a model during training.

    The factory returns an object with ``grow(model) -> model`` that grows the model in place
    (and returns it) so that its outputs on existing inputs start out unchanged; optionally
    ``can_grow(model) -> bool``, ``next_frames(model) -> int`` (the context after growing, in
    byte frames) and ``describe(old_cfg, new_cfg) -> str``. The trainer calls ``grow`` when
    held-out bits per byte plateau (``scaling.patience``, ``min_delta``, ``max_growths``) and
    keeps the optimizer state of every parameter that survives. Resuming and loading rebuild a
    grown context, depth or feed-forward width from the checkpoint's saved model config.

    Example::

        @hookimpl
        def bitlm_scaling_strategies():
            yield ScalingStrategySpec("context", ContextGrowth, "multiply the context")
    """


@hookspec
def bitlm_objectives() -> Iterable["ObjectiveSpec"]:  # noqa: F821
    """Provide training objectives.

    The factory returns an object with ``name``, ``causal`` (whether the model runs with a
    causal mask), ``is_bound`` (whether its bits per byte are a bound rather than a code length)
    and ``__call__(model, bits) -> ObjectiveOutput`` whose ``loss`` is in nats per bit and whose
    ``bits_per_byte`` is the figure reported for the batch. The record's ``sampler`` names the
    sampler made for it, the default of ``sample.sampler``.

    Example::

        @hookimpl
        def bitlm_objectives():
            yield ObjectiveSpec("causal", CausalObjective, "next-bit cross-entropy",
                                sampler="autoregressive")
    """


@hookspec
def bitlm_samplers() -> Iterable["SamplerSpec"]:  # noqa: F821
    """Provide samplers that generate bits from a model.

    The factory returns an object with ``name``, ``causal`` (whether it needs a model trained
    with a causal objective) and ``sample(model, prompt_bits, n_frames, generator, encoder) ->
    torch.Tensor``: the prompt's bits followed by ``n_frames`` whole frames that ``encoder``
    can decode.

    Example::

        @hookimpl
        def bitlm_samplers():
            yield SamplerSpec("autoregressive", AutoregressiveSampler, "bit by bit, top-k/top-p")
    """


@hookspec
def bitlm_corpora() -> Iterable["CorpusSpec"]:  # noqa: F821
    """Provide training corpora.

    The factory returns an object with ``name`` and ``read() -> bytes``.

    Example::

        @hookimpl
        def bitlm_corpora():
            yield CorpusSpec("file", FileCorpus, "a text file, optionally gzip-compressed")
    """


@hookspec
def bitlm_callbacks() -> Iterable["CallbackSpec"]:  # noqa: F821
    """Provide training callbacks: objects told about a run's steps, evaluations, checkpoints
    and end (the events of :class:`bitlm_core.engine.callbacks.Callback`).

    bitlm's own callbacks (evaluation, checkpoints, telemetry, growth, progress, ...) are
    records of this kind too and always run first; a spec adds others by name under
    ``callbacks: [{name: ..., options: {...}}]``. Building a callback must do nothing but keep
    its options: the work belongs in its events.

    Example::

        @hookimpl
        def bitlm_callbacks():
            yield CallbackSpec("loss_to_csv", "my_package.csv:LossToCsv", "loss per step as CSV")
    """


@hookspec
def bitlm_commands() -> Iterable["CommandSpec"]:  # noqa: F821
    """Provide ``bitlm`` commands, as llm's ``register_commands`` does, but as records.

    The factory takes no arguments and returns a ``typer.Typer`` (a command group, ``bitlm
    NAME ...``) or a function with Typer-annotated parameters (one command, ``bitlm NAME``).
    The CLI adds every command when it starts, so keep the factory's module light: import
    torch and your own heavy dependencies inside the commands. A :class:`BitlmError` raised by
    a command is printed as one message with its exit status, as for bitlm's own. A plugin
    whose hook or factory fails, or one of whose command names bitlm or an earlier plugin
    already uses, adds none of its commands and is listed as failed (naming the other owner);
    the CLI works without it.

    Example::

        @hookimpl
        def bitlm_commands():
            yield CommandSpec("dashboard", "my_dashboard.cli:dashboard_app",
                              "a local web page of runs")
    """


@hookspec
def bitlm_reporters() -> Iterable["ReporterSpec"]:  # noqa: F821
    """Provide reporters: components that write what a person reads about runs (a report page,
    plots). ``bitlm run`` calls every installed one on the run folder when it ends (switch it
    off with ``output.report: false``); a reporter that fails is a warning, never a failed run.

    Example::

        @hookimpl
        def bitlm_reporters():
            yield ReporterSpec("html", "bitlm_report.html:HtmlReport", "report.html and PNGs")
    """


@hookspec
def bitlm_quantizers() -> Iterable["QuantizerSpec"]:  # noqa: F821
    """Provide weight formats for ``bitlm quantize --scheme NAME``: each stores a trained
    model's weights in fewer bits and reads them back (and may swap in faster layers for
    inference). A run folder's weights name their scheme in the safetensors metadata
    (``bitlm_weights``), so loading finds the quantizer that wrote them.

    Example::

        @hookimpl
        def bitlm_quantizers():
            yield QuantizerSpec("int4", "bitlm_quantization.int4:Int4", "4-bit packed weights")
    """
