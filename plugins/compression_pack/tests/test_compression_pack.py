"""Tests of the ``pack`` codec: the shared codec contract, then format-specific behaviour."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from crc32c import crc32c

from bitlm_core.errors import BitsError, CodecError
from bitlm_core.testing import check_codec_contract
from bitlm_compression_pack import codec as codec_module
from bitlm_compression_pack.codec import (MAGIC, PackCodec, compress, compress_batch,
                                          decompress, decompress_batch, stats)


def bits(*values: int, dtype=torch.uint8) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def stream(flags: int, *fields: bytes, crc: bool = False, version: int = 2) -> bytes:
    """Hand-build a pack stream (flags without the CRC bit unless crc=True)."""
    body = MAGIC + bytes([version, flags | (0x04 if crc else 0)]) + b"".join(fields)
    if not crc:
        return body
    return body + struct.pack("<I", crc32c(body) if version == 2 else zlib.crc32(body))


def u64(*values: int) -> bytes:
    return b"".join(struct.pack("<Q", x) for x in values)


# -- the contract shared by every codec ---------------------------------------------------

def test_contract_with_checksum():
    report = check_codec_contract(PackCodec(), max_examples=1000, batch_examples=200,
                                  strict_corruption=True)
    assert report["round_trips"] >= 1000
    assert report["batch_round_trips"] >= 200
    assert report["codec_errors"] == report["decodes"]  # the CRC catches every corruption


def test_mutated_streams_signed_again_reach_the_parser_safely():
    from crc32c import crc32c

    from bitlm_core.testing import check_hostile_streams

    def resign(stream: bytes) -> bytes:  # version 2: CRC-32C of what comes before it
        return stream[:-4] + struct.pack("<I", crc32c(stream[:-4]))

    counts = check_hostile_streams(PackCodec(), random_streams=20, resign=resign)
    assert counts["decodes"] > counts["codec_errors"] > 0  # some re-signed ones decode


def test_contract_without_checksum():
    report = check_codec_contract(PackCodec(checksum=False), max_examples=100)
    assert report["round_trips"] >= 100
    assert report["codec_errors"] < report["decodes"]  # payload flips decode silently


# -- the byte format ----------------------------------------------------------------------

@pytest.mark.parametrize("values, expected", [
    ([], "4250414b 0200 0000000000000000"),
    ([1], "4250414b 0200 0100000000000000 80"),
    ([1, 0, 1, 1, 0, 0, 1, 0, 1], "4250414b 0200 0900000000000000 b2 80"),
])
def test_known_encodings(values, expected):
    data = compress(torch.tensor(values, dtype=torch.uint8), checksum=False)
    assert data.hex() == expected.replace(" ", "")
    with_crc = compress(torch.tensor(values, dtype=torch.uint8))
    assert with_crc[5] == 0x04 and with_crc[6:-4] == data[6:]
    assert struct.unpack("<I", with_crc[-4:])[0] == crc32c(with_crc[:-4])


def test_checksum_is_crc32c():
    assert crc32c(b"123456789") == 0xE3069283  # the published CRC-32C check value


def test_version_1_streams_with_zlib_crc32_still_decode():
    old = stream(0, u64(9), b"\xb2\x80", crc=True, version=1)
    assert decompress(old).tolist() == [1, 0, 1, 1, 0, 0, 1, 0, 1]
    corrupted = bytearray(old)
    corrupted[14] ^= 0x01
    with pytest.raises(CodecError, match="checksum"):
        decompress(bytes(corrupted))
    v2_body = MAGIC + bytes([2, 0x04]) + u64(9) + b"\xb2\x80"
    with pytest.raises(CodecError, match="checksum"):  # a v2 stream is not checked with CRC-32
        decompress(v2_body + struct.pack("<I", zlib.crc32(v2_body)))
    assert decompress(v2_body + struct.pack("<I", crc32c(v2_body))).tolist() == [
        1, 0, 1, 1, 0, 0, 1, 0, 1]


def test_payload_is_numpy_packbits():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, 1001, dtype=np.uint8)
    data = compress(torch.from_numpy(a))
    assert data[14:-4] == np.packbits(a).tobytes()


def test_known_batch_encoding():
    rows = [bits(1, 1, 0), bits(), bits(0, 1)]
    data = compress_batch(rows, checksum=False)
    # 3 rows of 3, 0, 2 bits; payload 11001 -> 0b11001000
    assert data == stream(0x02, u64(3), u64(3, 0, 2), b"\xc8")
    assert [r.tolist() for r in decompress_batch(data)] == [[1, 1, 0], [], [0, 1]]


def test_dtype_is_preserved():
    x = torch.tensor([1, 0, 0, 1], dtype=torch.bool)
    out = decompress(compress(x))
    assert out.dtype == torch.bool and torch.equal(out, x)
    assert decompress(compress(x.to(torch.uint8))).dtype == torch.uint8


def test_numpy_input_and_2d_batch():
    a = np.array([0, 1, 1, 0, 0], np.uint8)
    assert decompress(compress(a)).tolist() == a.tolist()
    square = torch.tensor([[0, 0, 1], [1, 1, 1]], dtype=torch.uint8)
    assert [r.tolist() for r in decompress_batch(compress_batch(square))] == square.tolist()
    assert compress_batch(square) == compress_batch(list(square))


def test_bad_input_is_rejected():
    with pytest.raises(BitsError):
        compress(torch.tensor([0, 2], dtype=torch.uint8))
    with pytest.raises(BitsError):
        compress(np.array([0, 1], dtype=np.int64))
    with pytest.raises(CodecError, match="compress_batch"):
        compress(torch.zeros(2, 2, dtype=torch.uint8))
    with pytest.raises(CodecError, match="mix"):
        compress_batch([bits(0), bits(1, dtype=torch.bool)])


@pytest.fixture
def parallel_check(monkeypatch):
    """Make the second-core value check run on small inputs, whatever this machine has."""
    monkeypatch.setattr(codec_module, "PARALLEL_CHECK_BITS", 64)
    monkeypatch.setattr(codec_module, "_usable_cores", lambda: 2)


def test_value_check_on_a_second_core(parallel_check, monkeypatch):
    import threading

    checked_on = []
    real = codec_module._max_value

    def recording(cat):
        checked_on.append(threading.current_thread().name)
        return real(cat)

    monkeypatch.setattr(codec_module, "_max_value", recording)
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2, 1000, dtype=np.uint8)
    data = compress(torch.from_numpy(a))
    assert data[14:-4] == np.packbits(a).tobytes()
    assert decompress(data).tolist() == a.tolist()
    a[-1] = 2  # found by the worker thread, after the main thread has packed
    with pytest.raises(BitsError):
        compress(torch.from_numpy(a))
    assert len(checked_on) == 2 and all(n.startswith("bitlm-pack-check") for n in checked_on)
    compress(torch.from_numpy(a[:63] % 2))  # under PARALLEL_CHECK_BITS: checked in line
    assert len(checked_on) == 2


def test_value_check_falls_back_in_line_when_no_worker_can_take_it(parallel_check,
                                                                    monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    gone = ThreadPoolExecutor(1)
    gone.shutdown()  # as at interpreter shutdown: submit raises RuntimeError
    monkeypatch.setattr(codec_module, "_checker", gone)
    assert decompress(compress(bits(*[1, 0] * 50))).tolist() == [1, 0] * 50
    with pytest.raises(BitsError):
        compress(torch.tensor([0, 1] * 50 + [2], dtype=torch.uint8))


def test_a_forked_child_starts_its_own_checker(parallel_check):
    import multiprocessing

    compress(bits(*[1] * 100))  # the parent's worker thread exists now
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_compress_and_check)
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("compress hung in a forked child (it waited for the parent's thread)")
    assert child.exitcode == 0


def _compress_and_check() -> None:
    data = compress(bits(*[1, 0] * 50))
    raise SystemExit(0 if decompress(data).tolist() == [1, 0] * 50 else 1)


# -- hostile streams ----------------------------------------------------------------------

def test_decompression_bomb_is_refused_before_allocating():
    with pytest.raises(CodecError, match="max_bits"):
        decompress(stream(0, u64(2**63)))
    with pytest.raises(CodecError, match="max_bits"):
        PackCodec(max_bits=8).decompress(stream(0, u64(9), b"\x00\x00"))
    assert PackCodec(max_bits=8).decompress(stream(0, u64(8), b"\xff")).tolist() == [1] * 8
    # rows whose uint64 sum would overflow
    with pytest.raises(CodecError, match="max_bits"):
        decompress_batch(stream(0x02, u64(2), u64(2**63, 2**63)), max_bits=2**62)


def test_counts_beyond_the_stream_are_refused():
    with pytest.raises(CodecError, match="rows"):
        decompress_batch(stream(0x02, u64(2**61)))
    with pytest.raises(CodecError, match="take 2 bytes"):
        decompress(stream(0, u64(9), b"\x00"))
    with pytest.raises(CodecError, match="take 1 bytes"):
        decompress(stream(0, u64(8), b"\x00\x00"))


def test_structural_corruption_is_named():
    with pytest.raises(CodecError, match="magic"):
        decompress(b"BRLE" + bytes(12))
    with pytest.raises(CodecError, match="version"):
        decompress(MAGIC + b"\x07\x00" + u64(0))
    with pytest.raises(CodecError, match="unknown flag"):
        decompress(MAGIC + b"\x02\x10" + u64(0))
    with pytest.raises(CodecError, match="truncated"):
        decompress(MAGIC + b"\x02\x04" + u64(0))  # says CRC, has none
    with pytest.raises(CodecError, match="decompress_batch"):
        decompress(compress_batch([bits(1)]))
    with pytest.raises(CodecError, match="use decompress"):
        decompress_batch(compress(bits(1)))
    with pytest.raises(CodecError, match="padding"):
        decompress(stream(0, u64(1), b"\x81"))
    with pytest.raises(CodecError, match="checksum"):
        data = bytearray(compress(bits(0, 0, 1)))
        data[14] ^= 0x80  # a payload bit: only the CRC can tell
        decompress(bytes(data))
    with pytest.raises(CodecError, match="bytes"):
        decompress([1, 2, 3])  # type: ignore[arg-type]


# -- ratios -------------------------------------------------------------------------------

def test_ratios_are_honest():
    # pack stores bits as bits: the ratio is just under 1 (the header), whatever the content;
    # what it saves is the 8x of a one-byte-per-bit tensor.
    rng = np.random.default_rng(0)
    for a in (rng.integers(0, 2, 1 << 16, dtype=np.uint8), np.zeros(1 << 16, np.uint8)):
        s = stats(torch.from_numpy(a))
        assert 0.99 < s["ratio"] < 1.0 and s["expands"]
        assert 7.9 < s["storage_ratio"] < 8.0
    assert s["output_bits"] == 8 * (14 + (1 << 13) + 4)
    assert PackCodec(checksum=False).stats(bits(1))["output_bits"] == 8 * 15


# -- plugin wiring ------------------------------------------------------------------------

def test_registry_finds_pack_and_binds_options():
    from bitlm_core.registry import get_registry

    registry = get_registry(refresh=True)
    record = registry.resolve("compressor", "pack")
    assert record.factory is PackCodec
    assert record.distribution == "bitlm-compression-pack"
    codec = registry.build("compressor", "pack", {"checksum": False})
    assert codec.checksum is False
    assert codec.decompress(compress(bits(1, 0))).tolist() == [1, 0]  # reads CRC streams too
