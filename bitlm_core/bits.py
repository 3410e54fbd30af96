"""Bit tensors: validation and the parity helpers shared by encoders, codecs and samplers.

Contract: a bit tensor is ``torch.uint8`` or ``torch.bool`` holding only 0 and 1, of shape
``(..., L)``. Anything else is rejected here, with a message naming the problem, before it can
reach a model or a codec. Byte <-> bit conversion is done with numpy (``np.unpackbits`` is
MSB-first, which is the order bitlm uses).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bitlm_core.errors import BitsError, ParityError


def check_bits(bits: Any, name: str = "bits"):
    """Return ``bits`` as a uint8 torch tensor, or raise BitsError saying what is wrong."""
    import torch

    if isinstance(bits, np.ndarray):
        if bits.dtype not in (np.uint8, np.bool_):
            raise BitsError(f"{name} must have dtype uint8 or bool, got numpy {bits.dtype}; "
                            "convert with .astype(np.uint8)")
        bits = torch.from_numpy(np.ascontiguousarray(bits))
    if not isinstance(bits, torch.Tensor):
        raise BitsError(f"{name} must be a torch.uint8 or torch.bool tensor, got "
                        f"{type(bits).__name__}")
    if bits.dtype == torch.bool:
        return bits.to(torch.uint8)
    if bits.dtype != torch.uint8:
        raise BitsError(f"{name} must have dtype torch.uint8 or torch.bool, got {bits.dtype}; "
                        "convert with .to(torch.uint8) after checking it holds only 0 and 1")
    if bits.numel() and int(bits.max()) > 1:
        bad = int((bits > 1).nonzero()[0][-1]) if bits.dim() else 0
        raise BitsError(f"{name} must hold only 0 and 1, found {int(bits.max())} "
                        f"(first bad value near index {bad})")
    return bits


def bytes_to_frames(data: bytes | np.ndarray, parity: bool = True) -> np.ndarray:
    """Bytes -> (N, 9) frames (8 data bits MSB first, then even parity) or (N, 8) without."""
    arr = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray,
                                                                     memoryview)) else data
    data_bits = np.unpackbits(arr.reshape(-1, 1), axis=1)
    if not parity:
        return data_bits
    frames = np.empty((arr.size, 9), dtype=np.uint8)
    frames[:, :8] = data_bits
    frames[:, 8] = data_bits.sum(axis=1, dtype=np.uint8) & 1
    return frames


def frames_to_bytes(frames: np.ndarray) -> bytes:
    """(N, >=8) frames -> bytes from their first 8 bits."""
    return np.packbits(frames[:, :8], axis=1).reshape(-1).tobytes()


def parity_errors(frames: np.ndarray) -> np.ndarray:
    """Indices of 9-bit frames whose parity bit is wrong."""
    return np.nonzero((frames.sum(axis=1) & 1) != 0)[0]


def repair_parity(frames: np.ndarray) -> tuple[np.ndarray, int]:
    """Recompute every parity bit from its data bits; return (frames, how many were wrong)."""
    frames = frames.copy()
    expected = frames[:, :8].sum(axis=1, dtype=np.uint8) & 1
    wrong = int((frames[:, 8] != expected).sum())
    frames[:, 8] = expected
    return frames, wrong


def split_frames(bits: Any, frame_bits: int, name: str = "bits") -> np.ndarray:
    """Validate a 1-D bit sequence and reshape it to (N, frame_bits) numpy frames."""
    t = check_bits(bits, name)
    if t.dim() != 1:
        raise BitsError(f"{name} must be one sequence of shape (L,), got shape "
                        f"{tuple(t.shape)}; decode each row separately")
    if t.numel() % frame_bits:
        raise BitsError(f"{name} has {t.numel()} bits, which is not a whole number of "
                        f"{frame_bits}-bit frames ({t.numel() % frame_bits} bits left over)")
    return t.cpu().numpy().reshape(-1, frame_bits)
