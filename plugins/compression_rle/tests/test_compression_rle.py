"""Tests of the ``rle`` codec: the shared codec contract, then format-specific behaviour."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from bitlm_core.errors import BitsError, CodecError
from bitlm_core.testing import check_codec_contract, check_hostile_streams
from bitlm_compression_rle.codec import (MAGIC, RunLengthCodec, compress, compress_batch,
                                         decompress, decompress_batch, stats)
from bitlm_compression_rle.varint import (decode_varints, encode_varint, encode_varints,
                                          read_varint)

ENGLISH = ("It is a truth universally acknowledged, that a single man in possession of a good "
           "fortune, must be in want of a wife. However little known the feelings or views of "
           "such a man may be on his first entering a neighbourhood, this truth is so well "
           "fixed in the minds of the surrounding families.").encode()


def bits(*values: int, dtype=torch.uint8) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def stream(flags: int, *fields: bytes, crc: bool = False) -> bytes:
    """Hand-build an rle stream (flags without the CRC bit unless crc=True)."""
    body = MAGIC + bytes([1, flags | (0x04 if crc else 0)]) + b"".join(fields)
    return body + struct.pack("<I", zlib.crc32(body)) if crc else body


def v(*values: int) -> bytes:
    return b"".join(encode_varint(x) for x in values)


# -- the contract shared by every codec ---------------------------------------------------

def test_contract_with_checksum():
    report = check_codec_contract(RunLengthCodec(), max_examples=1000, batch_examples=200,
                                  strict_corruption=True)
    assert report["round_trips"] >= 1000
    assert report["batch_round_trips"] >= 200
    assert report["codec_errors"] == report["decodes"]  # the CRC catches every corruption


def test_mutated_streams_signed_again_reach_the_parser_safely():
    import struct
    import zlib

    def resign(stream: bytes) -> bytes:  # the trailer: zlib.crc32 of what comes before it
        return stream[:-4] + struct.pack("<I", zlib.crc32(stream[:-4]))

    counts = check_hostile_streams(RunLengthCodec(), random_streams=20, resign=resign)
    assert counts["decodes"] > counts["codec_errors"] > 0  # some re-signed ones decode


def test_contract_without_checksum():
    # Without the CRC some corruptions decode to other valid bits; they must still be safe.
    report = check_codec_contract(RunLengthCodec(checksum=False), max_examples=100, fuzz=False)
    assert report["round_trips"] >= 100
    counts = check_hostile_streams(RunLengthCodec(checksum=False), random_streams=50)
    assert counts["codec_errors"] > 0.9 * counts["decodes"]


# -- the byte format ----------------------------------------------------------------------

@pytest.mark.parametrize("values, expected", [
    ([], "42524c45 0100 00 00 00"),
    ([0], "42524c45 0100 01 00 01 00"),
    ([1, 1, 1], "42524c45 0100 01 80 03 02"),
    ([0, 0, 1, 1, 1, 0], "42524c45 0100 03 00 06 01 02 00"),
    ([1] * 300, "42524c45 0100 01 80 ac02 ab02"),
])
def test_known_encodings(values, expected):
    data = compress(torch.tensor(values, dtype=torch.uint8), checksum=False)
    assert data.hex() == expected.replace(" ", "")
    with_crc = compress(torch.tensor(values, dtype=torch.uint8))
    assert with_crc[5] == 0x04 and with_crc[6:-4] == data[6:]
    assert struct.unpack("<I", with_crc[-4:])[0] == zlib.crc32(with_crc[:-4])


def test_known_batch_encoding():
    rows = [bits(1, 1, 0), bits(), bits(0, 0), bits(0, 1)]
    data = compress_batch(rows, checksum=False)
    # flags batch, 4 rows, 5 runs, firsts 1,0,0,0 -> 0x80, lengths 3 0 2 2, runs-1 1 0 1 0 0
    assert data.hex() == "42524c45" "0102" "04" "05" "80" "03000202" "0100010000"
    assert [r.tolist() for r in decompress_batch(data)] == [[1, 1, 0], [], [0, 0], [0, 1]]


def test_dtype_is_preserved_and_bool_input_is_not_copied():
    x = torch.tensor([1, 0, 0, 1], dtype=torch.bool)
    out = decompress(compress(x))
    assert out.dtype == torch.bool and torch.equal(out, x)
    assert decompress(compress(x.to(torch.uint8))).dtype == torch.uint8
    assert compress(x)[5] & 0x01 and not compress(x.to(torch.uint8))[5] & 0x01


def test_numpy_input_and_2d_batch():
    a = np.array([0, 1, 1, 0, 0], np.uint8)
    assert decompress(compress(a)).tolist() == a.tolist()
    square = torch.tensor([[0, 0, 1], [1, 1, 1]], dtype=torch.uint8)
    assert [r.tolist() for r in decompress_batch(compress_batch(square))] == square.tolist()
    # the 2-D tensor and the list of its rows give the same stream
    assert compress_batch(square) == compress_batch(list(square))


def test_bad_input_is_rejected():
    with pytest.raises(BitsError):
        compress(torch.tensor([0, 2], dtype=torch.uint8))
    with pytest.raises(BitsError):
        compress(torch.tensor([0.0, 1.0]))
    with pytest.raises(CodecError, match="compress_batch"):
        compress(torch.zeros(2, 2, dtype=torch.uint8))
    with pytest.raises(CodecError, match="mix"):
        compress_batch([bits(0), bits(1, dtype=torch.bool)])
    with pytest.raises(CodecError, match="1-D"):
        compress_batch([torch.zeros(2, 2, dtype=torch.uint8)])


# -- varints ------------------------------------------------------------------------------

@pytest.mark.parametrize("value, hexed", [
    (0, "00"), (1, "01"), (127, "7f"), (128, "8001"), (300, "ac02"), (16383, "ff7f"),
    (16384, "808001"), (2**63 - 1, "ffffffffffffffff7f"),
])
def test_varint_edges(value, hexed):
    assert encode_varint(value).hex() == hexed
    buf = np.frombuffer(bytes.fromhex(hexed), np.uint8)
    assert int(decode_varints(buf, 1)[0]) == value
    assert read_varint(buf, 0, "x") == (value, len(buf))


def test_varints_vectorised_round_trip():
    rng = np.random.default_rng(0)
    for top in (2, 128, 1 << 14, 1 << 35, 2**63 - 1):
        values = rng.integers(0, top, 5000, dtype=np.uint64)
        assert np.array_equal(decode_varints(encode_varints(values), values.size), values)


@pytest.mark.parametrize("hexed, count, message", [
    ("8000", 1, "shortest form"),          # 0 written in two bytes
    ("ff" * 9 + "01", 1, "at most 9"),     # a 10-byte varint
    ("8080", 1, "truncated"),              # ends inside a value
    ("0102", 3, "declares 3"),             # fewer values than declared
    ("010203", 2, "declares 2"),           # more values than declared
    ("01", 0, "trailing"),
])
def test_bad_varints(hexed, count, message):
    with pytest.raises(CodecError, match=message):
        decode_varints(np.frombuffer(bytes.fromhex(hexed), np.uint8), count)


def test_too_large_to_encode():
    with pytest.raises(CodecError, match="cannot be written"):
        encode_varints(np.array([2**63], dtype=np.uint64))


# -- hostile streams ----------------------------------------------------------------------

def test_decompression_bomb_is_refused_before_allocating():
    # 2**40 bits in one run: 8 bytes of stream that would need a terabyte of output.
    bomb = stream(0, v(1), b"\x00", v(2**40), v(2**40 - 1))
    with pytest.raises(CodecError, match="max_bits"):
        decompress(bomb)
    with pytest.raises(CodecError, match="max_bits"):
        RunLengthCodec(max_bits=1000).decompress(stream(0, v(1), b"\x00", v(1001), v(1000)))
    assert RunLengthCodec(max_bits=1000).decompress(
        stream(0, v(1), b"\x00", v(1000), v(999))).numel() == 1000


def test_runs_must_add_up_to_the_declared_bits():
    # declares 10 bits but its run says 2**40: refused without expanding the run
    with pytest.raises(CodecError, match="run of"):
        decompress(stream(0, v(1), b"\x00", v(10), v(2**40)))
    with pytest.raises(CodecError, match="add up"):
        decompress(stream(0, v(2), b"\x00", v(10), v(3, 3)))
    with pytest.raises(CodecError, match="at least one bit"):
        decompress(stream(0, v(5), b"\x00", v(3), v(0, 0, 0, 0, 0)))
    # many huge runs whose int64 sum would overflow
    with pytest.raises(CodecError):
        decompress(stream(0, v(4), b"\x00", v(2**61), v(*[2**61 - 1] * 4)), max_bits=2**62)


def test_counts_beyond_the_stream_are_refused():
    with pytest.raises(CodecError, match="need at"):
        decompress(stream(0, v(2**50), b"\x00", v(3), v(2)))
    with pytest.raises(CodecError, match="need at"):
        decompress_batch(stream(0x02, v(2**60), v(0)))


def test_structural_corruption_is_named():
    with pytest.raises(CodecError, match="magic"):
        decompress(b"BPAK" + bytes(10))
    with pytest.raises(CodecError, match="version"):
        decompress(MAGIC + b"\x02\x00\x01\x00\x01\x00")
    with pytest.raises(CodecError, match="unknown flag"):
        decompress(MAGIC + b"\x01\x80\x01\x00\x01\x00")
    with pytest.raises(CodecError, match="decompress_batch"):
        decompress(compress_batch([bits(1)]))
    with pytest.raises(CodecError, match="use decompress"):
        decompress_batch(compress(bits(1)))
    with pytest.raises(CodecError, match="padding"):
        decompress(stream(0, v(1), b"\x01", v(1), v(0)))
    with pytest.raises(CodecError, match="empty row"):
        decompress_batch(stream(0x02, v(2), v(1), b"\x80", v(0, 1), v(0)))
    with pytest.raises(CodecError, match="crosses a row"):
        decompress_batch(stream(0x02, v(2), v(1), b"\x00", v(1, 1), v(1)))
    with pytest.raises(CodecError, match="checksum"):
        data = bytearray(compress(bits(0, 0, 1)))
        data[6 + 1] ^= 0x80  # flip the first bit: structurally valid, caught by the CRC
        decompress(bytes(data))
    with pytest.raises(CodecError, match="bytes"):
        decompress("not bytes")  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="max_bits"):
        decompress(compress(bits(1)), max_bits=-1)


def test_every_valid_stream_is_canonical():
    # re-encoding whatever a mutated stream decodes to gives back exactly that stream
    rng = np.random.default_rng(3)
    data = compress(torch.from_numpy((rng.random(500) < 0.1).astype(np.uint8)),
                    checksum=False)
    for i in range(6, len(data)):
        for b in range(8):
            mutated = bytearray(data)
            mutated[i] ^= 1 << b
            try:
                out = decompress(bytes(mutated))
            except CodecError:
                continue
            assert compress(out, checksum=False) == bytes(mutated)


# -- ratios -------------------------------------------------------------------------------

def test_sparse_bits_compress_at_least_5x():
    rng = np.random.default_rng(0)
    sparse = torch.from_numpy((rng.random(1 << 20) < 0.01).astype(np.uint8))
    s = stats(sparse)
    assert s["ratio"] >= 5.0 and not s["expands"]
    assert s["input_bits"] == 1 << 20 and s["output_bits"] == 8 * len(compress(sparse))


def test_text_bits_expand_and_stats_say_so():
    from bitlm_core.bits import bytes_to_frames

    text_bits = torch.from_numpy(bytes_to_frames(ENGLISH * 20).reshape(-1))
    s = RunLengthCodec().stats(text_bits)
    assert s["expands"] and s["ratio"] < 0.5
    assert 0.4 < s["runs_per_bit"] < 0.6


# -- plugin wiring ------------------------------------------------------------------------

def test_registry_finds_rle_and_binds_options():
    from bitlm_core.errors import ResolutionError
    from bitlm_core.registry import get_registry

    registry = get_registry(refresh=True)
    record = registry.resolve("compressor", "rle")
    assert record.factory is RunLengthCodec
    assert record.distribution == "bitlm-compression-rle"
    codec = registry.build("compressor", "rle", {"checksum": False, "max_bits": 64})
    assert codec.checksum is False and codec.max_bits == 64
    with pytest.raises(ResolutionError, match="max_bits"):
        registry.bind(record, {"max_bit": 3})
