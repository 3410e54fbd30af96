"""Entry point of the ``compression_pack`` plugin: registers the ``pack`` compressor."""

from __future__ import annotations

from bitlm_core.hookspecs import hookimpl
from bitlm_core.records import CompressorSpec


@hookimpl
def bitlm_compressors():
    from bitlm_compression_pack.codec import PackCodec

    yield CompressorSpec(
        "pack",
        PackCodec,
        "8 bits per byte (numpy packbits order) + bit count and CRC-32C; 8x smaller than a uint8 "
        "bit tensor, never smaller than the bits themselves",
    )
