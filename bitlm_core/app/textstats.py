"""How English-like is generated text? The share of its words that occur in the training text.

A word is a run of ASCII letters and apostrophes. A model that has learnt spelling writes mostly
words it has seen; one that has not writes mostly new letter strings. The share says nothing
about grammar or sense, only about spelling, which is what small models learn first.
"""

from __future__ import annotations

import re

WORD = re.compile(rb"[A-Za-z']+")


def vocabulary(text: bytes) -> set[bytes]:
    """The set of words in ``text``."""
    return set(WORD.findall(text))


def word_share(text: bytes, vocab: set[bytes]) -> float | None:
    """Share of the words of ``text`` found in ``vocab``; None when ``text`` has no words."""
    words = WORD.findall(text)
    return sum(w in vocab for w in words) / len(words) if words else None
