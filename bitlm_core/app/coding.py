"""The model as a compressor: the probability of every coded bit, for an entropy coder.

A text of ``n`` bytes is cut into segments of ``segment`` bytes (the last one shorter), coded
side by side as the rows of one batch, each from an empty context. Frame ``t`` of every
segment is coded at once. When the local predictor scores whole frames (``joint``), the
model's key/value-cached decoder gives the distribution of the next byte
(:func:`quantize_frames`: 256 integer weights, each at least 1, out of ``2**24``) and the coder
codes the byte with it: the chain rule of the bits' probabilities, taken in one piece. Else
it goes bit by bit: the probability of the next bit (:func:`quantize`: an integer out of
``2**16``, clamped away from 0 and 1). The coder codes the real symbol (compressing) or reads
it back (decompressing), and it is pushed into the decoder. Compressor and decompressor run
this one function, :func:`code_segments`, with the same model, so they compute the same
probabilities bit for bit; floating-point differences between a batched and an incremental
forward cannot arise, because there is no batched forward. A parity bit (``parity9``) is not
coded: it follows from the data bits.

Online adaptation (:class:`Adapt`): after every ``every`` frames, both sides take the same
optimizer steps on the windows coded so far (the latest ``max_frames`` bytes of every
segment), and the decoder is primed again with the changed weights. Floating-point results
depend on the machine, static coding's too (adaptation only makes a difference grow): the
torch build, the thread count and the CPU must match between the two sides
(:func:`environment`, recorded in a stream's header).

:func:`code_length` counts, without writing anything, the bits a coder needs for a text: the
sum of ``-log2`` of the quantised probabilities of its coded bits. An arithmetic (range) coder
comes within a few bytes of it. The stream format is :mod:`bitlm_core.store.stream`; the coder
and the ``compress`` / ``decompress`` commands are the ``bitlm-compress`` plugin's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import numpy as np

from bitlm_core.errors import BitlmError, CodecError, DataError

PRECISION = 16  # bits of each coded bit's probability
ONE = 1 << PRECISION
FRAME_PRECISION = 24  # bits of the total of a coded byte's 256 probabilities
FRAME_ONE = 1 << FRAME_PRECISION
CODER = f"range32/bits{PRECISION}/bytes{FRAME_PRECISION}"  # a stream's coder and quantisation
DEFAULT_SEGMENT = 4096  # bytes per segment (BENCHMARKS.md, The model as a compressor)
MAX_SEGMENTS = 1 << 20  # segments side by side (a stream's header is checked against it)


@dataclass(frozen=True)
class Adapt:
    """Online adaptation: ``steps`` AdamW steps of learning rate ``lr`` after every ``every``
    frames, on the windows coded so far."""

    every: int = 64
    lr: float = 5e-4
    steps: int = 1

    def to_dict(self) -> dict:
        return {"every": self.every, "lr": self.lr, "steps": self.steps}


class BitCoder(Protocol):
    def __call__(self, q: np.ndarray, bits: Optional[np.ndarray]) -> np.ndarray:
        """Code ``bits`` (compressing; int 0/1 per row) with probabilities of a 1 of
        ``q / ONE``, or read them back (decompressing: ``bits`` is None); return the bits."""

    def frames(self, q: np.ndarray, symbols: Optional[np.ndarray]) -> np.ndarray:
        """The same for whole bytes: ``q`` (n, 256) integer weights of each byte value (each
        at least 1), ``symbols`` (n,) the bytes."""


def quantize_frames(log_probs, value_of_byte) -> np.ndarray:
    """(B, V) log-probabilities of frame values -> (B, 256) int64 weights of the byte values,
    each at least 1, summing to at most :data:`FRAME_ONE`."""
    import torch

    p = torch.softmax(log_probs[:, value_of_byte], dim=-1).double().nan_to_num(1 / 256)
    return (torch.floor(p * (FRAME_ONE - 256)) + 1).to(torch.int64).cpu().numpy()


def quantize(logits) -> np.ndarray:
    """(B, 2) logits -> (B,) int64 probabilities of a 1, out of :data:`ONE`, in [1, ONE-1]."""
    import torch

    p = torch.softmax(logits.float(), dim=-1)[:, 1].double().nan_to_num(0.5)
    return torch.clamp(torch.round(p * ONE), 1, ONE - 1).to(torch.int64).cpu().numpy()


def fingerprint(model) -> str:
    """A digest of what the model computes: its config, its attention backend and its weights
    (names, dtypes, shapes and values): 32 hex digits."""
    import json

    import torch

    backend = model.blocks[0].attn.backend
    h = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True, default=str).encode())
    h.update(f"{type(backend).__module__}.{type(backend).__qualname__}:"
             f"{getattr(backend, 'name', '')};".encode())
    for name, value in sorted(model.state_dict().items()):
        for part, t in _state_parts(name, value):
            if t is None:  # not a tensor (an integer layer's dtype): its name and value
                h.update(f"{part};".encode())
                continue
            t = t.detach().cpu().contiguous().view(-1)
            h.update(f"{part}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _state_parts(name: str, value):
    """(name, plain tensor) pairs of one state-dict entry: itself for a float tensor; the
    integers, scales and zero points of a quantized one; each item of a tuple (the packed
    weights of an int8 inference layer); (``name=value``, None) for anything else."""
    import torch

    if isinstance(value, torch.Tensor):
        if not value.is_quantized:
            yield name, value
            return
        yield f"{name}.int", value.int_repr()
        if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            yield f"{name}.scales", value.q_per_channel_scales()
            yield f"{name}.zero_points", value.q_per_channel_zero_points()
        else:
            yield f"{name}.scales", torch.tensor([value.q_scale()], dtype=torch.float64)
            yield f"{name}.zero_points", torch.tensor([value.q_zero_point()])
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _state_parts(f"{name}.{i}", item)
    else:
        yield f"{name}={value}", None


def environment() -> dict[str, str | int]:
    """What floating-point results depend on: the torch build, its thread count, the CPU."""
    import platform

    import torch

    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "cpu": _cpu_name()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()[:100]
    except OSError:
        pass
    import platform

    return (platform.processor() or platform.machine())[:100]


class FrameTable:
    """The frame of every byte value under a run's encoder, and back.

    ``determined`` says whether a frame's last bit follows from the others (``parity9``: even
    parity), so that it need not be coded.
    """

    def __init__(self, encoder, frame_bits: int):
        frames = np.asarray(encoder.encode_np(bytes(range(256))), dtype=np.uint8)
        if frames.size != 256 * frame_bits:
            raise BitlmError(f"the run's encoder {getattr(encoder, 'name', '?')!r} does not give "
                             f"each byte one {frame_bits}-bit frame; the model cannot code bytes")
        self.bits = frames.reshape(256, frame_bits)
        self.Fb = frame_bits
        place = 1 << np.arange(frame_bits - 1, -1, -1)
        values = self.bits.astype(np.int64) @ place
        if len(set(values.tolist())) != 256:
            raise BitlmError("the run's encoder gives two bytes the same frame")
        self.byte_of = np.full(1 << frame_bits, -1, dtype=np.int64)
        self.byte_of[values] = np.arange(256)
        self.place = place
        self.determined = bool(frame_bits > 1 and np.array_equal(
            self.bits[:, -1], self.bits[:, :-1].sum(axis=1) % 2))

    def coded_bits(self) -> int:
        return self.Fb - int(self.determined)

    def value_of_byte(self, values: int):
        """Index of each byte among ``values`` frame values scored by a local predictor (its
        first ``log2(values)`` bits, MSB first), or None when those do not make the frame."""
        import torch

        n = values.bit_length() - 1
        if values != 1 << n or not (n == self.Fb or (n == self.Fb - 1 and self.determined)):
            return None
        index = self.bits[:, :n].astype(np.int64) @ (1 << np.arange(n - 1, -1, -1))
        if len(set(index.tolist())) != 256:
            return None
        return torch.from_numpy(index)

    def to_bytes(self, frames: np.ndarray) -> np.ndarray:
        """(N, Fb) frames -> (N,) byte values; a CodecError if one is no byte's frame."""
        values = self.byte_of[frames.astype(np.int64) @ self.place]
        if (values < 0).any():
            raise CodecError("the stream decodes to bits that are no byte's frame: it is "
                             "damaged, or was written by another model")
        return values.astype(np.uint8)


