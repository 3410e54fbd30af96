"""The stream format of ``bitlm compress``: a small JSON header, then the coder's words.

Layout::

    b"BLMZ"  version (1 byte)  header length (4 bytes, big-endian)  header (UTF-8 JSON)
    payload: the range coder's 32-bit words, little-endian

The header says what decoding needs and how to check it: the original ``length`` and its
``sha256`` (verified after decoding), the ``model`` fingerprint (a digest of the weights:
decoding with another model is refused before it starts), the ``run`` folder and checkpoint
``step`` that compressed it, the ``segment`` length, the probability ``precision``, the
``adapt`` settings of online adaptation (or null), the ``environment`` the probabilities
were computed in (torch build, threads, CPU), and the payload's length in ``words`` and its
SHA-256 (``payload``), checked before anything is decoded. Everything read is bounded and checked first:
a stream that is not one, is truncated, or claims more than a caller allows is one
:class:`~bitlm_core.errors.CodecError`. Nothing is evaluated; JSON is parsed as data.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from bitlm_core.errors import CodecError

MAGIC = b"BLMZ"
VERSION = 1
PREFIX = len(MAGIC) + 1 + 4
MAX_HEADER = 16 << 10  # bytes of JSON a stream may carry
MAX_LENGTH = 1 << 40  # bytes a header may claim (a caller's own limit is usually far lower)
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class StreamHeader:
    length: int
    sha256: str
    model: str
    segment: int
    precision: int = 16
    run: str = ""
    step: int = 0
    adapt: Optional[dict[str, Any]] = None
    environment: dict[str, Any] = field(default_factory=dict)
    coder: str = "range32"
    words: int = 0  # 32-bit words of payload
    payload: str = "0" * 64  # their SHA-256: a truncated or damaged stream is found at once

    def to_bytes(self) -> bytes:
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        if len(text) > MAX_HEADER:
            raise CodecError(f"the stream header would take {len(text):,} bytes, more than "
                             f"{MAX_HEADER:,}; use a shorter run path")
        return MAGIC + bytes([VERSION]) + len(text).to_bytes(4, "big") + text


def _check(cond: bool, source: str, what: str) -> None:
    if not cond:
        raise CodecError(f"{source}: the stream header is damaged ({what})")


def read_header(blob: bytes, source: str = "stream") -> tuple[StreamHeader, int]:
    """The header at the start of ``blob`` and where the payload starts; a CodecError naming
    ``source`` when it is not a bitlm stream or its header is damaged."""
    if len(blob) < PREFIX or blob[:len(MAGIC)] != MAGIC:
        raise CodecError(f"{source} is not a bitlm stream (it does not start with "
                         f"{MAGIC.decode()}); give a file written by `bitlm compress`")
    version = blob[len(MAGIC)]
    if version != VERSION:
        raise CodecError(f"{source} is a bitlm stream of format version {version}; this "
                         f"bitlm reads version {VERSION}")
    size = int.from_bytes(blob[len(MAGIC) + 1:PREFIX], "big")
    _check(size <= MAX_HEADER, source, f"it claims {size:,} bytes of header")
    _check(len(blob) >= PREFIX + size, source, "it is truncated")
    try:
        raw = json.loads(blob[PREFIX:PREFIX + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CodecError(f"{source}: the stream header is damaged (not JSON)") from None
    _check(isinstance(raw, dict), source, "not an object")
    names = {f for f in StreamHeader.__dataclass_fields__}
    _check(set(raw) == names, source, "unexpected or missing fields")
    ints = {"length": MAX_LENGTH, "segment": MAX_LENGTH, "precision": 30, "step": 1 << 62,
            "words": MAX_LENGTH}
    for key, top in ints.items():
        v = raw[key]
        _check(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= top, source, key)
    _check(raw["segment"] >= 1 and raw["precision"] >= 2, source, "segment or precision")
    for key, n in (("sha256", 64), ("model", 32), ("payload", 64)):
        _check(isinstance(raw[key], str) and len(raw[key]) == n
               and _HEX.fullmatch(raw[key]) is not None, source, key)
    _check(isinstance(raw["run"], str) and isinstance(raw["coder"], str), source, "run or coder")
    _check(isinstance(raw["environment"], dict) and len(raw["environment"]) <= 16
           and all(isinstance(v, (str, int)) and not isinstance(v, bool)
                   for v in raw["environment"].values()), source, "environment")
    adapt = raw["adapt"]
    if adapt is not None:
        _check(isinstance(adapt, dict) and set(adapt) == {"every", "lr", "steps"}, source,
               "adapt")
        _check(isinstance(adapt["every"], int) and not isinstance(adapt["every"], bool)
               and 1 <= adapt["every"] <= 1 << 20, source, "adapt.every")
        _check(isinstance(adapt["steps"], int) and not isinstance(adapt["steps"], bool)
               and 1 <= adapt["steps"] <= 8, source, "adapt.steps")
        _check(isinstance(adapt["lr"], (int, float)) and not isinstance(adapt["lr"], bool)
               and 0 < adapt["lr"] < 1, source, "adapt.lr")
    return StreamHeader(**raw), PREFIX + size
