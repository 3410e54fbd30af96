"""The ``pack`` codec: 8 bits per byte in numpy ``packbits`` order, with the bit count.

Byte format, version 2 (integers little-endian)::

    magic    4 bytes  b"BPAK"
    version  1 byte   2 (version 1 streams, whose trailer is a zlib CRC-32, are still read)
    flags    1 byte   bit 0: decoded tensors are torch.bool (else torch.uint8)
                      bit 1: batch stream (several rows)
                      bit 2: a checksum trailer follows the payload; bits 3-7 must be 0
    n_bits   8 bytes  uint64: bits in the sequence          (single stream)
      -- or --
    n_rows   8 bytes  uint64: number of sequences           (batch stream)
    lengths  8 bytes per row, uint64: bits in each row      (batch stream)
    payload  ceil(total_bits / 8) bytes: all rows concatenated, packed 8 bits per byte, most
                      significant bit first (``np.packbits``); the padding bits of the last
                      byte are 0
    crc      4 bytes  CRC-32C (Castagnoli) of every byte before it, little-endian (only if
                      flag bit 2; version 1: zlib's CRC-32 instead)

Ratios, honestly: ``pack`` stores each bit as one bit, so input bits over output bits is just
under 1 (the 14-byte header and 4-byte CRC make it *expand* the stream slightly, whatever the
content). What it saves is the 8x of storing bits one per byte in a uint8/bool tensor:
``stats`` reports that as ``storage_ratio`` (tensor bytes over stream bytes, about 8).

The checksum is on by default (``PackCodec(checksum=True)``). It is CRC-32C because CPUs
compute it in hardware (the ``crc32c`` package uses SSE4.2 / ARMv8 CRC instructions, about 5x
faster here than zlib's CRC-32, which cost as much as ``np.packbits`` itself). A caller that
round-trips in memory, where nothing can corrupt the stream, may still turn it off
(``checksum: false`` in a run spec).

Decoding is safe on hostile input: the declared counts are checked against ``max_bits`` and
against the bytes present before anything proportional to them is allocated, the payload size
must match exactly, and the CRC catches corrupted payloads (without it a flipped payload bit
decodes silently to a wrong bit: the format has no redundancy). Any problem raises
:class:`CodecError`.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from crc32c import crc32c

from bitlm_core.codecs import (DEFAULT_MAX_BITS, StreamCodec, as_bit_array, check_limit,
                               checked_total, one_row, ragged_rows, reject_bits, to_tensor)
from bitlm_core.errors import CodecError

MAGIC = b"BPAK"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: zlib CRC-32 trailer; 2: CRC-32C
FLAG_BOOL = 0x01
FLAG_BATCH = 0x02
FLAG_CRC = 0x04
KNOWN_FLAGS = FLAG_BOOL | FLAG_BATCH | FLAG_CRC
PREFIX = struct.Struct("<4sBB")
COUNT = struct.Struct("<Q")
CRC = struct.Struct("<I")

__all__ = ["PackCodec", "compress", "decompress", "compress_batch", "decompress_batch",
           "stats", "DEFAULT_MAX_BITS", "MAGIC", "VERSION"]


# -- encoding -----------------------------------------------------------------------------

# A uint8 input must be checked for values other than 0 and 1 (np.packbits would store 2 as 1),
# and that check is a pass over the input half as long as np.packbits itself. From this many
# bits on, it runs on a second core while this one packs and checksums (numpy releases the GIL
# in both); below it, handing work to a thread costs more than it saves.
PARALLEL_CHECK_BITS = 1 << 22

_checker: ThreadPoolExecutor | None = None
_checker_lock = threading.Lock()


def _forget_checker() -> None:
    """After fork: the child has no worker thread, so it must start its own."""
    global _checker, _checker_lock
    _checker, _checker_lock = None, threading.Lock()


def _max_value(cat: np.ndarray) -> int:
    return int(cat.max())


def _check_in_background(cat: np.ndarray) -> Future | None:
    """``cat.max()`` on the worker thread, or None when no worker can take it (interpreter
    shutting down): the caller then checks in line."""
    global _checker
    with _checker_lock:
        if _checker is None:
            _checker = ThreadPoolExecutor(1, thread_name_prefix="bitlm-pack-check")
        try:
            return _checker.submit(_max_value, cat)
        except RuntimeError:  # "cannot schedule new futures after (interpreter) shutdown"
            return None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_checker)


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _encode(header: bytes, cat: np.ndarray, checksum: bool, unchecked: Any = None) -> bytes:
    """Header + packed bits (+ CRC-32C). ``unchecked``: the caller's input, when ``cat`` still
    has to be checked for values other than 0 and 1 (it is named in the error)."""
    pending = None
    if unchecked is not None and cat.size:
        if cat.size >= PARALLEL_CHECK_BITS and _usable_cores() > 1:
            pending = _check_in_background(cat)
        if pending is None and cat.max() > 1:
            reject_bits(unchecked)
    payload = np.packbits(cat)
    crc = crc32c(payload, crc32c(header)) if checksum else None
    if pending is not None and pending.result() > 1:
        reject_bits(unchecked)
    if crc is None:
        return b"".join((header, payload))
    return b"".join((header, payload, CRC.pack(crc)))


def _flags(is_bool: bool, batch: bool, checksum: bool) -> int:
    return ((FLAG_BOOL if is_bool else 0) | (FLAG_BATCH if batch else 0)
            | (FLAG_CRC if checksum else 0))


# -- decoding -----------------------------------------------------------------------------


def _decode(data: Any, max_bits: Any, batch: bool) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validate and decode a stream -> (concatenated bits, row lengths, is_bool)."""
    limit = check_limit(max_bits)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"pack streams are bytes, got {type(data).__name__}")
    buf = np.frombuffer(data, dtype=np.uint8)
    minimum = PREFIX.size + COUNT.size
    if buf.size < minimum:
        raise CodecError(f"pack stream truncated: {buf.size} bytes, the smallest stream has "
                         f"{minimum}")
    magic, version, flags = PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise CodecError(f"not a pack stream: magic {magic!r}, expected {MAGIC!r}")
    if version not in READABLE_VERSIONS:
        raise CodecError(f"pack stream version {version} is not supported (this plugin reads "
                         f"versions 1 and 2); upgrade bitlm-compression-pack")
    if flags & ~KNOWN_FLAGS:
        raise CodecError(f"pack stream has unknown flag bits {flags:#04x} (corrupted stream)")
    if bool(flags & FLAG_BATCH) != batch:
        raise CodecError("this pack stream holds a batch: use decompress_batch" if not batch
                         else "this pack stream holds one sequence: use decompress")
    body_end = buf.size - (CRC.size if flags & FLAG_CRC else 0)
    if body_end < minimum:
        raise CodecError(f"pack stream truncated: {buf.size} bytes, a stream with a checksum "
                         f"has at least {minimum + CRC.size}")
    offset = PREFIX.size
    if batch:
        (n_rows,) = COUNT.unpack_from(buf, offset)
        offset += COUNT.size
        if n_rows > (body_end - offset) // COUNT.size:
            raise CodecError(f"pack stream declares {n_rows} rows, but only "
                             f"{body_end - offset} bytes remain for their lengths and bits "
                             "(stream truncated or corrupted)")
        lengths = np.frombuffer(data, dtype="<u8", count=n_rows, offset=offset)
        offset += COUNT.size * n_rows
    else:
        lengths = np.frombuffer(data, dtype="<u8", count=1, offset=offset)
        offset += COUNT.size
    total = checked_total(lengths, limit, "pack")
    payload_size = (total + 7) // 8
    if body_end - offset != payload_size:
        raise CodecError(f"pack stream declares {total} bits, which take {payload_size} bytes, "
                         f"but {body_end - offset} are present (stream truncated or corrupted)")
    checksum = crc32c if version == 2 else zlib.crc32
    if flags & FLAG_CRC and CRC.unpack_from(buf, body_end)[0] != checksum(buf[:body_end]):
        raise CodecError("pack stream checksum mismatch: the stream is corrupted")
    payload = buf[offset:body_end]
    if total % 8 and payload[-1] & ((1 << (8 - total % 8)) - 1):
        raise CodecError("pack stream has non-zero padding bits in its last byte "
                         "(corrupted stream)")
    return np.unpackbits(payload, count=total), lengths.astype(np.int64), bool(flags & FLAG_BOOL)




