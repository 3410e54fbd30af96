"""Compression around the model: the batch share schedule, round trips in training, direct mode,
forward on compressed streams and decompressing samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bitlm_core.builtins.attention import ReferenceAttention
from bitlm_core.builtins.encoders import Parity9Encoder
from bitlm_core.engine.compression import (CompressionFeed, compression_prob, forward_compressed,
                                           model_output_decompress)
from bitlm_core.errors import BitlmError, CodecError
from bitlm_core.model import BitTransformerLM, ModelConfig
from bitlm_core.registry import get_registry
from bitlm_core.app.run import execute
from bitlm_core.spec import load_spec

ENC = Parity9Encoder()


def codec(name: str, **options):
    return get_registry().build("compressor", name, options)


def text_windows(n: int = 4, frames: int = 12) -> torch.Tensor:
    text = b"It is a truth universally acknowledged, that a single man in possession "
    return torch.stack([ENC.encode(text[i: i + frames]) for i in range(n)])


def test_share_is_zero_in_warmup_then_ramps_up_to_prob_along_a_cosine():
    p = [compression_prob(s, 0.5, warmup_steps=10, ramp_steps=20) for s in range(40)]
    assert p[:10] == [0.0] * 10
    assert p[10] == 0.0 and p[30:] == [0.5] * 10
    assert all(a <= b for a, b in zip(p, p[1:]))
    assert p[20] == pytest.approx(0.25)  # half way up a cosine ramp
    assert compression_prob(0, 0.3) == 0.3 and compression_prob(5, 0.3, warmup_steps=5) == 0.3


@pytest.mark.parametrize("name", [pytest.param("rle", marks=pytest.mark.needs("compressor:rle")),
                                  pytest.param("pack", marks=pytest.mark.needs("compressor:pack")),
                                  "identity"])
def test_round_trip_gives_back_the_batch_and_an_honest_ratio(name):
    bits = text_windows()
    c = codec(name)
    trip = CompressionFeed(c, ENC).round_trip(bits)
    assert torch.equal(trip.bits, bits)
    out_bits = 8 * sum(len(c.compress(row)) for row in bits)
    assert trip.ratio == pytest.approx(bits.numel() / out_bits)


def test_a_codec_that_changes_bits_is_caught():
    class Lossy:
        name = "lossy"

        def compress(self, bits):
            return bytes(bits.tolist())

        def decompress(self, data, max_bits=0):
            out = torch.tensor(list(data), dtype=torch.uint8)
            out[0] ^= 1
            return out

    with pytest.raises(BitlmError, match="did not round-trip"):
        CompressionFeed(Lossy(), ENC).round_trip(text_windows())


@pytest.mark.needs("compressor:rle")
def test_direct_batch_is_the_streams_as_encoder_bits():
    bits = text_windows(n=3)
    c = codec("rle")
    direct = CompressionFeed(c, ENC).direct_batch(bits)
    streams = np.concatenate([ENC.encode_np(c.compress(row)) for row in bits])
    L = bits.shape[1]
    assert direct.shape == (3, L)  # rle expands text: enough stream bits for every row
    assert np.array_equal(direct.numpy().reshape(-1), streams[: 3 * L])
    short = CompressionFeed(c, ENC).direct_batch(torch.zeros(2, 900, dtype=torch.uint8))
    assert short.shape == (1, 900)  # two tiny streams, repeated to fill one window


@pytest.mark.needs("compressor:rle", "compressor:pack")
@pytest.mark.parametrize("layout", ["framed", "flat"])
def test_forward_on_a_stream_equals_forward_on_its_bits(layout):
    torch.manual_seed(0)
    model = BitTransformerLM(ModelConfig(layout=layout, d_model=32, n_layers=1, n_heads=2,
                                         max_frames=16, frame_parity=layout == "framed"),
                             ReferenceAttention()).eval()
    bits = text_windows()
    with torch.no_grad():
        expected = model(bits, causal=True)
        for name in ("rle", "pack"):
            c = codec(name)
            single = forward_compressed(model, c.compress(bits[1]), c)
            # exact against the same one-row forward; a row inside a batch may differ in the
            # last float bit (matmul kernels are not batch-invariant on every CPU)
            assert torch.equal(single, model(bits[1:2], causal=True))
            assert torch.allclose(single, expected[1:2], atol=1e-5)
            batch = forward_compressed(model, c.compress_batch(bits), c)
            assert torch.equal(batch, expected)
    with pytest.raises(CodecError):
        forward_compressed(model, b"not a stream", codec("rle"))
    with pytest.raises(CodecError, match="max_bits"):
        forward_compressed(model, codec("rle").compress(bits[0]), codec("rle"), max_bits=10)


@pytest.mark.needs("compressor:rle")
def test_model_output_decompress():
    c = codec("rle")
    original = ENC.encode(b"some text")
    sample_bits = ENC.encode(c.compress(original))  # what a direct-mode model would generate
    assert torch.equal(model_output_decompress(sample_bits, c, ENC), original)
    with pytest.raises(CodecError, match="not a rle stream"):
        model_output_decompress(ENC.encode(b"plain words"), c, ENC)


@pytest.mark.needs("compressor:rle")
def test_training_logs_raw_compressed_and_direct_metrics_separately(tmp_path, tiny_spec):
    spec = load_spec(tiny_spec(steps=12, compression={
        "name": "rle", "prob": 0.5, "warmup_steps": 2, "ramp_steps": 2, "direct": True,
        "decompress_output": True}))
    execute(spec, tmp_path / "r", log=lambda m: None)
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").open()]
    train = [r for r in records if r["split"] == "train"]
    assert all(r["compressed_batches"] == 0 for r in train[:2])  # warm-up
    raw = [r for r in train if "raw/loss" in r]
    packed = [r for r in train if "compressed/loss" in r]
    assert raw and packed, "with prob 0.5 over 10 steps both kinds should occur"
    for r in packed:
        assert r["compressed/ratio"] < 1  # run-length coding expands text bits
        assert 0 <= r["compressed/accuracy"] <= 1 and r["direct_loss"] > 0
        assert "raw/loss" not in r or r["raw/batches"] + r["compressed/batches"] == 1
    assert "read as a rle stream" in (tmp_path / "r" / "samples.txt").read_text()


@pytest.mark.needs("compressor:rle")
def test_decompress_output_reads_what_follows_the_prompt():
    from types import SimpleNamespace

    from bitlm_core.app.generate import SampleResult, decompress_sample

    c = codec("rle")
    prompt = ENC.encode(b"The ")
    stream = ENC.encode(c.compress(ENC.encode(b"hidden text")))
    result = SampleResult("", torch.cat([prompt, stream]), None, prompt_bits=prompt.numel())
    comps = SimpleNamespace(compressor=c, encoder=ENC)
    assert decompress_sample(result, comps) == "hidden text"
    plain = SampleResult("", torch.cat([prompt, ENC.encode(b"words")]), None,
                         prompt_bits=prompt.numel())
    assert decompress_sample(plain, comps).startswith("(not a valid stream: the sample is not")
