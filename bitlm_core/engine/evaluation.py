"""Scoring a model: bits per byte on held-out windows, and on texts longer than its context.

Scoring a long text in non-overlapping windows makes the first bytes of every window pay for
having no context, so the figure depends on where the cuts fall. :func:`score_windows` moves
a window of ``window`` frames by ``stride`` frames and scores each frame exactly once, in the
window that gives it at least ``window - stride`` frames of context (the first window scores
all of its frames). It reads the text a batch of windows at a time, so memory is bounded by
``batch_size`` windows whatever the text length (:func:`score_sliding` is the same on a tensor
of bits).
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from bitlm_core.engine.device import model_device
from bitlm_core.engine.distributed import SOLO, World
from bitlm_core.errors import BitlmError
from bitlm_core.model import eval_mode
from bitlm_core.model.act import latest_ponder

LN2 = math.log(2.0)


class HaltingDepth:
    """The mean number of blocks a model with adaptive computation time used per position,
    over the forward passes :meth:`add` saw (weighted by the positions each computed, context
    included); None without ACT."""

    def __init__(self, model) -> None:
        self.model, self.sum, self.bytes = model, 0.0, 0

    def add(self, n_bytes: int) -> None:
        ponder = latest_ponder(self.model)
        if ponder is not None:
            self.sum += float(ponder["blocks"]) * n_bytes
            self.bytes += n_bytes

    @property
    def mean(self) -> float | None:
        return self.sum / self.bytes if self.bytes else None

    def figures(self) -> dict[str, float]:
        """``{"act_blocks": mean}`` for a model with ACT, else nothing."""
        return {} if self.mean is None else {"act_blocks": self.mean}


@torch.no_grad()
def score_batches(model, objective, batches, frame_bits: int,
                  depth: HaltingDepth | None = None) -> tuple[float, int]:
    """(bits per byte, bytes) over batches of windows, each batch weighted by its bytes;
    ``depth`` collects the halting depth of a model with ACT."""
    total, n_bytes = 0.0, 0
    device = model_device(model)
    with eval_mode(model):
        for batch in batches:
            frames = batch.numel() // frame_bits
            total += objective(model, batch.to(device)).bits_per_byte * frames
            n_bytes += frames
            if depth is not None:
                depth.add(frames)
    return (total / n_bytes if n_bytes else float("nan")), n_bytes


def evaluate(model, objective, dataset, batch_size: int, max_batches: int | None = None,
             world: World = SOLO) -> dict[str, float]:
    """Held-out bits per byte over non-overlapping windows (all of them by default), and the
    mean halting depth (``act_blocks``) of a model with adaptive computation time.

    In several processes (``world``) each scores every ``size``-th batch and the sums are
    added up, so every process gets the figures of all the batches."""
    depth = HaltingDepth(model)
    batches, fewer = dataset.val_batches(batch_size, max_batches), 0
    if world.group:
        count, r, w = dataset.val_batch_count(batch_size, max_batches), world.rank, world.size
        batches = (b for i, b in enumerate(batches) if i % w == r)
        fewer = -(-count // w) - len(range(r, count, w)) if world.gathers else 0
    bpb, n_bytes = score_batches(model, objective, batches, dataset.frame_bits, depth)
    if fewer:
        _uncounted_passes(model, objective, next(dataset.val_batches(batch_size, 1)), fewer)
    if world.group:
        total, n_bytes, depth.sum, depth.bytes = world.sum(
            [bpb * n_bytes if n_bytes else 0.0, n_bytes, depth.sum, depth.bytes])
        n_bytes, depth.bytes = int(n_bytes), int(depth.bytes)
        bpb = total / n_bytes if n_bytes else float("nan")
    if n_bytes == 0:
        raise BitlmError("the held-out split holds no whole window; lower data.seq_len")
    out = {"bits_per_byte": bpb, "bytes": n_bytes, "bound": bool(objective.is_bound)}
    if depth.mean is not None:
        out["act_blocks"] = depth.mean
    return out


@torch.no_grad()
def _uncounted_passes(model, objective, batch, n: int) -> None:
    """Forward passes whose result is dropped: a sharded model gathers its weights in every
    pass, so a process with a batch fewer than the others runs one anyway."""
    with eval_mode(model):
        for _ in range(n):
            objective(model, batch.to(model_device(model)))


def window_plan(n_frames: int, window: int, stride: int) -> list[tuple[int, int]]:
    """``(begin, first_scored)`` per window: frames ``[begin, begin + window)`` are fed, frames
    ``[first_scored, begin + window)`` are scored. Every frame is scored exactly once."""
    return list(iter_windows(n_frames, window, stride))


def iter_windows(n_frames: int, window: int, stride: int) -> Iterator[tuple[int, int]]:
    """:func:`window_plan`, one window at a time (a long text's plan is never held)."""
    if window < 1 or not 1 <= stride <= window:
        raise BitlmError(f"sliding window needs 1 <= stride <= window, got window={window}, "
                         f"stride={stride}")
    if n_frames <= window:
        yield (0, 0)
        return
    scored_to = 0
    for b in range(0, n_frames - window, stride):
        yield (b, scored_to)
        scored_to = b + window
    yield (n_frames - window, scored_to)


def count_windows(n_frames: int, window: int, stride: int) -> int:
    return 1 if n_frames <= window else -(-(n_frames - window) // stride) + 1


def score_sliding(model, bits, frame_bits: int, window: int, stride: int,
                  batch_size: int = 16,
                  progress: Optional[Callable[[int, int], None]] = None) -> tuple[float, int]:
    """(bits per byte, bytes) of a causal model on ``bits`` (a 1-D tensor of whole frames)."""
    n = bits.numel() // frame_bits
    if n * frame_bits != bits.numel() or bits.dim() != 1:
        raise BitlmError("score_sliding takes a 1-D tensor of whole frames")
    return score_windows(model, lambda b, k: bits[b * frame_bits:(b + k) * frame_bits], n,
                         frame_bits, window, stride, batch_size, progress)


@torch.no_grad()
def score_windows(model, read: Callable[[int, int], torch.Tensor], n_frames: int,
                  frame_bits: int, window: int, stride: int, batch_size: int = 16,
                  progress: Optional[Callable[[int, int], None]] = None,
                  depth: HaltingDepth | None = None) -> tuple[float, int]:
    """(bits per byte, bytes) of a causal model on a text of ``n_frames`` frames that
    ``read(begin, n)`` gives ``n`` at a time (a 1-D tensor of ``n * frame_bits`` bits).

    Only the windows of one batch are ever held, so a text of any length is scored in memory
    bounded by ``batch_size`` windows."""
    n = n_frames
    window = min(window, n)
    stride = min(stride, window)
    plan, total = iter_windows(n, window, stride), count_windows(n, window, stride)
    total_nats = 0.0
    device = model_device(model)
    with eval_mode(model):
        for i in range(0, total, batch_size):
            chunk = list(itertools.islice(plan, batch_size))
            rows = torch.stack([read(b, window) for b, _ in chunk]).to(device)
            logits = model(rows, causal=True).float()
            nll = F.cross_entropy(logits.reshape(-1, 2), rows.reshape(-1).long(),
                                  reduction="none").view(len(chunk), window, frame_bits)
            per_frame = nll.sum(-1)
            if depth is not None:
                depth.add(rows.numel() // frame_bits)
            for row, (b, first) in enumerate(chunk):
                total_nats += float(per_frame[row, first - b:].sum())
            if progress is not None:
                progress(min(i + batch_size, total), total)
    return total_nats / LN2 / n, n
