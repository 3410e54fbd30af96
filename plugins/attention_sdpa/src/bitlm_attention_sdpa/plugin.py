"""Registers the ``sdpa`` attention backend with bitlm (entry point group ``bitlm``)."""

from __future__ import annotations

from bitlm_core.hookspecs import hookimpl
from bitlm_core.records import AttentionBackendSpec


@hookimpl
def bitlm_attention_backends():
    # Imported here so that listing plugins stays cheap (backend.py defers torch as well).
    from bitlm_attention_sdpa.backend import SdpaAttention

    yield AttentionBackendSpec(
        "sdpa", SdpaAttention,
        "torch scaled_dot_product_attention; options chunk_size, overlap (local attention)",
    )
