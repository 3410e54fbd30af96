"""The ``int8-rowwise`` weight format: a trained run's matrices stored as int8, ~4x smaller.

Scheme ``int8-rowwise`` (symmetric, one scale per output row): for every floating-point matrix
with at least :data:`MIN_ELEMENTS` entries (linear layers, embedding tables), each row ``w`` is
stored as ``q = round(w / s)`` in ``[-127, 127]`` with ``s = max|w| / 127``, and ``s`` is stored
beside it as ``<name>.qscale`` (float32). Vectors (biases, norms) and small matrices stay as they
are. Loading multiplies back (``q * s``, error at most ``s / 2`` per weight) and runs the float
model: the gain is storage and download size, not speed.

The checkpoint's ``model.safetensors`` says ``bitlm_weights: int8-rowwise`` in its metadata, and
:func:`bitlm_core.store.checkpoint.load_weights` dequantizes such files, so ``bitlm eval`` and
``bitlm sample`` read a quantized run like any other. There is no optimizer state: a quantized
run is for inference, not for more training. :func:`bitlm_core.app.quantize.quantize_run`
(``bitlm quantize``) writes such a run folder.
"""

from __future__ import annotations

from typing import Any

from bitlm_core.errors import CheckpointError

SCHEME = "int8-rowwise"
METADATA_KEY = "bitlm_weights"
SCALE_SUFFIX = ".qscale"
MIN_ELEMENTS = 1024  # smaller matrices are not worth a scale per row


def quantize_state(weights: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Float tensors by name -> (tensors to save, names of the matrices stored as int8)."""
    out: dict[str, Any] = {}
    quantized = []
    for name, w in weights.items():
        if name.endswith(SCALE_SUFFIX):
            raise CheckpointError(f"tensor {name!r} already looks quantized; quantize the "
                                  "original run, not a quantized one")
        if w.is_floating_point() and w.dim() == 2 and w.numel() >= MIN_ELEMENTS:
            out[name], out[name + SCALE_SUFFIX] = quantize_rows(w)
            quantized.append(name)
        else:
            out[name] = w.detach().contiguous().cpu()
    return out, quantized


def quantize_rows(w: Any) -> tuple[Any, Any]:
    """A float matrix -> (int8 ``q``, float32 ``scale`` per row) with ``q * scale`` within
    ``scale / 2`` of every weight."""
    import torch

    w32 = w.detach().float().cpu()
    scale = w32.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(w32 / scale[:, None]).clamp_(-127, 127).to(torch.int8),
            scale.contiguous())


def dequantize_state(tensors: dict[str, Any], source: str) -> dict[str, Any]:
    """Tensors of an ``int8-rowwise`` file -> float32 tensors under the model's names."""
    import torch

    out = {}
    scales = {n[: -len(SCALE_SUFFIX)]: t for n, t in tensors.items() if n.endswith(SCALE_SUFFIX)}
    for name, t in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            base = tensors.get(name[: -len(SCALE_SUFFIX)])
            if base is None or base.dtype != torch.int8:
                raise CheckpointError(f"{source}: scale {name!r} has no int8 matrix beside it")
            if t.dtype != torch.float32 or not torch.isfinite(t).all():
                raise CheckpointError(f"{source}: scale {name!r} is not finite float32 "
                                      f"({str(t.dtype)[6:]}); the file is damaged or not "
                                      "written by bitlm")
            continue
        if t.dtype != torch.int8:
            out[name] = t
            continue
        scale = scales.get(name)
        if scale is None or scale.dim() != 1 or t.dim() != 2 or scale.numel() != t.shape[0]:
            raise CheckpointError(f"{source}: int8 tensor {name!r} has no matching row scales "
                                  f"({name + SCALE_SUFFIX}); the file is damaged")
        out[name] = t.float() * scale.float()[:, None]
    return out
