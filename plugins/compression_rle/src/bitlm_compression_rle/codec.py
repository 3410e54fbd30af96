"""The ``rle`` codec: bit streams as run lengths, written as LEB128 varints.

Byte format (all multi-byte integers are varints, see :mod:`bitlm_compression_rle.varint`,
except the CRC which is 4 bytes little-endian)::

    magic    4 bytes  b"BRLE"
    version  1 byte   1
    flags    1 byte   bit 0: decoded tensors are torch.bool (else torch.uint8)
                      bit 1: batch stream (several rows)
                      bit 2: a CRC32 trailer ends the stream; bits 3-7 must be 0
    n_rows   varint   number of sequences (batch streams only; a single stream has one row)
    n_runs   varint   number of runs over all rows
    firsts   ceil(n_rows / 8) bytes: the first bit of every row, packed 8 per byte, most
                      significant bit first (numpy.packbits order); padding bits and the
                      first bit of an empty row are 0
    lengths  n_rows varints: bits in each row
    runs     n_runs varints: each run length minus 1 (a run is at least 1 bit long)
    crc32    4 bytes  zlib.crc32 of every byte before it, little-endian (only if flag bit 2)

Runs alternate 0/1 inside a row starting from the row's first bit, and never cross a row
boundary. Every input has exactly one encoding and the decoder accepts only that encoding.

Decoding is safe on hostile input: every declared size is checked against the bytes present
and against ``max_bits`` *before* anything proportional to it is allocated; the output is
allocated once, of exactly the declared bit count; all work is vectorised numpy, so nothing
loops per run or per bit and nothing can hang. Any problem raises :class:`CodecError`.

The checksum is on by default (``RunLengthCodec(checksum=True)``): the structure alone catches
most corruption (counts, sums and row boundaries must agree), but not all of it: a flipped
first-bit flag would invert a whole row, and two run lengths could change in compensating
ways. It is cheap here because rle streams are small next to the work of finding runs.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np

from bitlm_core.codecs import (DEFAULT_MAX_BITS, StreamCodec, check_limit,
                               checked_total, one_row, ragged_rows, to_tensor)
from bitlm_core.errors import CodecError
from bitlm_compression_rle.varint import (MAX_VARINT_BYTES, decode_varints, encode_varint,
                                          encode_varints, read_varint)

MAGIC = b"BRLE"
VERSION = 1
FLAG_BOOL = 0x01
FLAG_BATCH = 0x02
FLAG_CRC = 0x04
KNOWN_FLAGS = FLAG_BOOL | FLAG_BATCH | FLAG_CRC
PREFIX_SIZE = 6  # magic + version + flags
CRC = struct.Struct("<I")

__all__ = ["RunLengthCodec", "compress", "decompress", "compress_batch", "decompress_batch",
           "run_lengths", "stats", "DEFAULT_MAX_BITS", "MAGIC", "VERSION"]


def run_lengths(cat: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximal runs of ``cat`` that never cross a row boundary -> (run lengths, row firsts)."""
    total = cat.size
    starts = np.cumsum(lengths) - lengths
    nonempty = lengths > 0
    firsts = np.zeros(lengths.size, dtype=np.uint8)
    if total == 0:
        return np.empty(0, dtype=np.int64), firsts
    is_start = np.empty(total, dtype=bool)
    is_start[0] = True
    np.not_equal(cat[1:], cat[:-1], out=is_start[1:])
    is_start[starts[nonempty]] = True
    run_starts = np.flatnonzero(is_start)
    firsts[nonempty] = cat[starts[nonempty]]
    runs = np.empty(run_starts.size, dtype=np.int64)
    np.subtract(run_starts[1:], run_starts[:-1], out=runs[:-1])
    runs[-1] = total - run_starts[-1]
    return runs, firsts


