"""Contract checks for encoders: exact byte <-> bit round trips, frame shape, parity."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings

from bitlm_core.errors import BitsError
from bitlm_core.testing.strategies import text_bytes

__all__ = ["check_encoder_roundtrip", "check_encoder_contract"]


def check_encoder_roundtrip(encoder, data: bytes) -> None:
    bits = encoder.encode(data)
    assert isinstance(bits, torch.Tensor) and bits.dtype == torch.uint8, bits.dtype
    assert bits.dim() == 1 and bits.numel() == len(data) * encoder.frame_bits
    assert bits.numel() == 0 or int(bits.max()) <= 1
    assert np.array_equal(encoder.encode_np(data), bits.numpy())
    assert encoder.decode(bits) == data
    assert encoder.decode(bits.bool()) == data


def check_encoder_contract(encoder, max_examples: int = 200) -> None:
    """Round trips over text and arbitrary bytes, and rejection of malformed bit tensors."""

    @settings(max_examples=max_examples, deadline=None)
    @given(text_bytes())
    def roundtrip(data):
        check_encoder_roundtrip(encoder, data)

    roundtrip()
    good = encoder.encode(b"ab")
    for bad, why in [(good[:-1], "partial frame"), (good.to(torch.int64), "wrong dtype"),
                     (good * 2, "values other than 0 and 1"), (good.view(1, -1), "2-D")]:
        try:
            encoder.decode(bad)
        except BitsError:
            continue
        raise AssertionError(f"{type(encoder).__name__}.decode accepted {why}")
