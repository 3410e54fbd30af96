"""Registers bitlm's built-in components, through the same hooks an external plugin uses."""

from __future__ import annotations

from bitlm_core.hookspecs import hookimpl
from bitlm_core.records import (AttentionBackendSpec, CallbackSpec, CommandSpec, CompressorSpec,
                                CorpusSpec, EncoderSpec, ObjectiveSpec, QuantizerSpec,
                                SafetyGateSpec, SamplerSpec, ScalingStrategySpec)


@hookimpl
def bitlm_encoders():
    from bitlm_core.builtins.encoders import Parity9Encoder, Raw8Encoder

    yield EncoderSpec("parity9", Parity9Encoder, "8 data bits MSB first + even parity bit")
    yield EncoderSpec("raw8", Raw8Encoder, "8 data bits MSB first")


@hookimpl
def bitlm_attention_backends():
    from bitlm_core.builtins.attention import ReferenceAttention, auto_attention

    yield AttentionBackendSpec("reference", ReferenceAttention,
                               "explicit softmax(QK^T)V; can return attention maps", priority=0)
    yield AttentionBackendSpec("auto", auto_attention,
                               "the installed backend of highest priority")


@hookimpl
def bitlm_compressors():
    from bitlm_core.builtins.compressors import IdentityCompressor

    yield CompressorSpec("identity", IdentityCompressor, "one byte per bit; never compresses")


@hookimpl
def bitlm_safety_gates():
    from bitlm_core.builtins.safety import NoGate

    yield SafetyGateSpec("none", NoGate, "lets every output through")


@hookimpl
def bitlm_corpora():
    from bitlm_core.builtins.corpora import FileCorpus, QuickstartCorpus

    yield CorpusSpec("quickstart", QuickstartCorpus, "~1 MB of Jane Austen, shipped with core")
    yield CorpusSpec("file", FileCorpus, "a text file (or .gz) given by options.path")


@hookimpl
def bitlm_objectives():
    from bitlm_core.builtins.objectives import CausalObjective, DistillObjective

    yield ObjectiveSpec("causal", CausalObjective, "next-bit cross-entropy (bits per byte)",
                        sampler="autoregressive")
    yield ObjectiveSpec("distill", DistillObjective,
                        "next-bit cross-entropy plus agreement with a trained teacher run",
                        sampler="autoregressive")


@hookimpl
def bitlm_samplers():
    from bitlm_core.builtins.samplers import AutoregressiveSampler

    yield SamplerSpec("autoregressive", AutoregressiveSampler,
                      "bit by bit with a key/value cache; temperature, top-k, top-p")


@hookimpl
def bitlm_scaling_strategies():
    from bitlm_core.builtins.scaling import ContextGrowth, DepthGrowth, WidthGrowth

    yield ScalingStrategySpec("context", ContextGrowth,
                              "on a plateau, multiply the context (outputs on the old one kept)")
    yield ScalingStrategySpec("depth", DepthGrowth,
                              "on a plateau, add blocks that start as the identity")
    yield ScalingStrategySpec("width", WidthGrowth,
                              "on a plateau, multiply feed-forward units (new ones start silent)")


@hookimpl
def bitlm_callbacks():
    from bitlm_core.engine import callbacks as c

    yield CallbackSpec("log", c.TrainLog, "a train record every train.log_every steps")
    yield CallbackSpec("evaluation", c.Evaluation,
                       "held-out bits per byte every train.eval_every steps")
    yield CallbackSpec("growth", c.Growth, "scaling.strategy on a plateau of held-out figures")
    yield CallbackSpec("attention_maps", c.AttentionMaps,
                       "attention maps at each evaluation (attention.full_attn_logging)")
    yield CallbackSpec("telemetry", c.Telemetry,
                       "telemetry.metrics every telemetry.every steps, drift alerts")
    yield CallbackSpec("progress", c.Progress, "the progress bar's line")
    yield CallbackSpec("checkpoint", c.Checkpointing,
                       "checkpoints every train.checkpoint_every steps, at the end, on Ctrl-C")
    yield CallbackSpec("time_limit", c.TimeLimit, "stop after train.max_minutes")
    yield CallbackSpec("qat", c.QuantizationAware, "train.qat: linear layers on a weight grid")


@hookimpl
def bitlm_commands():
    # lazy: the command modules are imported when the CLI starts, never for `plugins list`
    yield CommandSpec("codec", "bitlm_core.cli.codec:commands",
                      "Compress, decompress and measure bit streams with the installed codecs.")
    yield CommandSpec("quantize", "bitlm_core.cli.quantize:commands",
                      "Store a run's weights in fewer bits (int8 by default; --scheme).")


@hookimpl
def bitlm_quantizers():
    yield QuantizerSpec("int8-rowwise", "bitlm_core.builtins.quantizers:Int8Rowwise",
                        "int8 matrices, a scale per row, ~4x smaller; runs as float")
