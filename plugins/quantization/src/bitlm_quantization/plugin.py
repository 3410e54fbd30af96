"""Registers the ``int8-dynamic`` and ``int4`` quantizers; torch is imported when one is used."""

from __future__ import annotations

from bitlm_core.hookspecs import hookimpl
from bitlm_core.records import QuantizerSpec


@hookimpl
def bitlm_quantizers():
    yield QuantizerSpec("int8-dynamic", "bitlm_quantization.dynamic:Int8Dynamic",
                        "int8 weights, activations quantized per batch at run time (CPU)")
    yield QuantizerSpec("int4", "bitlm_quantization.int4:Int4",
                        "4-bit linear weights in groups with float32 scales, two per byte")
