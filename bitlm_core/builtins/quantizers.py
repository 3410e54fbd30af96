"""Core's quantizer: ``int8-rowwise`` storage (bitlm_core.store.quantized), run as float."""

from __future__ import annotations

from bitlm_core.errors import CheckpointError
from bitlm_core.store.quantized import SCALE_SUFFIX, SCHEME, dequantize_state, quantize_state


class Int8Rowwise:
    """Matrices (linear layers, embedding tables) as int8 with one float32 scale per row,
    about 4x smaller; loading multiplies back and runs the float model."""

    name = SCHEME

    def quantize(self, model):
        return quantize_state(model.state_dict())

    def dequantize(self, tensors, model, source: str):
        import torch

        for name, t in tensors.items():
            if name.endswith(SCALE_SUFFIX) and t.dtype != torch.float32:
                raise CheckpointError(f"{source}: scale {name!r} is {str(t.dtype)[6:]}, not "
                                      "float32; the file is damaged or not written by bitlm")
        return dequantize_state(tensors, source)

    def prepare(self, model, device):
        return model
