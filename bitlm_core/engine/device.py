"""Where a run computes: ``train.device`` resolved and checked, ``train.precision`` checked
against it, and the gradient scaler of fp16.

Every message names the key at fault, what this machine's torch has, and what to do. The code
that only a GPU takes is what this module and ``torch.autocast`` hold; the rest of bitlm moves
tensors with ``.to(device)`` and reads a model's device from its parameters.
"""

from __future__ import annotations

import warnings
from typing import Any

from bitlm_core.errors import SpecError

CUDA_INSTALL = ("install a CUDA build of torch into the environment first, e.g. `pip install "
                "torch --index-url https://download.pytorch.org/whl/cu126` (pick the CUDA "
                "version your driver supports on https://pytorch.org/get-started/locally/)")


class PrecisionWarning(UserWarning):
    """A precision that works on a device but is not what it is good at."""


def _has_mps(torch) -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def found(torch=None) -> str:
    """What this torch can compute on, in words (for messages)."""
    if torch is None:
        import torch
    cuda = torch.version.cuda
    parts = [f"torch {torch.__version__}"]
    if cuda is None:
        parts.append("built without CUDA")
    else:
        parts.append(f"built for CUDA {cuda}, {torch.cuda.device_count()} GPU(s) visible")
    parts.append("MPS available" if _has_mps(torch) else "no MPS")
    return ", ".join(parts)


def resolve_device(name: str, key: str = "train.device"):
    """The ``torch.device`` that ``name`` means here (``auto``: cuda if available, else mps,
    else cpu), or a SpecError naming ``key`` when this machine does not have it."""
    import torch

    shown = repr(name) if len(name) <= 40 else repr(name[:40]) + "..."  # bounded: it is input
    instead = f"{key} cpu" if key.startswith("--") else f"{key}: cpu"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _has_mps(torch) else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SpecError(f"{key}: {shown} is not a device; use auto, cpu, cuda, cuda:N or "
                        "mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecError(f"{key}: {name} asked for, and this machine has no usable CUDA "
                            f"({found(torch)}). To use a GPU, {CUDA_INSTALL}; else give "
                            f"{instead} (or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise SpecError(f"{key}: {name} asked for, and {count} GPU(s) are visible "
                            f"(cuda:0 to cuda:{count - 1})")
    elif device.type == "mps" and not _has_mps(torch):
        raise SpecError(f"{key}: mps asked for, and this machine has no MPS ({found(torch)}); "
                        "MPS is Apple silicon's GPU: use cpu or auto elsewhere")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise SpecError(f"{key}: {shown} is not a device bitlm runs on; use auto, cpu, cuda, "
                        "cuda:N or mps")
    return device


def check_precision(precision: str, device, key: str = "train.precision") -> None:
    """Refuse a precision the device cannot compute (bf16 on a GPU without it) and warn for
    one it computes badly (fp16 on the CPU: slower than fp32, and it needs a gradient scaler
    there too; bf16 is the CPU's half precision)."""
    import torch

    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SpecError(f"{key}: bf16 asked for, and {torch.cuda.get_device_name(device)} has "
                        "no bfloat16; use fp16 (with its gradient scaler) or fp32")
    if precision == "fp16" and device.type == "cpu":
        warnings.warn(f"{key}: fp16 on the CPU is emulated and slower than fp32, and needs a "
                      "gradient scaler; it is meant for GPUs. Use bf16 or fp32 on the CPU",
                      PrecisionWarning, stacklevel=2)


def grad_scaler(device, precision: str):
    """fp16's gradient scaler (loss scaled up before backward, gradients unscaled before
    clipping, steps with inf or NaN gradients skipped); a disabled one, which changes
    nothing, for the other precisions."""
    import torch

    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def model_device(model) -> Any:
    """The device of a model's parameters (cpu for a model without any)."""
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")
