"""Core's quantizer: ``int8-rowwise`` storage (bitlm_core.store.quantized), run as float."""

from __future__ import annotations

from bitlm_core.store.quantized import SCHEME, dequantize_state, quantize_state


class Int8Rowwise:
    """Matrices (linear layers, embedding tables) as int8 with one float32 scale per row,
    about 4x smaller; loading multiplies back and runs the float model."""

    name = SCHEME

    def quantize(self, model):
        from bitlm_core.model.quant import effective_state

        return quantize_state(effective_state(model))  # a QAT model's weights as it computes

    def dequantize(self, tensors, model, source: str):
        return dequantize_state(tensors, source)

    def prepare(self, model, device):
        return model
