"""What ``bitlm codec`` does: find a stream's codec, measure codecs on a file's bits."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from bitlm_core.errors import CodecError
from bitlm_core.registry import get_registry


def installed_codecs(options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Every installed compressor, built with its defaults (plus ``options`` where accepted)."""
    reg = get_registry()
    codecs = {}
    for name in reg.names("compressor"):
        codecs[name] = reg.build("compressor", name, options, path=f"compressor '{name}'")
    return codecs


def codec_for_stream(data: bytes, codecs: dict[str, Any]) -> Any:
    """The installed codec whose ``magic`` starts ``data``, or a CodecError listing them."""
    for codec in codecs.values():
        magic = getattr(codec, "magic", None)
        if magic and data[: len(magic)] == magic:
            return codec
    known = ", ".join(f"{name} ({getattr(c, 'magic', b'?')!r})" for name, c in codecs.items())
    raise CodecError(f"no installed codec recognises this stream (it starts with "
                     f"{data[:4]!r}); installed codecs and their magic bytes: {known}. Is the "
                     "plugin that wrote it installed?")


def _best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def measure_codec(codec: Any, bits: Any, repeats: int = 3) -> dict[str, Any]:
    """Ratio (input bits over output bits) and best-of-``repeats`` encode/decode speeds."""
    import torch

    n = int(bits.numel())
    enc_s, stream = _best_time(lambda: codec.compress(bits), repeats)
    dec_s, restored = _best_time(lambda: codec.decompress(stream, max_bits=n), repeats)
    if not torch.equal(restored.to(torch.uint8), bits):
        raise CodecError(f"codec '{codec.name}' did not round-trip these bits; it is broken")
    out_bits = 8 * len(stream)
    return {"codec": codec.name, "input_bits": n, "output_bits": out_bits,
            "ratio": n / out_bits if out_bits else float("inf"), "expands": out_bits > n,
            "encode_bits_per_s": n / enc_s if enc_s > 0 else float("inf"),
            "decode_bits_per_s": n / dec_s if dec_s > 0 else float("inf")}
