"""Vectorised LEB128 varints (unsigned, little-endian groups of 7 bits).

Each value is written as groups of 7 bits, least significant group first; every byte but the
last of a value has its high bit (0x80) set. ``0 -> 00``, ``127 -> 7f``, ``128 -> 80 01``,
``300 -> ac 02``. Only the canonical (shortest) form is accepted when decoding, and a value may
use at most :data:`MAX_VARINT_BYTES` bytes (63 bits), so every decoded value fits in int64.

Encoding and decoding work on whole numpy arrays: there is no Python loop per value or per
byte, only a loop over the (at most 9) byte positions when sizing values.
"""

from __future__ import annotations

import numpy as np

from bitlm_core.errors import CodecError

MAX_VARINT_BYTES = 9  # 9 * 7 = 63 bits: every value fits in int64
MAX_VARINT_VALUE = (1 << (7 * MAX_VARINT_BYTES)) - 1

__all__ = ["MAX_VARINT_BYTES", "MAX_VARINT_VALUE", "encode_varints", "decode_varints",
           "encode_varint", "read_varint"]


def varint_sizes(values: np.ndarray) -> np.ndarray:
    """Bytes needed by each value (1 to 9), as int64."""
    sizes = np.ones(values.shape, dtype=np.int64)
    if values.size == 0:
        return sizes
    top = int(values.max())
    for k in range(1, MAX_VARINT_BYTES):
        threshold = 1 << (7 * k)
        if top < threshold:
            break
        sizes += values >= np.uint64(threshold)
    return sizes


def encode_varints(values: np.ndarray) -> np.ndarray:
    """Unsigned integers (< 2**63) -> their LEB128 bytes, concatenated, as a uint8 array."""
    values = np.asarray(values).reshape(-1)
    if values.size == 0:
        return np.empty(0, dtype=np.uint8)
    top = int(values.max())
    if top < 0x80:  # fast path: every value is one byte (no uint64 copy)
        return values.astype(np.uint8)
    if top > MAX_VARINT_VALUE or int(values.min()) < 0:
        raise CodecError(f"value {top} cannot be written as a {MAX_VARINT_BYTES}-byte varint")
    values = values.astype(np.uint64, copy=False)
    sizes = varint_sizes(values)
    starts = np.cumsum(sizes) - sizes
    owner = np.repeat(np.arange(values.size), sizes)  # which value each output byte belongs to
    group = np.arange(owner.size, dtype=np.int64) - starts[owner]  # 0 for the lowest 7 bits
    out = ((values[owner] >> (7 * group).astype(np.uint64)) & np.uint64(0x7F)).astype(np.uint8)
    out[group < sizes[owner] - 1] |= 0x80
    return out


def decode_varints(buf: np.ndarray, count: int, what: str = "varints") -> np.ndarray:
    """Decode exactly ``count`` canonical varints that fill ``buf`` completely.

    Returns a uint64 array, or ``buf`` itself (uint8) when every value is a single byte.

    Raises :class:`CodecError` when ``buf`` holds more or fewer values, ends inside a value
    (truncated), contains a value longer than 9 bytes, or a non-canonical (over-long) value.
    Memory use is a few arrays the size of ``buf``, whatever the values say.

    Work is one pass over ``buf`` plus work proportional to the continuation bytes, so streams
    of mostly one-byte values (short runs) decode at memory speed.
    """
    buf = np.asarray(buf, dtype=np.uint8).reshape(-1)
    if count == 0:
        if buf.size:
            raise CodecError(f"{what}: {buf.size} unexpected trailing bytes")
        return np.empty(0, dtype=np.uint64)
    if buf.size == 0 or buf[-1] & 0x80:
        raise CodecError(f"{what}: stream truncated inside a varint (the last byte has its "
                         "continuation bit set)")
    more = buf >= 0x80  # continuation bytes
    n_more = int(np.count_nonzero(more))
    if buf.size - n_more != count:
        raise CodecError(f"{what}: the header declares {count} values but "
                         f"{buf.size - n_more} are present (stream truncated or corrupted)")
    if n_more == 0:  # fast path: every value is one byte, returned as is (uint8, no copy)
        return buf
    values = buf[~more].astype(np.uint64)  # the last (most significant) byte of each value
    positions = np.flatnonzero(more)
    owner = positions - np.arange(n_more)  # index of the value each continuation byte is in
    first = np.empty(n_more, dtype=bool)
    first[0] = True
    np.not_equal(owner[1:], owner[:-1], out=first[1:])
    group_starts = np.flatnonzero(first)
    group_sizes = np.diff(group_starts, append=n_more)  # continuation bytes per long value
    if int(group_sizes.max()) >= MAX_VARINT_BYTES:
        raise CodecError(f"{what}: a varint is {int(group_sizes.max()) + 1} bytes long; at most "
                         f"{MAX_VARINT_BYTES} are allowed (corrupted stream)")
    long_values = owner[group_starts]
    if np.any(values[long_values] == 0):
        raise CodecError(f"{what}: a varint is not in its shortest form (corrupted stream)")
    index = np.arange(n_more) - np.repeat(group_starts, group_sizes)  # 0 = lowest 7 bits
    low = (buf[positions] & 0x7F).astype(np.uint64) << (7 * index).astype(np.uint64)
    values[long_values] = ((values[long_values] << (7 * group_sizes).astype(np.uint64))
                           | np.bitwise_or.reduceat(low, group_starts))
    return values


def encode_varint(value: int) -> bytes:
    """One non-negative int -> its LEB128 bytes (for header fields)."""
    return encode_varints(np.array([value], dtype=np.uint64)).tobytes()


def read_varint(data: np.ndarray, offset: int, what: str) -> tuple[int, int]:
    """Read one canonical varint of ``data`` at ``offset`` -> (value, offset after it)."""
    value = 0
    for i in range(MAX_VARINT_BYTES):  # bounded: at most 9 iterations
        if offset + i >= data.size:
            raise CodecError(f"stream truncated while reading {what}")
        byte = int(data[offset + i])
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise CodecError(f"{what} is a varint not in its shortest form "
                                 "(corrupted stream)")
            return value, offset + i + 1
    raise CodecError(f"{what} is a varint longer than {MAX_VARINT_BYTES} bytes "
                     "(corrupted stream)")