def segment_lengths(n: int, segment: int) -> np.ndarray:
    """Bytes in each segment of a text of ``n`` bytes: ``segment`` each, the last shorter."""
    if segment < 1:
        raise ValueError("segment must be at least 1 byte")
    count = -(-n // segment)
    if count > MAX_SEGMENTS:
        raise CodecError(f"{n:,} bytes in segments of {segment:,} make {count:,} segments, more "
                         f"than the {MAX_SEGMENTS:,} that can be coded side by side; "
                         "compress with a longer --segment")
    lengths = np.full(count, segment, dtype=np.int64)
    if count:
        lengths[-1] = n - segment * (count - 1)
    return lengths


MAX_DECODER_BYTES = 2 << 30  # memory the side-by-side segments' key/value caches may take
ADAPT_ROWS = 64  # windows per forward pass of an adaptation step (their gradients add up)


def check_segments(model, rows: int, segment: int) -> None:
    """A CodecError when ``rows`` segments side by side would need more memory for the
    decoder's key/value caches than :data:`MAX_DECODER_BYTES` (a stream's header says how many
    there are: it is checked before anything is allocated)."""
    cfg = model.cfg
    positions = cfg.max_positions  # the flat layout caches one position per bit
    per_row = 4 * cfg.n_layers * 2 * positions * cfg.d_model + 64 * positions
    if rows * per_row > MAX_DECODER_BYTES:
        most = max(1, MAX_DECODER_BYTES // per_row)
        raise CodecError(f"{rows:,} segments of {segment:,} bytes side by side would need "
                         f"{rows * per_row / 2**30:,.1f} GiB for the model's caches (at most "
                         f"{most:,} segments fit in {MAX_DECODER_BYTES / 2**30:.0f} GiB); "
                         "compress with a longer --segment")


def code_segments(model, table: FrameTable, lengths: np.ndarray, coder: BitCoder,
                  data: Optional[bytes] = None, adapt: Optional[Adapt] = None,
                  progress: Optional[Callable[[int, int], None]] = None) -> bytes:
    """Code the segments of ``lengths`` bytes through ``coder`` (see the module's docs) and
    return their bytes, in order: ``data`` itself when compressing, what the coder read when
    decompressing (``data`` None). ``progress(done, total)`` is told the frames done."""
    import torch

    rows, frames = len(lengths), int(lengths.max()) if len(lengths) else 0
    if rows == 0:
        return b""
    check_segments(model, rows, frames)
    device = next(model.parameters()).device
    known = None
    if data is not None:  # (rows, frames) byte values, zeros past a segment's end
        known = np.zeros((rows, frames), dtype=np.uint8)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        raw = np.frombuffer(data, dtype=np.uint8)
        for r, (s, n) in enumerate(zip(starts, lengths)):
            known[r, :n] = raw[s:s + n]
    out = np.zeros((rows, frames), dtype=np.uint8)
    optimizer = _adapt_optimizer(model, adapt)
    was_training = model.training
    model.eval()
    try:
        decoder = model.cached_decoder(torch.zeros(rows, 0, dtype=torch.uint8), bounded=True)
        scores = getattr(decoder, "frame_log_probs", lambda: None)()
        by_frame = None if scores is None else table.value_of_byte(scores.size(-1))
        for t in range(frames):
            active = lengths > t
            if by_frame is not None:  # whole bytes, from the frame distribution
                q = quantize_frames(decoder.frame_log_probs(), by_frame.to(scores.device))
                byte = np.zeros(rows, dtype=np.uint8)
                byte[active] = coder.frames(q[active], None if known is None else
                                            known[active, t])
                out[:, t] = byte
                decoder.push_frame(torch.from_numpy(table.bits[byte]).to(device))
            else:
                out[:, t] = _code_bits(decoder, table, coder, active,
                                       None if known is None else table.bits[known[:, t]],
                                       device)
            if progress is not None:
                progress(t + 1, frames)
            if optimizer is not None and (t + 1) % adapt.every == 0 and t + 1 < frames:
                _adapt(model, optimizer, table, out[lengths > t, :t + 1], adapt)  # rows with
                # text up to here (a shorter last segment's padding is not trained on)
                decoder = model.cached_decoder(_context(model, table, out[:, :t + 1]),
                                               bounded=True)
    finally:
        model.train(was_training)
    return b"".join(out[r, :n].tobytes() for r, n in enumerate(lengths))


def _code_bits(decoder, table: FrameTable, coder: BitCoder, active, target, device):
    """One frame of every row, bit by bit; returns the rows' bytes."""
    import torch

    rows, Fb = len(active), table.Fb
    frame = np.zeros((rows, Fb), dtype=np.uint8)
    for j in range(Fb):
        if j == Fb - 1 and table.determined:
            bit = (frame[:, :-1].sum(axis=1) % 2).astype(np.uint8)
        else:
            q = quantize(decoder.logits())
            bit = np.full(rows, table.bits[0, j], dtype=np.uint8)  # ended rows: byte 0's frame
            bit[active] = coder(q[active], None if target is None else target[active, j])
        frame[:, j] = bit
        decoder.push(torch.from_numpy(bit).to(device))
    return table.to_bytes(frame)


def _adapt_optimizer(model, adapt: Optional[Adapt]):
    import torch

    if adapt is None:
        return None
    inference_only = getattr(model, "inference_only", None)
    if inference_only:
        raise DataError(f"adaptation trains the model as it codes, and this run's weights run "
                        f"as {inference_only} layers, which have no gradients; code without "
                        "adaptation, or with the run it was quantized from")
    return torch.optim.AdamW(model.parameters(), lr=adapt.lr, weight_decay=0.0)


def _context(model, table: FrameTable, done: np.ndarray):
    """Bits of the last half-context of coded frames of every row, to prime a decoder."""
    import torch

    keep = max(1, model.cfg.max_frames // 2)
    return torch.from_numpy(table.bits[done[:, -keep:]].reshape(done.shape[0], -1))


def _adapt(model, optimizer, table: FrameTable, done: np.ndarray, adapt: Adapt) -> None:
    """``adapt.steps`` optimizer steps on the latest coded window of every row."""
    import torch
    import torch.nn.functional as F

    window = min(done.shape[1], model.cfg.max_frames)
    bits = torch.from_numpy(table.bits[done[:, -window:]].reshape(done.shape[0], -1)).to(
        next(model.parameters()).device)
    rows = bits.size(0)
    for _ in range(adapt.steps):
        optimizer.zero_grad(set_to_none=True)
        for at in range(0, rows, ADAPT_ROWS):  # fixed chunks: memory bounded, same on both sides
            part = bits[at:at + ADAPT_ROWS]
            logits = model(part, causal=True).float()
            loss = F.cross_entropy(logits.reshape(-1, 2), part.reshape(-1).long())
            (loss * (part.size(0) / rows)).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class CountingCoder:
    """A :class:`BitCoder` that only counts: the ideal code length, in bits, of the bits it is
    given (what an arithmetic coder writes, within a few bytes)."""

    def __init__(self) -> None:
        self.bits = 0.0

    def __call__(self, q: np.ndarray, bits: Optional[np.ndarray]) -> np.ndarray:
        if bits is None:
            raise ValueError("CountingCoder counts known bits; it cannot decode")
        p = np.where(bits.astype(bool), q, ONE - q).astype(np.float64) / ONE
        self.bits += float(-np.log2(p).sum())
        return bits

    def frames(self, q: np.ndarray, symbols: Optional[np.ndarray]) -> np.ndarray:
        if symbols is None:
            raise ValueError("CountingCoder counts known bytes; it cannot decode")
        chosen = np.take_along_axis(q, symbols.astype(np.int64)[:, None], axis=1)[:, 0]
        self.bits += float(-np.log2(chosen / q.sum(axis=1)).sum())
        return symbols


def code_length(model, table: FrameTable, data: bytes, segment: int = DEFAULT_SEGMENT,
                adapt: Optional[Adapt] = None, progress=None) -> float:
    """Bits a coder needs for ``data`` (ideal: ``-log2`` of each coded symbol's quantised
    probability), through the same :func:`code_segments` as compressing. With ``adapt`` the
    model's weights change: give it a copy."""
    counter = CountingCoder()
    code_segments(model, table, segment_lengths(len(data), segment), counter, data, adapt,
                  progress)
    return counter.bits
