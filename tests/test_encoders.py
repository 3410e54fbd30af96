import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitlm_core.bits import check_bits, repair_parity
from bitlm_core.builtins.encoders import Parity9Encoder, Raw8Encoder
from bitlm_core.errors import BitsError, ParityError
from bitlm_core.testing import check_encoder_contract


@pytest.mark.parametrize("encoder", [Parity9Encoder(), Raw8Encoder()], ids=["parity9", "raw8"])
def test_encoder_contract(encoder):
    check_encoder_contract(encoder, max_examples=300)


def test_parity9_layout_is_msb_first_then_even_parity():
    bits = Parity9Encoder().encode(b"A")  # 0x41 = 01000001: two ones -> parity 0
    assert bits.tolist() == [0, 1, 0, 0, 0, 0, 0, 1, 0]
    bits = Parity9Encoder().encode(b"C")  # 0x43 = 01000011: three ones -> parity 1
    assert bits.tolist() == [0, 1, 0, 0, 0, 0, 1, 1, 1]


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.data())
def test_parity_error_is_detected_and_repair_restores_the_bytes(data, draw):
    enc = Parity9Encoder()
    bits = enc.encode(data).clone()
    frame = draw.draw(st.integers(0, len(data) - 1))
    bits[frame * 9 + 8] ^= 1  # flip one parity bit
    with pytest.raises(ParityError, match=f"first at byte {frame}"):
        enc.decode(bits)
    assert enc.decode(bits, repair=True) == data


def test_flipped_data_bit_is_a_parity_error():
    bits = Parity9Encoder().encode(b"hello").clone()
    bits[3] ^= 1
    with pytest.raises(ParityError):
        Parity9Encoder().decode(bits)


def test_repair_counts_exactly():
    frames = Parity9Encoder().encode_np(b"abcdef").reshape(-1, 9).copy()
    frames[[1, 4], 8] ^= 1
    fixed, wrong = repair_parity(frames)
    assert wrong == 2
    assert Parity9Encoder().decode(torch.from_numpy(fixed.reshape(-1))) == b"abcdef"


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([0, 1, 2], dtype=torch.uint8), "only 0 and 1"),
    (torch.tensor([0, 1, 1], dtype=torch.int64), "dtype"),
    (torch.tensor([0.0, 1.0]), "dtype"),
    ([0, 1, 1], "tensor"),
    (np.array([0, 1], dtype=np.int32), "dtype"),
])
def test_check_bits_rejects_bad_input(bad, message):
    with pytest.raises(BitsError, match=message):
        check_bits(bad)


def test_check_bits_accepts_bool_and_numpy():
    assert check_bits(torch.tensor([True, False])).dtype == torch.uint8
    assert check_bits(np.array([1, 0], dtype=np.uint8)).tolist() == [1, 0]


def test_partial_frame_is_rejected_with_the_leftover_count():
    bits = Parity9Encoder().encode(b"ab")
    with pytest.raises(BitsError, match="5 bits left over"):
        Parity9Encoder().decode(bits[:-4])
