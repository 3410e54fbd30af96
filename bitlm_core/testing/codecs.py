"""Contract checks for codecs (``bitlm_compressors``): call them from any codec's tests.

One call checks everything a codec promises::

    from bitlm_core.testing import check_codec_contract

    def test_contract():
        report = check_codec_contract(MyCodec(), max_examples=1000)
        assert report["round_trips"] >= 1000

What is checked:

* **Round trips** (hypothesis): random, sparse, constant, alternating and long-run inputs, as
  ``torch.uint8`` and ``torch.bool``; the output has the input's dtype and values.
* **Determinism**: compressing the same input twice gives the same bytes, and does not modify
  the input.
* **The decompression limit**: a stream of ``n`` bits decodes with ``max_bits=n`` and raises
  :class:`~bitlm_core.errors.CodecError` with ``max_bits=n-1``.
* **Batches** (when the codec has ``compress_batch``/``decompress_batch``): ragged lists of 1-D
  tensors and 2-D tensors round-trip row by row.
* **Bad input**: values other than 0/1, float tensors and 2-D input to ``compress`` raise a
  :class:`~bitlm_core.errors.BitlmError` (``BitsError`` or ``CodecError``).
* **Hostile streams**: every truncation of a few valid streams raises ``CodecError``; bit
  flips, overwritten bytes, huge declared lengths, trailing garbage and random bytes either
  raise ``CodecError`` or decode to a valid bit tensor within ``max_bits``. Never another
  exception, never longer than a time limit, and never more numpy memory than a bound linear
  in the stream size and ``max_bits`` (measured with :mod:`tracemalloc`, which sees numpy
  allocations; memory torch allocates itself is not seen). With ``strict_corruption=True``
  (for codecs with a checksum) every mutated stream must raise ``CodecError``; with a
  ``resign`` function every mutation is also decoded with its checksum made right again, so
  the parser behind the checksum is fuzzed too.
* **A decompression bomb**: a small valid stream of many bits must be refused under
  ``max_bits`` without allocating them.

Hypothesis runs derandomized and without an example database, so a failure reproduces on
every run and nothing is written to the working directory.
"""

from __future__ import annotations

import signal
import threading
import time
import tracemalloc
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitlm_core.errors import BitlmError, CodecError
from bitlm_core.testing.strategies import any_bit_arrays, bit_batches

__all__ = [
    "check_codec_roundtrip",
    "check_codec_batch_roundtrip",
    "check_codec_rejects_bad_input",
    "check_decode_is_safe",
    "check_hostile_streams",
    "check_codec_contract",
    "codec_edge_cases",
    "stream_mutations",
]

DECODE_TIMEOUT = 5.0  # seconds any single decode may take on a hostile stream
HOSTILE_MAX_BITS = 1 << 16


# -- helpers ------------------------------------------------------------------------------

def _tensor(bits: Any, as_bool: bool = False):
    """numpy or torch bits -> a fresh 1-D (or 2-D) torch tensor of uint8 or bool."""
    import torch

    if isinstance(bits, torch.Tensor):
        t = bits.detach().cpu().to(torch.uint8).clone()
    else:
        t = torch.from_numpy(np.array(bits, dtype=np.uint8, copy=True))
    return t.bool() if as_bool else t


def _describe(data: bytes, limit: int = 48) -> str:
    head = bytes(data[:limit]).hex()
    return f"{len(data)} bytes: {head}{'...' if len(data) > limit else ''}"


def _has_batch(codec: Any) -> bool:
    return callable(getattr(codec, "compress_batch", None)) and callable(
        getattr(codec, "decompress_batch", None))


