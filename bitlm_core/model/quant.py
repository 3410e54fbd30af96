"""Group-wise integer quantization of weight matrices, shared by training and storage.

One grid for both sides: quantization-aware training (``train.qat``) computes every linear
layer with its weight rounded to this grid (:class:`QATLinear`), and a ``bits``-bit weight file
(the ``int4`` quantizer) stores exactly those rounded weights, so a QAT model loses nothing
more when it is stored.

The grid (symmetric, per group): each row of a ``(rows, cols)`` matrix is cut into groups of
``group_size`` consecutive columns (the last group may be shorter); a group ``w`` has scale
``s = max|w| / qmax`` with ``qmax = 2**(bits-1) - 1`` (7 for 4 bits), and its weights become
``q = round(w / s)``, integers in ``[-qmax, qmax]``. An all-zero group gets ``s = 1``.

:func:`fake_quantize` is the straight-through estimator: the forward pass sees the rounded
weights, the backward pass treats rounding as the identity (Bengio et al. 2013), so the float
weights keep learning.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def qmax(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be from 2 to 8, got {bits}")
    return 2 ** (bits - 1) - 1


def _grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """``w`` (rows, cols) as (rows, groups, group_size), zero-padded; and the padding."""
    if w.dim() != 2:
        raise ValueError(f"group quantization takes a matrix, got shape {tuple(w.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    rows, cols = w.shape
    group_size = min(group_size, max(cols, 1))  # a group past the row is the row: no padding
    pad = (-cols) % group_size
    if pad:
        w = F.pad(w, (0, pad))
    return w.reshape(rows, -1, group_size), pad


def _scales(x: torch.Tensor, limit: int, keepdim: bool = False) -> torch.Tensor:
    """The grid's step along the last dimension: ``max|x| / limit``, 1 where ``x`` is all 0."""
    scales = x.abs().amax(dim=-1, keepdim=keepdim) / limit
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def group_quantize(w: torch.Tensor, bits: int, group_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scales)``: ``q`` int8 of ``w``'s shape holding integers in ``[-qmax, qmax]``,
    ``scales`` float32 of shape ``(rows, ceil(cols / group_size))``."""
    limit = qmax(bits)
    g, pad = _grouped(w.detach().float(), group_size)
    scales = _scales(g, limit)
    q = torch.round(g / scales[..., None]).clamp_(-limit, limit).to(torch.int8)
    q = q.reshape(w.shape[0], -1)
    return (q[:, : w.shape[1]] if pad else q).contiguous(), scales.contiguous()


def group_dequantize(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Float32 weights from :func:`group_quantize`'s ``(q, scales)``."""
    g, pad = _grouped(q.float(), group_size)
    w = (g * scales.float()[..., None]).reshape(q.shape[0], -1)
    return w[:, : q.shape[1]] if pad else w


def rounded(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``w`` on the grid (float, ``w``'s dtype), with no gradient."""
    limit = qmax(bits)
    g, pad = _grouped(w.detach(), group_size)
    scales = _scales(g, limit, keepdim=True)
    out = (torch.round(g / scales).clamp_(-limit, limit) * scales).reshape(w.shape[0], -1)
    return out[:, : w.shape[1]] if pad else out


def fake_quantize(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``w`` rounded to the grid in the forward pass; the identity in the backward pass."""
    return w + (rounded(w, bits, group_size) - w).detach()


def fake_quantize_activations(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Activations rounded to ``bits``, symmetric, with one scale per position (over the last
    dimension); straight-through in the backward pass. Training only: no stored format runs
    its inputs this way (int8-dynamic rounds them with one scale per batch)."""
    limit = qmax(bits)
    scale = _scales(x.detach(), limit, keepdim=True)
    return x + (torch.round(x.detach() / scale).clamp_(-limit, limit) * scale - x).detach()


class QATLinear(nn.Linear):
    """An ``nn.Linear`` computed with fake-quantized weights (and optionally activations).

    Made by :func:`enable_qat`, which changes the class of existing layers in place: the
    parameters, their names and the optimizer's hold on them stay as they were."""

    qat_bits: int = 4
    qat_group_size: int = 32
    qat_activations: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qat_activations:
            x = fake_quantize_activations(x)
        return F.linear(x, fake_quantize(self.weight, self.qat_bits, self.qat_group_size),
                        self.bias)


def enable_qat(model: nn.Module, bits: int, group_size: int,
               activations: bool = False) -> int:
    """Train every ``nn.Linear`` of ``model`` on the grid from now on; returns how many."""
    qmax(bits)  # checks bits
    count = 0
    for module in model.modules():
        if type(module) in (nn.Linear, QATLinear):
            module.__class__ = QATLinear
            module.qat_bits, module.qat_group_size = bits, group_size
            module.qat_activations = activations
            count += 1
    return count


def disable_qat(model: nn.Module) -> int:
    """Every :class:`QATLinear` of ``model`` back to a plain ``nn.Linear``; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is QATLinear:
            module.__class__ = nn.Linear
            count += 1
    return count


def qat_for_step(model: nn.Module, qat, step: int) -> int:
    """Put ``model``'s linear layers in the mode ``train.qat`` (``qat``, or None) gives step
    ``step``: on the grid from ``qat.start_step`` on, plain before. Returns how many layers are
    on the grid. Training calls it for the step it is about to take; loading a run, and scoring
    it at the end, for the step its weights come from, so that all three compute alike."""
    if qat is None or step < qat.start_step:
        disable_qat(model)
        return 0
    return enable_qat(model, qat.bits, qat.group_size, qat.activations)


def effective_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with each :class:`QATLinear`'s weight as it computes with it
    (rounded to its grid): what a quantizer stores of a QAT-trained model."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, QATLinear):
            key = f"{name}.weight" if name else "weight"
            state[key] = rounded(module.weight, module.qat_bits, module.qat_group_size)
    return state


def qat_layers(model: nn.Module) -> list[str]:
    """Names of the layers :func:`enable_qat` made (the weights a 4-bit file rounds)."""
    return [name for name, m in model.named_modules() if isinstance(m, QATLinear)]


def linear_weights(model: nn.Module) -> list[str]:
    """State-dict names of the weights of ``model``'s linear layers."""
    return [f"{name}.weight" if name else "weight" for name, m in model.named_modules()
            if isinstance(m, nn.Linear)]
