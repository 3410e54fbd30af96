"""The ``invert`` codec: an honest, tiny example of a bitlm compressor.

It stores every bit inverted, one bit per byte, so it never compresses: the stream is 8 times
the bits plus a 14-byte header (``stats`` says so). Its point is to show the contract every
codec meets: exact round trips that keep the dtype, and a decoder that rejects truncated,
corrupted or oversized streams with :class:`CodecError` before allocating anything.

Byte format (integers little-endian)::

    magic    4 bytes  b"BINV"
    version  1 byte   1
    dtype    1 byte   0: torch.uint8, 1: torch.bool
    n_bits   8 bytes  uint64
    body     n_bits bytes, each 1 - bit (so 0x00 or 0x01)
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from bitlm_core.bits import check_bits
from bitlm_core.errors import CodecError

MAGIC = b"BINV"
VERSION = 1
HEADER = struct.Struct("<4sBBQ")
DEFAULT_MAX_BITS = 1 << 30


class InvertCodec:
    """Stores bits inverted. ``max_bits`` (an option a run spec can set) caps decoding."""

    name = "invert"
    magic = MAGIC  # lets `bitlm codec decompress` recognise the stream

    def __init__(self, max_bits: int = DEFAULT_MAX_BITS):
        # Reject bad options with ValueError/TypeError: the registry reports them with the
        # spec's key path (compression.options.max_bits).
        if isinstance(max_bits, bool) or not isinstance(max_bits, int) or max_bits < 0:
            raise ValueError(f"max_bits must be a non-negative int, got {max_bits!r}")
        self.max_bits = max_bits

    def compress(self, bits: Any) -> bytes:
        """One 1-D bit tensor (torch.uint8 or torch.bool) -> bytes."""
        import torch

        is_bool = isinstance(bits, torch.Tensor) and bits.dtype == torch.bool
        t = check_bits(bits)  # raises BitsError for anything that is not 0/1 bits
        if t.dim() != 1:
            raise CodecError(f"invert compresses one sequence of shape (L,), got shape "
                             f"{tuple(t.shape)}")
        body = np.ascontiguousarray(t.cpu().numpy()) ^ 1
        return HEADER.pack(MAGIC, VERSION, int(is_bool), t.numel()) + body.tobytes()

    def decompress(self, data: bytes, max_bits: int | None = None):
        """bytes -> the 1-D tensor, in its original dtype; CodecError on any bad stream."""
        import torch

        limit = self.max_bits if max_bits is None else max_bits
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise CodecError(f"invert streams are bytes, got {type(data).__name__}")
        if len(data) < HEADER.size:
            raise CodecError(f"invert stream truncated: {len(data)} bytes, the header alone "
                             f"has {HEADER.size}")
        magic, version, dtype, n = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise CodecError(f"not an invert stream: magic {magic!r}, expected {MAGIC!r}")
        if version != VERSION or dtype > 1:
            raise CodecError(f"unsupported invert stream (version {version}, dtype {dtype})")
        # Check the declared size against the limit BEFORE allocating anything for it.
        if n > limit:
            raise CodecError(f"invert stream declares {n} bits, over the limit max_bits="
                             f"{limit}; raise max_bits if the stream is trusted")
        body = np.frombuffer(data, dtype=np.uint8, offset=HEADER.size)
        if body.size != n:
            raise CodecError(f"invert stream has {body.size} body bytes, its header says {n} "
                             "(truncated or corrupted)")
        if n and int(body.max()) > 1:
            raise CodecError("invert stream holds a byte other than 0 or 1 (corrupted)")
        out = torch.from_numpy(body ^ 1)
        return out.bool() if dtype else out

    def stats(self, bits: Any) -> dict[str, Any]:
        """Honest figures: ratio = input bits / output bits (here 1/8: it expands)."""
        n = check_bits(bits).numel()
        out_bits = 8 * len(self.compress(bits))
        return {"codec": self.name, "input_bits": n, "output_bits": out_bits,
                "ratio": n / out_bits, "expands": n < out_bits}
