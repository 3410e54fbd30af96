"""Entry point of the ``compression_rle`` plugin: registers the ``rle`` compressor.

The hook body only builds a record; numpy and torch are imported when the codec module is
imported, which happens inside the hook (not when bitlm lists plugins without resolving).
"""

from __future__ import annotations

from bitlm_core.hookspecs import hookimpl
from bitlm_core.records import CompressorSpec


@hookimpl
def bitlm_compressors():
    from bitlm_compression_rle.codec import RunLengthCodec

    yield CompressorSpec(
        "rle",
        RunLengthCodec,
        "run lengths as LEB128 varints; pays on sparse or long-run streams, expands text bits",
    )
