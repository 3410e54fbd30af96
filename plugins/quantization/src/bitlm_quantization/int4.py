"""``int4``: linear layers' weights as packed 4-bit integers with a float32 scale per group.

For every linear layer's weight (``rows x cols``), stored under its own name:

``<name>``          uint8, ``rows x ceil(cols / 2)``: two weights per byte, the even column in
                    the low nibble, the odd one in the high nibble, each as ``q + 8`` for ``q``
                    in ``[-8, 7]`` (an odd row ends with an unused nibble of 8, i.e. 0)
``<name>.q4scale``  float32, ``rows x ceil(cols / group)``: one scale per group of columns
``<name>.q4group``  int32, one value: the group size

The grid is core's (:mod:`bitlm_core.model.quant`, 4 bits, ``q`` in ``[-7, 7]``), the one
``train.qat`` trains on, so a QAT run's linear layers are stored exactly as they computed: with
its ``group_size`` and, for ``train.qat.bits`` below 4, its own (coarser) grid, which 4-bit
integers hold too; a run trained on more than 4 bits is refused. Other runs get groups of 32.
The other matrices (embedding tables) are stored as core's ``int8-rowwise``; vectors stay
float. Loading checks every shape and dtype against the model before unpacking.
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


MAX_GROUP = 4096  # the largest train.qat.group_size


def _grid_of(module, name: str, default_group: int) -> tuple[int, int]:
    """(bits, group size) to store a linear layer with: a QAT layer's own grid, which 4-bit
    integers hold exactly when it has at most 4 bits; else 4 bits in default groups."""
    from bitlm_core.model.quant import QATLinear

    if not isinstance(module, QATLinear):
        return BITS, default_group
    if module.qat_bits > BITS:
        raise CheckpointError(f"{name} was trained on a {module.qat_bits}-bit grid "
                              "(train.qat.bits), which 4-bit integers cannot hold; store the "
                              "run with --scheme int8-rowwise or int8-dynamic, or train it with "
                              "train.qat.bits of at most 4")
    return module.qat_bits, module.qat_group_size


class Int4:
    """4-bit groups for linear layers (see the module's docs)."""

    name = SCHEME

    def __init__(self, group_size: int = DEFAULT_GROUP):
        if not isinstance(group_size, int) or not 1 <= group_size <= MAX_GROUP:
            raise ValueError(f"group_size must be a whole number from 1 to {MAX_GROUP}")
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
            bits, group = _grid_of(module, name, self.group_size)
            q, scales = group_quantize(weights[name], bits, group)  # = the layer's own grid
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
                base = tensors.get(name[: -len(SCALE if name.endswith(SCALE) else GROUP)])
                if base is None or base.dtype != torch.uint8:
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
            if (group.dtype != torch.int32 or group.numel() != 1
                    or not 1 <= int(group) <= MAX_GROUP):
                raise CheckpointError(f"{source}: {name + GROUP!r} must be one int32 from 1 "
                                      f"to {MAX_GROUP}; the file is damaged")
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