def _encode(cat: np.ndarray, lengths: np.ndarray, is_bool: bool, batch: bool,
            checksum: bool) -> bytes:
    runs, firsts = run_lengths(cat, lengths)
    flags = ((FLAG_BOOL if is_bool else 0) | (FLAG_BATCH if batch else 0)
             | (FLAG_CRC if checksum else 0))
    header = MAGIC + bytes([VERSION, flags])
    if batch:
        header += encode_varint(lengths.size)
    header += encode_varint(runs.size)
    parts = [header, np.packbits(firsts).tobytes(), encode_varints(lengths).tobytes(),
             encode_varints(np.subtract(runs, 1, out=runs)).tobytes()]
    if not checksum:
        return b"".join(parts)
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    parts.append(CRC.pack(crc))
    return b"".join(parts)


# -- decoding -----------------------------------------------------------------------------

def _buffer(data: Any) -> np.ndarray:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"rle streams are bytes, got {type(data).__name__}")
    return np.frombuffer(data, dtype=np.uint8)




def _decode(data: Any, max_bits: Any, batch: bool) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validate and decode a stream -> (concatenated bits, row lengths, is_bool)."""
    limit = check_limit(max_bits)
    buf = _buffer(data)
    if buf.size < PREFIX_SIZE + 2:
        raise CodecError(f"rle stream truncated: {buf.size} bytes, the smallest stream has "
                         f"{PREFIX_SIZE + 2}")
    if buf[:4].tobytes() != MAGIC:
        raise CodecError(f"not an rle stream: magic {buf[:4].tobytes()!r}, expected {MAGIC!r}")
    version, flags = int(buf[4]), int(buf[5])
    if version != VERSION:
        raise CodecError(f"rle stream version {version} is not supported (this plugin reads "
                         f"version {VERSION}); upgrade bitlm-compression-rle")
    if flags & ~KNOWN_FLAGS:
        raise CodecError(f"rle stream has unknown flag bits {flags:#04x} (corrupted stream)")
    if bool(flags & FLAG_BATCH) != batch:
        raise CodecError("this rle stream holds a batch: use decompress_batch" if not batch
                         else "this rle stream holds one sequence: use decompress")
    body_end = buf.size - (CRC.size if flags & FLAG_CRC else 0)
    offset = PREFIX_SIZE
    n_rows = 1
    if batch:
        n_rows, offset = read_varint(buf[:body_end], offset, "the row count")
    n_runs, offset = read_varint(buf[:body_end], offset, "the run count")
    first_bytes = (n_rows + 7) // 8
    needed = first_bytes + n_rows + n_runs  # every varint takes at least one byte
    if needed > body_end - offset:
        raise CodecError(f"rle stream declares {n_rows} rows and {n_runs} runs, which need at "
                         f"least {needed} more bytes, but only {body_end - offset} remain "
                         "(stream truncated or corrupted)")
    firsts = np.unpackbits(buf[offset:offset + first_bytes], count=n_rows)
    if n_rows % 8 and buf[offset + first_bytes - 1] & ((1 << (8 - n_rows % 8)) - 1):
        raise CodecError("rle stream has non-zero padding bits after the first-bit flags "
                         "(corrupted stream)")
    body = buf[offset + first_bytes:body_end]
    split = _varints_end(body, n_rows, "rle row lengths")
    lengths = decode_varints(body[:split], n_rows, "rle row lengths")
    total = checked_total(lengths, limit, "rle")
    lengths = lengths.astype(np.int64)
    if np.any(firsts[lengths == 0]):
        raise CodecError("rle stream gives a first bit of 1 to an empty row (corrupted stream)")
    ends = _run_ends(decode_varints(body[split:], n_runs, "rle run lengths"), total)
    first, flips = _flips(ends, lengths, firsts)
    if flags & FLAG_CRC and CRC.unpack_from(buf, body_end)[0] != zlib.crc32(buf[:body_end]):
        raise CodecError("rle stream checksum mismatch: the stream is corrupted")
    return _expand(first, flips, total), lengths, bool(flags & FLAG_BOOL)


def _varints_end(body: np.ndarray, count: int, what: str) -> int:
    """Bytes taken by the first ``count`` varints of ``body`` (looking at most 9 per value)."""
    if count == 0:
        return 0
    last_bytes = np.flatnonzero(body[:MAX_VARINT_BYTES * count] < 0x80)
    if last_bytes.size < count:
        raise CodecError(f"{what}: fewer than {count} values present (stream truncated or "
                         "corrupted)")
    return int(last_bytes[count - 1]) + 1


def _run_ends(stored: np.ndarray, total: int) -> np.ndarray:
    """Stored run lengths (each minus one) -> where each run ends, checked against ``total``.

    Refuses, before any allocation of ``total`` size: more runs than bits, a run longer than
    the stream, and runs that do not add up to exactly ``total`` (overflow-safe).
    """
    count = stored.size
    if count > total:
        raise CodecError(f"rle stream has {count} runs for {total} bits; every run is at least "
                         "one bit (corrupted stream)")
    if count == 0:
        if total:
            raise CodecError(f"rle stream has no runs but its rows hold {total} bits "
                             "(corrupted stream)")
        return np.empty(0, dtype=np.int64)
    top = int(stored.max())
    if top >= total:
        raise CodecError(f"rle stream has a run of {top + 1} bits in a stream of {total} bits "
                         "(corrupted stream)")
    if count * (top + 1) >= 1 << 62 and float(stored.sum(dtype=np.float64)) + count > total + 1:
        raise CodecError(f"rle stream runs add up to more than the {total} bits its rows hold "
                         "(corrupted stream)")  # checked in float first: int64 could overflow
    ends = stored.astype(np.int64)
    ends += 1
    np.cumsum(ends, out=ends)
    if int(ends[-1]) != total:
        raise CodecError(f"rle stream runs add up to {int(ends[-1])} bits but its rows hold "
                         f"{total} (corrupted stream)")
    return ends


def _flips(ends: np.ndarray, lengths: np.ndarray, firsts: np.ndarray
           ) -> tuple[int, np.ndarray]:
    """(first bit, positions where the bit value changes) of the concatenated rows.

    Inside a row every run boundary flips the value. Between rows it flips only when the last
    bit of one row differs from the first bit of the next; rows must end on run boundaries.
    """
    nonempty = np.flatnonzero(lengths)
    if nonempty.size <= 1:
        return (int(firsts[nonempty[0]]) if nonempty.size else 0), ends[:-1]
    row_firsts = firsts[nonempty].astype(np.int64)
    row_ends = np.cumsum(lengths)[nonempty]
    last_run = np.searchsorted(ends, row_ends)  # the run that ends each non-empty row
    if not np.array_equal(ends[last_run], row_ends):
        raise CodecError("rle stream has a run that crosses a row boundary (corrupted stream)")
    runs_in_row = np.diff(last_run, prepend=-1)
    row_lasts = row_firsts ^ ((runs_in_row - 1) & 1)
    keep = np.ones(ends.size - 1, dtype=bool)
    keep[last_run[:-1]] = row_lasts[:-1] != row_firsts[1:]
    return int(row_firsts[0]), ends[:-1][keep]


# prefix XOR inside a byte (MSB first) and the parity of a byte, for _expand
_BYTES = np.arange(256, dtype=np.uint8)
_PARITY = (np.unpackbits(_BYTES[:, None], axis=1).sum(axis=1) & 1).astype(np.uint8)
_PREFIX_XOR = np.packbits(np.bitwise_xor.accumulate(np.unpackbits(_BYTES[:, None], axis=1),
                                                    axis=1), axis=1).reshape(-1)


def _expand(first: int, flips: np.ndarray, total: int) -> np.ndarray:
    """First bit and flip positions -> ``total`` bits (already checked against ``max_bits``)."""
    if total == 0:
        return np.empty(0, dtype=np.uint8)
    if flips.size * 16 < total:  # long runs: one np.repeat of alternating values is fastest
        bounds = np.concatenate(([0], flips, [total]))
        values = ((np.arange(flips.size + 1) + first) & 1).astype(np.uint8)
        return np.repeat(values, np.diff(bounds))
    # Short runs: mark the flips, then take a running XOR of the marks. The XOR runs on
    # packed bytes: a table gives the XOR prefix inside each byte, and a cumulative sum of
    # byte parities carries it from byte to byte (8x less work than a running sum of bits).
    marks = np.zeros(total, dtype=np.uint8)
    marks[flips] = 1
    marks[0] ^= first
    packed = np.packbits(marks)
    carry = np.cumsum(_PARITY[packed], dtype=np.uint8)  # wraps mod 256: the parity survives
    carry[1:] = carry[:-1]
    carry[0] = 0
    carry &= 1
    packed = _PREFIX_XOR[packed] ^ (carry * np.uint8(0xFF))
    return np.unpackbits(packed, count=total)



# -- public API ---------------------------------------------------------------------------

def compress(bits: Any, checksum: bool = True) -> bytes:
    """One 1-D bit tensor (torch.uint8 or torch.bool) -> an rle stream (CRC32 if checksum)."""
    arr, is_bool = one_row(bits, "rle")
    return _encode(arr, np.array([arr.size], dtype=np.int64), is_bool, False, checksum)


def decompress(data: bytes, max_bits: int = DEFAULT_MAX_BITS):
    """An rle stream -> the 1-D tensor it encodes, in its original dtype.

    Raises :class:`CodecError` if the stream is truncated, corrupted, a batch stream, or
    declares more than ``max_bits`` bits.
    """
    bits, _, is_bool = _decode(data, max_bits, batch=False)
    return to_tensor(bits, is_bool)


def compress_batch(seqs: Any, checksum: bool = True) -> bytes:
    """A list of 1-D bit tensors (any lengths) or a 2-D bit tensor -> one rle batch stream."""
    cat, lengths, is_bool = ragged_rows(seqs)
    return _encode(cat, lengths, is_bool, True, checksum)


def decompress_batch(data: bytes, max_bits: int = DEFAULT_MAX_BITS) -> list:
    """An rle batch stream -> a list of 1-D tensors; ``max_bits`` caps the total over rows."""
    bits, lengths, is_bool = _decode(data, max_bits, batch=True)
    t = to_tensor(bits, is_bool)
    return list(t.split(lengths.tolist())) if lengths.size else []


def stats(bits: Any, checksum: bool = True) -> dict[str, Any]:
    """Honest figures for one sequence: input bits, output bits, ratio (input / output).

    A ratio below 1 means rle *expands* the stream (it does on text bits: about one run per two
    bits costs about a byte per two bits). ``storage_ratio`` compares with the one-byte-per-bit
    tensor instead (8 times ``ratio``).
    """
    arr, _ = one_row(bits, "rle")
    out_bits = 8 * len(compress(bits, checksum))
    runs, _ = run_lengths(arr, np.array([arr.size], dtype=np.int64))
    ratio = arr.size / out_bits
    return {"codec": "rle", "input_bits": int(arr.size), "output_bits": out_bits,
            "ratio": ratio, "expands": ratio < 1.0, "storage_ratio": 8 * ratio,
            "runs": int(runs.size),
            "runs_per_bit": runs.size / arr.size if arr.size else 0.0}


class RunLengthCodec(StreamCodec):
    """The ``rle`` compressor: run lengths as LEB128 varints (see the module docstring).

    Options ``max_bits`` and ``checksum``: see :class:`bitlm_core.codecs.StreamCodec`.
    """

    name = "rle"
    magic = MAGIC
    encode = staticmethod(compress)
    decode = staticmethod(decompress)
    encode_batch = staticmethod(compress_batch)
    decode_batch = staticmethod(decompress_batch)
    measure = staticmethod(stats)