# -- public API ---------------------------------------------------------------------------

def compress(bits: Any, checksum: bool = True) -> bytes:
    """One 1-D bit tensor (torch.uint8 or torch.bool) -> a pack stream (CRC-32C if checksum)."""
    arr, is_bool = one_row(bits, "pack", check=False)  # _encode checks uint8 values
    header = PREFIX.pack(MAGIC, VERSION, _flags(is_bool, False, checksum)) + COUNT.pack(arr.size)
    return _encode(header, arr, checksum, unchecked=None if is_bool else bits)


def decompress(data: bytes, max_bits: int = DEFAULT_MAX_BITS):
    """A pack stream -> the 1-D tensor it encodes, in its original dtype.

    Raises :class:`CodecError` if the stream is truncated, corrupted, a batch stream, or
    declares more than ``max_bits`` bits.
    """
    bits, _, is_bool = _decode(data, max_bits, batch=False)
    return to_tensor(bits, is_bool)


def compress_batch(seqs: Any, checksum: bool = True) -> bytes:
    """A list of 1-D bit tensors (any lengths) or a 2-D bit tensor -> one pack batch stream."""
    cat, lengths, is_bool = ragged_rows(seqs)
    header = (PREFIX.pack(MAGIC, VERSION, _flags(is_bool, True, checksum))
              + COUNT.pack(lengths.size) + lengths.astype("<u8").tobytes())
    return _encode(header, cat, checksum)


def decompress_batch(data: bytes, max_bits: int = DEFAULT_MAX_BITS) -> list:
    """A pack batch stream -> a list of 1-D tensors; ``max_bits`` caps the total over rows."""
    bits, lengths, is_bool = _decode(data, max_bits, batch=True)
    t = to_tensor(bits, is_bool)
    return list(t.split(lengths.tolist())) if lengths.size else []


def stats(bits: Any, checksum: bool = True) -> dict[str, Any]:
    """Honest figures for one sequence.

    ``ratio`` is input bits over output bits (just under 1: pack never compresses
    information, and its header makes it expand slightly); ``storage_ratio`` is the bytes of the
    one-byte-per-bit tensor over the bytes of the stream (about 8).
    """
    arr, _ = as_bit_array(bits)
    out_bytes = len(compress(bits, checksum))
    ratio = arr.size / (8 * out_bytes)
    return {"codec": "pack", "input_bits": int(arr.size), "output_bits": 8 * out_bytes,
            "ratio": ratio, "expands": ratio < 1.0, "storage_ratio": arr.size / out_bytes}


class PackCodec(StreamCodec):
    """The ``pack`` compressor: 8 bits per byte (see the module docstring).

    Options ``max_bits`` and ``checksum``: see :class:`bitlm_core.codecs.StreamCodec`.
    """

    name = "pack"
    magic = MAGIC
    encode = staticmethod(compress)
    decode = staticmethod(decompress)
    encode_batch = staticmethod(compress_batch)
    decode_batch = staticmethod(decompress_batch)
    measure = staticmethod(stats)
