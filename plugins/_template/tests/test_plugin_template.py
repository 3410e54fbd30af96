"""Tests of the example plugin: the shared codec contract does most of the work."""

from __future__ import annotations

import pytest
import torch

from bitlm_core.errors import CodecError, ResolutionError
from bitlm_core.testing import check_codec_contract, check_codec_roundtrip
from bitlm_plugin_template.codec import InvertCodec


def test_contract():
    # Round trips (hypothesis), determinism, dtype, the max_bits limit, bad input, and
    # hostile streams (truncations, bit flips, huge lengths, random bytes).
    report = check_codec_contract(InvertCodec(), max_examples=300)
    assert report["round_trips"] >= 300


def test_one_round_trip_by_hand():
    data = check_codec_roundtrip(InvertCodec(), torch.tensor([1, 0, 0], dtype=torch.uint8))
    assert data[-3:] == b"\x00\x01\x01"  # stored inverted


def test_the_limit_is_an_option():
    codec = InvertCodec(max_bits=2)
    with pytest.raises(CodecError, match="max_bits=2"):
        codec.decompress(codec.compress(torch.ones(3, dtype=torch.uint8)))


def test_stats_are_honest():
    s = InvertCodec().stats(torch.zeros(100, dtype=torch.uint8))
    assert s["expands"] and s["ratio"] == 100 / (8 * 114)


def test_the_registry_finds_the_plugin_and_binds_options():
    from bitlm_core.registry import get_registry

    registry = get_registry(refresh=True)
    record = registry.resolve("compressor", "invert")
    assert record.distribution == "bitlm-plugin-template"
    assert registry.build("compressor", "invert", {"max_bits": 10}).max_bits == 10
    with pytest.raises(ResolutionError, match="max_bits"):
        registry.build("compressor", "invert", {"max_bits": "lots"})
