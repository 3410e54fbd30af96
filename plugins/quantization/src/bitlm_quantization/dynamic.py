"""``int8-dynamic``: int8 weights, and activations quantized per batch when the model runs.

Stored like core's ``int8-rowwise`` (int8 matrices, a float32 scale per row; the same file
layout, under its own scheme name). Loading reads the weights back and, on the CPU, replaces
every linear layer with a dynamically quantized one: its weights int8 per output channel, each
input quantized to int8 as it arrives, the product computed in integers (fbgemm, or qnnpack on
ARM). Embedding tables, norms and the rest stay float. Elsewhere (CUDA, MPS) the model runs as
float, with a warning.

The backend is PyTorch's eager dynamic quantization, ``torch.ao.quantization.quantize_dynamic``,
chosen by measurement (BENCHMARKS.md, Quantization): it still works in torch 2.13 but is
deprecated (its warning says it moves to torchao). It is called in :func:`dynamic_layers` alone,
so a replacement changes that one function.
"""

from __future__ import annotations

import warnings

from bitlm_core.builtins.quantizers import Int8Rowwise

SCHEME = "int8-dynamic"


def dynamic_layers(model):
    """``model`` with its ``nn.Linear`` layers dynamically quantized to int8, in place."""
    import torch
    import torch.nn as nn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice of torch.ao.quantization
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8, inplace=True)


class Int8Dynamic(Int8Rowwise):
    name = SCHEME

    def prepare(self, model, device):
        import torch

        if torch.device(device).type != "cpu":
            warnings.warn(f"int8-dynamic runs its integer layers on the CPU; on {device} the "
                          "model runs with its weights as float", RuntimeWarning, stacklevel=2)
            return model
        for p in model.parameters():
            p.requires_grad_(False)  # inference only: the integer layers have no gradient
        model = dynamic_layers(model)
        model.inference_only = SCHEME  # what refuses training on the fly (compress --adapt)
        return model
