"""The ``identity`` compressor: one byte per bit, plus a small header. Never compresses.

It is the reference codec (the one that is obviously right) and the default of
``compression.name``. Format: magic ``b"BLID"``, version byte 1, dtype byte (0 uint8, 1 bool),
bit count as 8 little-endian bytes, then one byte (0 or 1) per bit.
"""

from __future__ import annotations

import struct

import numpy as np

from bitlm_core.bits import check_bits
from bitlm_core.errors import CodecError

MAGIC = b"BLID"
VERSION = 1
HEADER = struct.Struct("<4sBBQ")
DEFAULT_MAX_BITS = 1 << 30


class IdentityCompressor:
    name = "identity"
    magic = MAGIC

    def compress(self, bits) -> bytes:
        import torch

        is_bool = isinstance(bits, torch.Tensor) and bits.dtype == torch.bool
        t = check_bits(bits)
        if t.dim() != 1:
            raise CodecError(f"identity compresses one sequence of shape (L,), got "
                             f"{tuple(t.shape)}")
        return HEADER.pack(MAGIC, VERSION, int(is_bool), t.numel()) + t.numpy().tobytes()

    def decompress(self, data: bytes, max_bits: int = DEFAULT_MAX_BITS):
        import torch

        if len(data) < HEADER.size:
            raise CodecError(f"identity stream truncated: {len(data)} bytes, header needs "
                             f"{HEADER.size}")
        magic, version, dtype, n = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise CodecError(f"not an identity stream (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION or dtype > 1:
            raise CodecError(f"unsupported identity stream version {version} / dtype {dtype}")
        if n > max_bits:
            raise CodecError(f"identity stream declares {n} bits, over the limit max_bits="
                             f"{max_bits}; raise max_bits if the stream is trusted")
        body = np.frombuffer(data, dtype=np.uint8, offset=HEADER.size)
        if body.size != n:
            raise CodecError(f"identity stream body has {body.size} bytes, header says {n}")
        if n and body.max() > 1:
            raise CodecError("identity stream holds a byte other than 0 or 1")
        out = torch.from_numpy(body.copy())
        return out.bool() if dtype else out