@contextmanager
def _watchdog(seconds: float) -> Iterator[None]:
    """Interrupt Python-level code that runs longer than ``seconds`` (POSIX main thread only).

    Numpy's C loops cannot be interrupted; the caller also compares the elapsed time.
    """
    usable = (hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"decoding took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _check_bits_result(out: Any, where: str) -> int:
    """A decoded value must be a 1-D uint8/bool tensor of 0s and 1s; returns its length."""
    import torch

    assert isinstance(out, torch.Tensor), f"{where}: decoded to {type(out).__name__}, not a tensor"
    assert out.dtype in (torch.uint8, torch.bool), f"{where}: decoded dtype {out.dtype}"
    assert out.dim() == 1, f"{where}: decoded shape {tuple(out.shape)}, expected (L,)"
    if out.dtype == torch.uint8 and out.numel():
        assert int(out.max()) <= 1, f"{where}: decoded values other than 0 and 1"
    return out.numel()


# -- round trips --------------------------------------------------------------------------

def check_codec_roundtrip(codec: Any, bits: Any, as_bool: bool | None = None) -> bytes:
    """Round-trip one 1-D sequence and check determinism, dtype and the ``max_bits`` limit.

    ``bits``: numpy array or torch tensor of 0/1. ``as_bool``: check torch.bool only (True),
    torch.uint8 only (False), or both (None). Returns the stream of the last dtype checked.
    """
    import torch

    data = b""
    for use_bool in ((False, True) if as_bool is None else (as_bool,)):
        x = _tensor(bits, use_bool)
        before = x.clone()
        n = x.numel()
        data = codec.compress(x)
        assert isinstance(data, bytes), (
            f"{codec.name}.compress returned {type(data).__name__}, expected bytes")
        assert torch.equal(x, before), f"{codec.name}.compress modified its input"
        again = codec.compress(x)
        assert again == data, f"{codec.name}.compress is not deterministic on {n} bits"
        out = codec.decompress(data, max_bits=n)
        assert isinstance(out, torch.Tensor), f"{codec.name}.decompress returned {type(out)}"
        assert out.dtype == x.dtype, (
            f"{codec.name} round trip changed dtype {x.dtype} -> {out.dtype}")
        assert tuple(out.shape) == (n,), (
            f"{codec.name} round trip changed shape ({n},) -> {tuple(out.shape)}")
        if not torch.equal(out, x):
            bad = int((out.to(torch.uint8) != x.to(torch.uint8)).nonzero()[0][0])
            raise AssertionError(f"{codec.name} round trip of {n} bits differs first at bit "
                                 f"{bad}")
        if n:
            try:
                codec.decompress(data, max_bits=n - 1)
            except CodecError:
                pass
            else:
                raise AssertionError(f"{codec.name}.decompress decoded {n} bits with "
                                     f"max_bits={n - 1}: the limit is not enforced")
    return data


def check_codec_batch_roundtrip(codec: Any, rows: list, as_bool: bool = False) -> bytes | None:
    """Round-trip a ragged batch (and, if the rows have one length, the 2-D tensor of them).

    Returns the batch stream, or None when the codec has no batch API.
    """
    import torch

    if not _has_batch(codec):
        return None
    xs = [_tensor(r, as_bool) for r in rows]
    total = sum(x.numel() for x in xs)
    data = codec.compress_batch(xs)
    assert isinstance(data, bytes), f"{codec.name}.compress_batch returned {type(data)}"
    assert codec.compress_batch(xs) == data, f"{codec.name}.compress_batch is not deterministic"
    outs = codec.decompress_batch(data, max_bits=total)
    assert len(outs) == len(xs), (
        f"{codec.name} batch round trip returned {len(outs)} rows for {len(xs)}")
    for i, (out, x) in enumerate(zip(outs, xs)):
        assert out.dtype == x.dtype, f"{codec.name} batch row {i}: dtype {out.dtype} != {x.dtype}"
        assert torch.equal(out, x), f"{codec.name} batch row {i} ({x.numel()} bits) differs"
    if total:
        try:
            codec.decompress_batch(data, max_bits=total - 1)
        except CodecError:
            pass
        else:
            raise AssertionError(f"{codec.name}.decompress_batch decoded {total} bits with "
                                 f"max_bits={total - 1}: the limit is not enforced")
    if xs and len({x.numel() for x in xs}) == 1:
        square = torch.stack(xs)
        outs = codec.decompress_batch(codec.compress_batch(square), max_bits=total)
        assert len(outs) == len(xs) and all(torch.equal(o, x) for o, x in zip(outs, xs)), (
            f"{codec.name} batch round trip of a 2-D tensor {tuple(square.shape)} failed")
    return data


def codec_edge_cases() -> list[np.ndarray]:
    """Small and awkward inputs every codec should get right (lengths around byte edges...)."""
    cases = [np.zeros(n, np.uint8) for n in (0, 1, 7, 8, 9, 63, 64, 65)]
    cases += [np.ones(n, np.uint8) for n in (1, 7, 8, 9, 127, 128, 129, 16383, 16384, 16385)]
    cases += [(np.arange(n) % 2).astype(np.uint8) for n in (2, 3, 15, 16, 17, 1000)]
    rng = np.random.default_rng(12345)
    cases += [rng.integers(0, 2, n, dtype=np.uint8) for n in (5, 100, 4099)]
    cases.append(np.repeat(np.array([0, 1, 0, 1], np.uint8), [1, 127, 128, 1 << 15]))
    cases.append(np.repeat(np.array([1, 0, 1], np.uint8), [1 << 20, 1, 1 << 14]))
    return cases


# -- bad input ----------------------------------------------------------------------------

def check_codec_rejects_bad_input(codec: Any) -> None:
    """Non-bit tensors and 2-D input to ``compress`` raise a BitlmError (BitsError/CodecError)."""
    import torch

    bad_inputs = {
        "a value of 2": torch.tensor([0, 1, 2], dtype=torch.uint8),
        "a float tensor": torch.tensor([0.0, 1.0]),
        "a 2-D tensor": torch.zeros(2, 3, dtype=torch.uint8),
    }
    for what, x in bad_inputs.items():
        try:
            codec.compress(x)
        except BitlmError:
            continue
        except Exception as exc:  # noqa: BLE001 - the point is to report the wrong type
            raise AssertionError(f"{codec.name}.compress raised {type(exc).__name__} on "
                                 f"{what}; expected BitsError or CodecError") from exc
        raise AssertionError(f"{codec.name}.compress accepted {what}")


# -- hostile streams ----------------------------------------------------------------------

def check_decode_is_safe(codec: Any, data: bytes, max_bits: int = HOSTILE_MAX_BITS,
                         batch: bool = False, must_fail: bool = False,
                         timeout: float = DECODE_TIMEOUT, what: str = "stream") -> bool:
    """Decode a possibly hostile stream; return True if it raised CodecError.

    Fails (AssertionError) on any other exception, on a result that is not valid bits within
    ``max_bits``, on a decode slower than ``timeout`` seconds, or, with ``must_fail``, on any
    successful decode.
    """
    decode = codec.decompress_batch if batch else codec.decompress
    where = f"{codec.name}.{'decompress_batch' if batch else 'decompress'} on {what} " \
            f"({_describe(data)})"
    start = time.perf_counter()
    try:
        with _watchdog(timeout):
            out = decode(data, max_bits=max_bits)
    except CodecError:
        failed = True
    except Exception as exc:  # noqa: BLE001 - any other type is the bug being looked for
        raise AssertionError(f"{where} raised {type(exc).__name__}: {exc}; a bad stream must "
                             "raise CodecError") from exc
    else:
        failed = False
        if must_fail:
            raise AssertionError(f"{where} decoded without error; a corrupted stream must "
                                 "raise CodecError")
        rows = out if batch else [out]
        assert isinstance(rows, list), f"{where}: decompress_batch returned {type(rows)}"
        total = sum(_check_bits_result(r, where) for r in rows)
        assert total <= max_bits, f"{where}: decoded {total} bits, over max_bits={max_bits}"
    elapsed = time.perf_counter() - start
    assert elapsed <= timeout, f"{where} took {elapsed:.1f} s (limit {timeout} s)"
    return failed


def stream_mutations(data: bytes, rng: np.random.Generator, n_random: int = 64
                     ) -> Iterator[tuple[str, bytes, bool]]:
    """Corrupted versions of a valid stream: (description, bytes, is_truncation).

    Truncations at every length (every length up to 512, else the first and last 256 and some
    in between), bit flips (every bit of the first 32 bytes, ``n_random`` more anywhere),
    bytes set to 0x00/0xFF/0x7F/0x80, 8-byte windows of 0xFF and of 0x7F..0xFF varint-style
    huge values at every offset of the first 32 bytes (huge declared lengths), trailing
    garbage, and the stream twice.
    """
    n = len(data)
    cuts = range(n) if n <= 512 else sorted(set(range(256)) | set(range(n - 256, n))
                                           | set(rng.integers(0, n, 64).tolist()))
    for k in cuts:
        yield f"truncation to {k} bytes", data[:k], True
    arr = np.frombuffer(data, dtype=np.uint8)
    head = min(n, 32)
    positions = [(i, b) for i in range(head) for b in range(8)]
    if n:
        positions += [(int(i), int(b)) for i, b in zip(rng.integers(0, n, n_random),
                                                         rng.integers(0, 8, n_random))]
    for i, b in positions:
        m = arr.copy()
        m[i] ^= 1 << b
        yield f"bit {b} of byte {i} flipped", m.tobytes(), False
    for i in range(head):
        for value in (0x00, 0xFF, 0x7F, 0x80):
            if arr[i] != value:
                m = arr.copy()
                m[i] = value
                yield f"byte {i} set to {value:#04x}", m.tobytes(), False
        for fill in (b"\xff" * 8, b"\xff" * 7 + b"\x7f", b"\xff\xff\xff\x7f"):
            m = bytearray(data)
            m[i:i + len(fill)] = fill
            m = bytes(m[:max(n, i + len(fill))])
            if m != data:
                yield f"huge value written at byte {i}", m, False
    yield "one trailing byte", data + b"\x00", False
    yield "trailing garbage", data + bytes(rng.integers(0, 256, 9, dtype=np.uint8)), False
    if n:
        yield "the stream twice", data + data, False


def _random_streams(valid: list[bytes], rng: np.random.Generator, count: int
                    ) -> Iterator[tuple[str, bytes]]:
    """Random bytes, and valid headers followed by random bytes."""
    for i in range(count):
        size = int(rng.integers(0, 96))
        yield f"random bytes #{i}", rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    for j, data in enumerate(valid):
        for keep in (4, 6, 8, 14, 16):
            tail = rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes()
            yield f"stream #{j}: first {keep} bytes + random tail", data[:keep] + tail


def _default_samples() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [
        np.zeros(0, np.uint8),
        rng.integers(0, 2, 77, dtype=np.uint8),
        (rng.random(3000) < 0.02).astype(np.uint8),
        np.repeat(np.array([1, 0, 1, 0], np.uint8), [300, 5, 20000, 1]),
        (np.arange(40) % 2).astype(np.uint8),
    ]


BOMB_BITS = 1 << 24  # the decompression bomb: this many zero bits, compressed


def check_hostile_streams(codec: Any, samples: list | None = None, seed: int = 0,
                          max_bits: int = HOSTILE_MAX_BITS, strict_corruption: bool = False,
                          random_streams: int = 200, timeout: float = DECODE_TIMEOUT,
                          memory_factor: int = 64,
                          resign: Callable[[bytes], bytes] | None = None) -> dict[str, int]:
    """Fuzz ``decompress`` (and ``decompress_batch``) with corrupted and random streams.

    Truncations must raise CodecError; other corruptions must raise CodecError or decode to
    valid bits within ``max_bits`` (with ``strict_corruption``, must raise). A decompression
    bomb (a valid stream of ``BOMB_BITS`` zero bits, when the codec makes it smaller than its
    bits) must raise CodecError within the memory bound. Peak numpy memory per decode stays
    under ``memory_factor * (len(stream) + max_bits) + 1 MiB``.

    ``resign(stream) -> stream``, for a format with a checksum, makes a mutated stream's
    checksum right again: each mutation is then also decoded re-signed, which reaches the
    parser behind the checksum (it must still raise CodecError or decode to valid bits).
    Returns counts: decodes tried, how many raised CodecError.
    """
    import torch

    rng = np.random.default_rng(seed)
    samples = _default_samples() if samples is None else samples
    for s in samples:
        assert np.asarray(s).size <= max_bits, "hostile-stream samples must fit in max_bits"
    streams: list[tuple[bytes, bool]] = [(codec.compress(_tensor(s, i % 2 == 1)), False)
                                         for i, s in enumerate(samples)]
    if _has_batch(codec):
        rows = [_tensor(s) for s in samples[:3]]
        streams.append((codec.compress_batch(rows), True))
        streams.append((codec.compress_batch([]), True))
        streams.append((codec.compress_batch(torch.zeros(3, 5, dtype=torch.uint8)), True))
    counts = {"decodes": 0, "codec_errors": 0}
    started = tracemalloc.is_tracing()
    if not started:
        tracemalloc.start()
    try:
        def safe(data: bytes, batch: bool, what: str, must_fail: bool) -> None:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            failed = check_decode_is_safe(codec, data, max_bits, batch, must_fail, timeout,
                                          what)
            peak = tracemalloc.get_traced_memory()[1] - base
            bound = memory_factor * (len(data) + max_bits) + (1 << 20)
            assert peak <= bound, (f"{codec.name} used {peak} bytes of numpy memory decoding "
                                   f"{what} ({len(data)} bytes, max_bits={max_bits}); bound "
                                   f"{bound}")
            counts["decodes"] += 1
            counts["codec_errors"] += failed

        for j, (data, batch) in enumerate(streams):
            for what, mutated, truncated in stream_mutations(data, rng):
                safe(mutated, batch, f"stream #{j}: {what}", truncated or strict_corruption)
                if resign is not None and not truncated:
                    safe(resign(mutated), batch, f"stream #{j}: {what}, re-signed", False)
        bomb = codec.compress(torch.zeros(BOMB_BITS, dtype=torch.uint8))
        if 8 * len(bomb) < BOMB_BITS:  # the codec makes it small: a bomb for max_bits
            safe(bomb, False, f"a decompression bomb ({BOMB_BITS} zero bits in {len(bomb)} "
                              "bytes)", True)
        singles = [d for d, b in streams if not b]
        for what, data in _random_streams(singles, rng, random_streams):
            safe(data, False, what, False)
            if _has_batch(codec):
                safe(data, True, what, False)
    finally:
        if not started:
            tracemalloc.stop()
    return counts


# -- everything ---------------------------------------------------------------------------

def check_codec_contract(codec: Any, max_examples: int = 200, batch_examples: int | None = None,
                         max_size: int = 4096, fuzz: bool = True,
                         strict_corruption: bool = False, seed: int = 0,
                         resign: Callable[[bytes], bytes] | None = None) -> dict[str, int]:
    """Run every codec check; return counts of what ran.

    ``max_examples`` hypothesis round trips of single sequences (each as uint8 or bool, drawn),
    ``batch_examples`` ragged batch round trips (default ``max_examples // 4``; skipped if the
    codec has no batch API), the fixed edge cases, bad-input checks, and (``fuzz``) the hostile
    stream checks of :func:`check_hostile_streams` (with ``resign``, see there).
    """
    missing = [a for a in ("name", "magic", "compress", "decompress") if not hasattr(codec, a)]
    assert not missing, (f"{type(codec).__name__} does not look like a Compressor: it has no "
                         f"{', '.join(missing)} (see bitlm_core.interfaces.Compressor)")
    assert isinstance(codec.name, str) and codec.name, "a codec needs a non-empty name"
    report = {"round_trips": 0, "batch_round_trips": 0, "edge_cases": 0}

    for bits in codec_edge_cases():
        check_codec_roundtrip(codec, bits)
        report["edge_cases"] += 1

    common = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                  suppress_health_check=list(HealthCheck))

    @settings(max_examples=max_examples, **common)
    @given(bits=any_bit_arrays(max_size=max_size), as_bool=st.booleans())
    def round_trip(bits: np.ndarray, as_bool: bool) -> None:
        check_codec_roundtrip(codec, bits, as_bool)
        report["round_trips"] += 1

    round_trip()

    if _has_batch(codec):
        n_batch = max(1, max_examples // 4) if batch_examples is None else batch_examples

        @settings(max_examples=max(1, n_batch), **common)
        @given(rows=bit_batches(), as_bool=st.booleans())
        def batch_round_trip(rows: list, as_bool: bool) -> None:
            check_codec_batch_roundtrip(codec, rows, as_bool)
            report["batch_round_trips"] += 1

        if n_batch:
            batch_round_trip()

    check_codec_rejects_bad_input(codec)
    if fuzz:
        report.update(check_hostile_streams(codec, seed=seed,
                                            strict_corruption=strict_corruption,
                                            resign=resign))
    return report
