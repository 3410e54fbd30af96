"""Compression around the model: training batches through a codec, and codec streams into it.

* :func:`compression_prob` is the share of training batches sent through the codec at a step:
  0 during ``warmup_steps``, then a cosine ramp up to ``prob`` over ``ramp_steps``.
* :class:`CompressionFeed` round-trips a batch of windows through the codec before the model
  sees it (checking every bit came back, and measuring the ratio), and, in *direct mode*, builds
  a batch of the compressed streams themselves as bits for the model to learn as a sequence.
* :func:`forward_compressed` runs the model on a compressed stream: the same outputs as the
  forward on the uncompressed bits, by construction.
* :func:`model_output_decompress` reads a generated sample as a codec stream and decompresses it
  (for a model trained in direct mode); a sample that is not a valid stream raises
  :class:`CodecError` saying why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from bitlm_core.errors import BitlmError, CodecError


def compression_prob(step: int, prob: float, warmup_steps: int = 0, ramp_steps: int = 0) -> float:
    """Share of batches compressed at ``step``: 0, then a cosine ramp from 0 to ``prob``."""
    if step < warmup_steps:
        return 0.0
    if ramp_steps <= 0:
        return prob
    t = min(1.0, (step - warmup_steps) / ramp_steps)
    return prob * 0.5 * (1.0 - math.cos(math.pi * t))


@dataclass
class RoundTrip:
    bits: Any  # the batch as it came back out of the codec, (B, L) uint8
    ratio: float  # input bits over output bits, over the whole batch
    streams: list  # each window's stream (bytes), reused by direct mode


class CompressionFeed:
    """A codec between the data and the model during training."""

    def __init__(self, codec: Any, encoder: Any, name: str | None = None):
        self.codec = codec
        self.encoder = encoder
        self.name = name or getattr(codec, "name", "codec")

    def _streams(self, bits) -> list[bytes]:
        return [self.codec.compress(row) for row in bits]

    def round_trip(self, bits) -> RoundTrip:
        """Compress each window, decompress it, and check it is bit-for-bit the original."""
        import torch

        streams = self._streams(bits)
        rows = []
        for row, stream in zip(bits, streams):
            restored = self.codec.decompress(stream, max_bits=row.numel())
            if restored.shape != row.shape or not torch.equal(restored.to(torch.uint8), row):
                raise BitlmError(f"compressor '{self.name}' did not round-trip a training "
                                 "window exactly; the codec is broken (its tests should show "
                                 "where: bitlm_core.testing.check_codec_contract)")
            rows.append(restored.to(torch.uint8))
        out_bits = 8 * sum(len(s) for s in streams)
        return RoundTrip(torch.stack(rows), bits.numel() / max(out_bits, 1), streams)

    def direct_batch(self, bits, streams: list[bytes] | None = None):
        """The windows' compressed streams as training bits, ``(B', L)`` with ``B' <= B``.

        Each window's stream (bytes) goes through the run's encoder, the results are joined and
        cut into windows as long as the originals (frame-aligned, since ``L`` is a whole number
        of frames). Streams shorter than one window in total are repeated to fill it.
        ``streams``: the windows' streams when already made (a round trip's), else compressed
        here.
        """
        import torch

        L = bits.shape[-1]
        streams = self._streams(bits) if streams is None else streams
        cat = np.concatenate([self.encoder.encode_np(s) for s in streams])
        n_rows = min(bits.shape[0], len(cat) // L)
        if n_rows == 0:
            cat, n_rows = np.resize(cat, L), 1
        return torch.from_numpy(np.ascontiguousarray(cat[: n_rows * L].reshape(n_rows, L)))


def decompress_any(codec: Any, stream: bytes, max_bits: int | None = None):
    """A single or batch stream -> a (L,) tensor or a (B, L) tensor of equal-length rows."""
    import torch

    kwargs = {} if max_bits is None else {"max_bits": max_bits}
    try:
        return codec.decompress(stream, **kwargs)
    except CodecError as single_error:
        batch = getattr(codec, "decompress_batch", None)
        if batch is None:
            raise
        try:
            rows = batch(stream, **kwargs)
        except CodecError:
            raise single_error from None
        if not rows:
            raise CodecError("the batch stream holds no sequences") from None
        if len({r.numel() for r in rows}) != 1:
            raise CodecError("the batch stream's sequences differ in length; decompress them "
                             "with decompress_batch and run the model on each") from None
        return torch.stack(rows)


def forward_compressed(model, stream: bytes, codec: Any, *, causal: bool = True,
                       max_bits: int | None = None):
    """The model's logits on the bits inside a codec stream (single or batch).

    Decompresses within ``max_bits`` and runs the ordinary forward, so the result is the same
    as ``model(bits, causal=causal)`` on the uncompressed bits.
    """
    import torch

    from bitlm_core.engine.device import model_device

    bits = decompress_any(codec, stream, max_bits)
    if bits.dim() == 1:
        bits = bits.unsqueeze(0)
    return model(bits.to(model_device(model), torch.uint8), causal=causal)


def model_output_decompress(bits, codec: Any, encoder: Any, max_bits: int = 1 << 24):
    """Generated bits -> bytes (through ``encoder``) -> read as a ``codec`` stream -> bits.

    Raises :class:`CodecError` when the generated bytes are not a valid stream of that codec,
    which is the usual case unless the model was trained on compressed streams (direct mode).
    """
    data = encoder.decode(bits, repair=True)
    magic = getattr(codec, "magic", b"")
    if magic and not data.startswith(magic):
        raise CodecError(f"the sample is not a {getattr(codec, 'name', 'codec')} stream: it "
                         f"starts with {data[:len(magic)]!r}, not {magic!r}")
    return codec.decompress(data, max_bits=max_bits)
