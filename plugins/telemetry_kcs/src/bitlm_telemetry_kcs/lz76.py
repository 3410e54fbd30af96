"""Lempel-Ziv 1976 complexity of a bit string: an exact fast count and a plain reference.

Definition (Lempel and Ziv 1976, the parse Kaspar and Schuster 1987 count): read the string left
to right and cut it into phrases. The phrase starting at position ``i`` is the shortest substring
``s[i:i+k]`` that does *not* occur starting at any earlier position ``j < i`` (the earlier
occurrence may overlap the phrase itself). Equivalently: the longest prefix of ``s[i:]`` seen
starting before ``i``, plus one new symbol. ``c(n)`` is the number of phrases, the last one
counted even when the string ends before it is complete. Example::

    1001111011000010  ->  1 | 0 | 01 | 1110 | 1100 | 0010     c = 6

(LZ78 dictionary parsing gives 8 on the same string: a different quantity.)

Normalised complexity ``C = c(n) * log2(n) / n``: about 1 for fair-coin bits (1.07 at n = 10^3,
1.01 at 10^6: it converges from above), near 0 for repetitive strings (a constant string has
c(n) = 2, so C = 2 log2(n) / n), English text bits about 0.74 at 10^3 and 0.35 at 10^5. C
depends on n: only compare values at the same n, and always report n.

Two implementations:

``lz76_phrase_count_reference``
    a transcription of the definition with Python strings; obviously correct, O(n^2) or worse.
``lz76_phrase_count``
    the same parse, exact, with each phrase's longest earlier match found by a galloping search
    of C-speed ``bytes.find`` calls instead of a per-bit loop. Short candidates (< 8 bits) are
    searched in a one-byte-per-bit string; longer ones in a string whose byte ``p`` packs bits
    ``p..p+7`` (an 8-bit sliding window), which turns a two-letter alphabet into a 256-letter
    one so the search skips ahead. Bits ``s[j:j+L]`` equal ``s[i:i+L]`` exactly when windows
    ``j..j+L-8`` equal windows ``i..i+L-8``, so the count is exact. Cost: a few searches of the
    seen prefix per phrase, roughly O(n^2 / log n) byte comparisons in C on random input, much
    less on text (see ``benchmarks/telemetry.py``).

Both accept ``window``: when given, an earlier occurrence must start at most ``window`` bits
before the phrase (``j >= i - window``). That bounds the cost to O(n * window / log window) but
is a sliding-window variant, not LZ76: its counts are larger and C is no longer the textbook
value. ``window=None`` (the default) is exact LZ76.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

__all__ = ["lz76_phrase_count", "lz76_phrase_count_reference", "lz76_phrases_reference",
           "normalised_complexity", "lz76_complexity", "as_bit_array"]

_WIDE = 8  # bits packed per byte of the sliding-window string


def as_bit_array(bits: Any) -> np.ndarray:
    """A 1-D uint8 numpy array of 0/1 from a numpy array, torch tensor, list or '0'/'1' string."""
    if isinstance(bits, str):
        if bits.strip("01"):
            raise ValueError("a bit string may contain only the characters '0' and '1'")
        return np.frombuffer(bits.encode("ascii"), dtype=np.uint8) - ord("0")
    if hasattr(bits, "detach"):  # torch tensor, without importing torch
        bits = bits.detach().cpu().numpy()
    arr = np.asarray(bits)
    if arr.ndim != 1:
        raise ValueError(f"LZ76 works on one bit sequence of shape (n,), got shape {arr.shape}; "
                         "call it once per row")
    if arr.size and (arr.dtype.kind not in "biu" or arr.min() < 0 or arr.max() > 1):
        raise ValueError(f"bits must hold only 0 and 1 (got dtype {arr.dtype}, "
                         f"values {arr.min()}..{arr.max()})")
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _check_window(window: Optional[int]) -> Optional[int]:
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be a positive number of bits or None (exact LZ76), "
                         f"got {window!r}")
    return int(window)


# -- reference --------------------------------------------------------------------------------
def lz76_phrases_reference(bits: Any, window: Optional[int] = None) -> list[str]:
    """The LZ76 phrases of ``bits`` as '0'/'1' strings, straight from the definition (slow).

    >>> lz76_phrases_reference("1001111011000010")
    ['1', '0', '01', '1110', '1100', '0010']
    """
    window = _check_window(window)
    s = "".join("1" if b else "0" for b in as_bit_array(bits).tolist())
    n = len(s)
    phrases = []
    i = 0
    while i < n:
        start = 0 if window is None else max(0, i - window)
        k = 1
        # Grow the phrase while it still occurs starting at some j in [start, i): such an
        # occurrence lies inside s[start : i + k - 1] (it may overlap the phrase itself).
        while i + k <= n and s[i:i + k] in s[start:i + k - 1]:
            k += 1
        phrases.append(s[i:i + k])  # k - 1 seen symbols + 1 new one, or cut short at the end
        i += k
    return phrases


def lz76_phrase_count_reference(bits: Any, window: Optional[int] = None) -> int:
    """c(n) by the plain definition: simple, obviously correct, and slow. For tests and benchmarks."""
    return len(lz76_phrases_reference(bits, window))


# -- fast -------------------------------------------------------------------------------------
def _window_bytes(a: np.ndarray, width: int) -> bytes:
    """Byte p = bits p..p+width-1 (MSB first), for p in 0..n-width."""
    m = a.size - width + 1
    codes = np.zeros(m, dtype=np.uint8)
    for k in range(width):
        codes = (codes << 1) | a[k:k + m]
    return codes.tobytes()


def lz76_phrase_count(bits: Any, window: Optional[int] = None) -> int:
    """c(n), the exact LZ76 phrase count of a bit sequence (fast: C-speed searches per phrase).

    ``bits``: 1-D numpy array, torch tensor, list of 0/1, or '0'/'1' string. ``window``: None
    for exact LZ76, or the farthest back (in bits) an earlier occurrence may start.
    """
    window = _check_window(window)
    a = as_bit_array(bits)
    n = int(a.size)
    if n == 0:
        return 0
    one_per_bit = a.tobytes()
    packed = _window_bytes(a, _WIDE) if n >= _WIDE else b""
    find_bits, find_packed = one_per_bit.find, packed.find
    w1 = _WIDE - 1

    def earliest(i: int, length: int, start: int) -> int:
        """First j in [start, i) with bits[j:j+length] == bits[i:i+length], or -1."""
        if length < _WIDE:
            return find_bits(one_per_bit[i:i + length], start, i + length - 1)
        # windows i..i+length-8 of `packed` cover exactly bits i..i+length-1
        return find_packed(packed[i:i + length - w1], start, i + length - _WIDE)

    count = 0
    i = 0
    guess = 1  # phrase lengths change slowly: start the search at the previous match length
    while i < n:
        rest = n - i  # the match cannot run past the end
        lo = 0 if window is None else max(0, i - window)
        # Invariant: bits[i:i+seen] occur first at j >= lo (j < i); length `fail` does not occur.
        seen, j, fail = 0, lo, rest + 1
        first = min(guess, rest)
        p = earliest(i, first, j) if i > 0 else -1
        if p >= 0:
            seen, j = first, p
            step = 1
            while seen < rest:  # gallop upwards: +1, +2, +4, ...
                length = min(seen + step, rest)
                p = earliest(i, length, j)  # a longer match cannot occur before the shorter
                if p < 0:
                    fail = length
                    break
                seen, j = length, p
                step *= 2
        else:
            fail = first if i > 0 else 1
        while fail - seen > 1:  # binary search between the longest hit and the shortest miss
            mid = (seen + fail) // 2
            p = earliest(i, mid, j)
            if p >= 0:
                seen, j = mid, p
            else:
                fail = mid
        count += 1
        i += seen + 1  # seen symbols + one new one (past the end for the last, cut-short phrase)
        guess = max(1, seen)
    return count


# -- normalisation ----------------------------------------------------------------------------
def normalised_complexity(count: int, n: int) -> float:
    """C = c(n) * log2(n) / n; 0 for n <= 1 (log2(1) = 0: nothing to measure)."""
    if n <= 1:
        return 0.0
    return count * math.log2(n) / n


def lz76_complexity(bits: Any, window: Optional[int] = None) -> float:
    """Normalised LZ76 complexity C of one bit sequence, with n = its length."""
    a = as_bit_array(bits)
    return normalised_complexity(lz76_phrase_count(a, window), int(a.size))
