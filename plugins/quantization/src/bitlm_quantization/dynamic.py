"""``int8-dynamic``: int8 weights, and activations quantized per batch when the model runs.

Stored like core's ``int8-rowwise`` (int8 matrices, a float32 scale per row; the same file
layout, under its own scheme name). Loading reads the weights back and, on the CPU, replaces
every linear layer with a dynamically quantized one that holds the file's int8 weights (a
scale per output channel), quantizes each input to int8 as it arrives (one scale per batch)
and computes the product in integers (fbgemm, or qnnpack on ARM). Embedding tables, norms and
the rest stay float. Elsewhere (CUDA, MPS) the model runs as float, with a warning.

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
    """``model`` with its ``nn.Linear`` layers dynamically quantized to int8, in place; each
    layer's int8 weights are the file's (a scale per row, symmetric), not quantized again."""
    import torch
    import torch.nn as nn

    from bitlm_core.store.quantized import quantize_rows

    grids = {name: quantize_rows(m.weight) for name, m in model.named_modules()
             if type(m) is nn.Linear}  # the weights read back: q * scale, so the same q
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice of torch.ao.quantization
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        model = quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig},
                                 dtype=torch.qint8, inplace=True)
    for name, m in model.named_modules():
        if isinstance(m, DynamicLinear) and name in grids:
            q, scale = grids[name]
            weight = torch.quantize_per_channel(q.float() * scale[:, None], scale.double(),
                                                torch.zeros(len(scale), dtype=torch.long), 0,
                                                torch.qint8)
            m.set_weight_bias(weight, m.bias())
    return model


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
