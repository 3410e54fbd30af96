"""Range coding of bits on constriction: the :class:`~bitlm_core.app.coding.BitCoder` of
compressing and of decompressing.

Each coded bit is one symbol of a two-symbol categorical model whose probabilities are the
quantised integers of :func:`bitlm_core.app.coding.quantize` (exact in float64: ``q / 2**16``),
each coded byte one of a 256-symbol model of :func:`~bitlm_core.app.coding.quantize_frames`;
constriction's ``Categorical(perfect=False)`` turns them into its own fixed-point model the
same way on both sides. The queue (FIFO) range coder reads the symbols back in the order they
were written, which is the order :func:`~bitlm_core.app.coding.code_segments` asks for them.
"""

from __future__ import annotations

import numpy as np

from bitlm_core.app.coding import ONE
from bitlm_core.errors import CodecError


def _probabilities(q: np.ndarray) -> np.ndarray:
    q = q.astype(np.float64)
    return np.stack([ONE - q, q], axis=1) / ONE


def _weights(q: np.ndarray) -> np.ndarray:
    """(n, 256) integer weights -> the probabilities they stand for (exact in float64)."""
    q = q.astype(np.float64)
    return q / q.sum(axis=1, keepdims=True)


def _family():
    import constriction

    return constriction.stream.model.Categorical(perfect=False)


class RangeBitEncoder:
    """Codes the bits it is given; :meth:`words` is the stream's payload."""

    def __init__(self) -> None:
        import constriction

        self.encoder = constriction.stream.queue.RangeEncoder()
        self.family = _family()

    def __call__(self, q: np.ndarray, bits) -> np.ndarray:
        if len(q):
            self.encoder.encode(bits.astype(np.int32), self.family, _probabilities(q))
        return bits

    def frames(self, q: np.ndarray, symbols) -> np.ndarray:
        if len(q):
            self.encoder.encode(symbols.astype(np.int32), self.family, _weights(q))
        return symbols

    def words(self) -> np.ndarray:
        return np.asarray(self.encoder.get_compressed(), dtype=np.uint32)


class RangeBitDecoder:
    """Reads bits back from a payload of 32-bit words."""

    def __init__(self, words: np.ndarray) -> None:
        import constriction

        self.decoder = constriction.stream.queue.RangeDecoder(words.astype(np.uint32))
        self.family = _family()

    def __call__(self, q: np.ndarray, bits) -> np.ndarray:
        if not len(q):
            return np.zeros(0, dtype=np.uint8)
        try:
            got = self.decoder.decode(self.family, _probabilities(q))
        except Exception as exc:  # constriction's errors of a stream that ends early
            raise CodecError(f"the stream ends before its last bit ({exc}): it is truncated "
                             "or damaged") from None
        return np.asarray(got, dtype=np.uint8)

    def frames(self, q: np.ndarray, symbols) -> np.ndarray:
        if not len(q):
            return np.zeros(0, dtype=np.uint8)
        try:
            got = self.decoder.decode(self.family, _weights(q))
        except Exception as exc:
            raise CodecError(f"the stream ends before its last byte ({exc}): it is truncated "
                             "or damaged") from None
        return np.asarray(got, dtype=np.uint8)
