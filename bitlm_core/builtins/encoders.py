"""Built-in encoders: ``parity9`` (8 data bits MSB first + even parity) and ``raw8``."""

from __future__ import annotations

import numpy as np

from bitlm_core.bits import (bytes_to_frames, frames_to_bytes, parity_errors, repair_parity,
                             split_frames)
from bitlm_core.errors import ParityError


class Parity9Encoder:
    """Each byte becomes 9 bits: its 8 bits, most significant first, then an even-parity bit.

    ``decode`` raises :class:`ParityError` on a frame whose parity is wrong, unless
    ``repair=True``, in which case parity bits are recomputed and the data bits kept.
    """

    name = "parity9"
    frame_bits = 9
    has_parity = True

    def encode_np(self, data: bytes) -> np.ndarray:
        return bytes_to_frames(data, parity=True).reshape(-1)

    def encode(self, data: bytes):
        import torch

        return torch.from_numpy(self.encode_np(data))

    def decode(self, bits, repair: bool = False) -> bytes:
        frames = split_frames(bits, self.frame_bits)
        if repair:
            frames, _ = repair_parity(frames)
        else:
            bad = parity_errors(frames)
            if bad.size:
                raise ParityError(
                    f"parity error in {bad.size} of {len(frames)} frames (first at byte "
                    f"{int(bad[0])}); pass repair=True to recompute parity bits from data bits"
                )
        return frames_to_bytes(frames)

    def enforce(self, frames: np.ndarray) -> tuple[np.ndarray, int]:
        """Make every frame parity-valid; return the frames and how many were corrected."""
        return repair_parity(frames)


class Raw8Encoder:
    """Each byte becomes its 8 bits, most significant first. No redundancy, nothing to check."""

    name = "raw8"
    frame_bits = 8
    has_parity = False

    def encode_np(self, data: bytes) -> np.ndarray:
        return bytes_to_frames(data, parity=False).reshape(-1)

    def encode(self, data: bytes):
        import torch

        return torch.from_numpy(self.encode_np(data))

    def decode(self, bits, repair: bool = False) -> bytes:
        return frames_to_bytes(split_frames(bits, self.frame_bits))

    def enforce(self, frames: np.ndarray) -> tuple[np.ndarray, int]:
        return frames, 0
