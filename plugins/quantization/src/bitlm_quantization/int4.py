"""``int4``: linear layers' weights as packed 4-bit integers with a float32 scale per group.

For every linear layer's weight (``rows x cols``), stored under its own name:

``<name>``          uint8, ``rows x ceil(cols / 2)``: two weights per byte, the even column in
                    the low nibble, the odd one in the high nibble, each as ``q + 8`` for ``q``
                    in ``[-8, 7]`` (an odd row ends with an unused nibble of 8, i.e. 0)
``<name>.q4scale``  float32, ``rows x ceil(cols / group)``: one scale per group of columns
``<name>.q4group``  int32, one value: the group size

The grid is core's (:mod:`bitlm_core.model.quant`, 4 bits, ``q`` in ``[-7, 7]``), the one
``train.qat`` trains on, so a QAT run's weights are stored exactly as it computed with them;
the group size is the run's ``train.qat.group_size`` when it has one, else 32. The other
matrices (embedding tables) are stored as core's ``int8-rowwise``; vectors stay float. Loading
checks every shape and dtype against the model before unpacking.
"""

from __future__ import annotations

from bitlm_core.builtins.quantizers import Int8Rowwise
from bitlm_core.errors import CheckpointError
from bitlm_core.store.quantized import quantize_state

SCHEME = "int4"
BITS = 4
DEFAULT_GROUP = 32
SCALE, GROUP = ".q4scale", ".q4group"


def pack(q):
    """int8 values in ``[-8, 7]``, shape ``(rows, cols)`` -> uint8 ``(rows, ceil(cols/2))``."""
    import torch
    import torch.nn.functional as F

    if q.dim() != 2:
        raise ValueError("pack takes a matrix")
    v = (q.to(torch.int16) + 8).to(torch.uint8)
    if v.shape[1] % 2:
        v = F.pad(v, (0, 1), value=8)
    return (v[:, 0::2] | (v[:, 1::2] << 4)).contiguous()


def unpack(packed, cols: int):
    """:func:`pack`'s inverse: int8 ``(rows, cols)``."""
    import torch

    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    q = torch.stack((low, high), dim=2).reshape(packed.shape[0], -1)
    return q[:, :cols].contiguous()


def _group_of(module, default: int) -> int:
    from bitlm_core.model.quant import QATLinear

    return module.qat_group_size if isinstance(module, QATLinear) else default


class Int4:
    """4-bit groups for linear layers (see the module's docs)."""

    name = SCHEME

    def __init__(self, group_size: int = DEFAULT_GROUP):
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError("group_size must be a whole number of at least 1")
        self.group_size = group_size

    def quantize(self, model):
        import torch
        import torch.nn as nn

        from bitlm_core.model.quant import group_quantize

        linears = {f"{name}.weight": m for name, m in model.named_modules()
                   if isinstance(m, nn.Linear)}
        weights = model.state_dict()
        out, done = {}, []
        for name, module in linears.items():
            group = _group_of(module, self.group_size)
            q, scales = group_quantize(weights[name], BITS, group)
            out[name] = pack(q)
            out[name + SCALE] = scales
            out[name + GROUP] = torch.tensor([group], dtype=torch.int32)
            done.append(name)
        rest, matrices = quantize_state({k: v for k, v in weights.items() if k not in linears})
        out.update(rest)
        return out, done + matrices

    def dequantize(self, tensors, model, source: str):
        import torch

        from bitlm_core.model.quant import group_dequantize

        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        out, rest = {}, {}
        for name, t in tensors.items():
            if name.endswith(SCALE) or name.endswith(GROUP):
                if name[: -len(SCALE if name.endswith(SCALE) else GROUP)] not in tensors:
                    raise CheckpointError(f"{source}: {name!r} has no 4-bit matrix beside it; "
                                          "the file is damaged")
                continue
            if t.dtype != torch.uint8:
                rest[name] = t
                continue
            scales, group = tensors.get(name + SCALE), tensors.get(name + GROUP)
            if name not in expected or len(expected[name]) != 2:
                raise CheckpointError(f"{source}: 4-bit tensor {name!r} is no weight matrix of "
                                      "the model its spec builds; the file is damaged")
            rows, cols = expected[name]
            if scales is None or group is None:
                raise CheckpointError(f"{source}: 4-bit matrix {name!r} has no "
                                      f"{'scales' if scales is None else 'group size'} "
                                      f"({name + (SCALE if scales is None else GROUP)}); the "
                                      "file is damaged")
            if group.dtype != torch.int32 or group.numel() != 1 or int(group) < 1:
                raise CheckpointError(f"{source}: {name + GROUP!r} must be one int32 of at "
                                      "least 1; the file is damaged")
            g = int(group)
            if scales.dtype != torch.float32:
                raise CheckpointError(f"{source}: scales {name + SCALE!r} are "
                                      f"{str(scales.dtype)[6:]}, not float32; the file is "
                                      "damaged or not written by bitlm")
            want = {"packed": (rows, (cols + 1) // 2), "scales": (rows, -(-cols // g))}
            for what, tensor in (("packed", t), ("scales", scales)):
                if tuple(tensor.shape) != want[what]:
                    raise CheckpointError(
                        f"{source}: {what} tensor of {name!r} has shape {tuple(tensor.shape)}, "
                        f"and a {rows} x {cols} matrix in groups of {g} needs {want[what]}; "
                        "the file is damaged or belongs to another model")
            if not torch.isfinite(scales).all():
                raise CheckpointError(f"{source}: scales of {name!r} are not all finite")
            out[name] = group_dequantize(unpack(t, cols), scales, g)
        out.update(Int8Rowwise().dequantize(rest, model, source))
        return out

    def prepare(self, model, device):
        return model
