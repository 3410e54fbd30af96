"""Hypothesis strategies for bit sequences of the shapes that break codecs and models."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

__all__ = ["bit_arrays", "sparse_bit_arrays", "run_bit_arrays", "any_bit_arrays",
           "bit_batches", "text_bytes"]


@st.composite
def bit_arrays(draw, min_size: int = 0, max_size: int = 4096) -> np.ndarray:
    """Uniformly random bits."""
    n = draw(st.integers(min_size, max_size))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).integers(0, 2, n, dtype=np.uint8)


@st.composite
def sparse_bit_arrays(draw, min_size: int = 0, max_size: int = 4096) -> np.ndarray:
    """Mostly zeros (or mostly ones), with a density drawn from 0 to 5%."""
    n = draw(st.integers(min_size, max_size))
    p = draw(st.floats(0.0, 0.05))
    seed = draw(st.integers(0, 2**32 - 1))
    bits = (np.random.default_rng(seed).random(n) < p).astype(np.uint8)
    return bits ^ 1 if draw(st.booleans()) else bits


@st.composite
def run_bit_arrays(draw, max_runs: int = 20, max_run: int = 100_000) -> np.ndarray:
    """Constant, alternating, and long-run streams (runs up to ``max_run`` bits)."""
    shape = draw(st.sampled_from(["constant", "alternating", "runs"]))
    first = draw(st.integers(0, 1))
    if shape == "constant":
        return np.full(draw(st.integers(0, max_run)), first, dtype=np.uint8)
    if shape == "alternating":
        n = draw(st.integers(0, 4096))
        return ((np.arange(n) + first) % 2).astype(np.uint8)
    lengths = draw(st.lists(st.integers(1, max_run), min_size=0, max_size=max_runs))
    values = (np.arange(len(lengths)) + first) % 2
    return np.repeat(values, lengths).astype(np.uint8)


def any_bit_arrays(max_size: int = 4096):
    """Random, sparse, constant, alternating or long-run bits."""
    return st.one_of(bit_arrays(max_size=max_size), sparse_bit_arrays(max_size=max_size),
                     run_bit_arrays())


def bit_batches(max_rows: int = 5, max_size: int = 512):
    """Lists of bit sequences of different lengths (batches of ragged sequences)."""
    return st.lists(any_bit_arrays(max_size=max_size), min_size=0, max_size=max_rows)


def text_bytes(max_size: int = 512):
    """UTF-8 bytes of arbitrary text, and arbitrary bytes."""
    return st.one_of(st.text(max_size=max_size).map(lambda s: s.encode("utf-8")),
                     st.binary(max_size=max_size))
