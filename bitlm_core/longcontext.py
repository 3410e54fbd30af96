"""Texts longer than the model's context: sliding-window scoring and positional growth.

Scoring a long text in non-overlapping windows makes the first bytes of every window pay for
having no context, so the figure depends on where the cuts fall. :func:`score_sliding` moves
a window of ``window`` frames by ``stride`` frames and scores each frame exactly once, in the
window that gives it at least ``window - stride`` frames of context (the first window scores
all of its frames). Memory is bounded by ``batch_size`` windows whatever the text length.

:func:`expand_positional_encoding` gives a model more positions while keeping every output on
the positions it already had bit-for-bit unchanged.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

from bitlm_core.errors import BitlmError

LN2 = math.log(2.0)


def window_plan(n_frames: int, window: int, stride: int) -> list[tuple[int, int]]:
    """``(begin, first_scored)`` per window: frames ``[begin, begin + window)`` are fed, frames
    ``[first_scored, begin + window)`` are scored. Every frame is scored exactly once."""
    if window < 1 or not 1 <= stride <= window:
        raise BitlmError(f"sliding window needs 1 <= stride <= window, got window={window}, "
                         f"stride={stride}")
    if n_frames <= window:
        return [(0, 0)]
    begins = list(range(0, n_frames - window, stride)) + [n_frames - window]
    plan, scored_to = [], 0
    for b in begins:
        plan.append((b, scored_to))
        scored_to = b + window
    return plan


def score_sliding(model, bits, frame_bits: int, window: int, stride: int,
                  batch_size: int = 16,
                  progress: Optional[Callable[[int, int], None]] = None) -> tuple[float, int]:
    """(bits per byte, bytes) of a causal model on ``bits`` (a 1-D tensor of whole frames)."""
    import torch
    import torch.nn.functional as F

    n = bits.numel() // frame_bits
    if n * frame_bits != bits.numel() or bits.dim() != 1:
        raise BitlmError("score_sliding takes a 1-D tensor of whole frames")
    frames = bits.view(n, frame_bits)
    window = min(window, n)
    plan = window_plan(n, window, min(stride, window))
    total_nats = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(plan), batch_size):
                chunk = plan[i: i + batch_size]
                rows = torch.stack([frames[b: b + window].reshape(-1) for b, _ in chunk])
                logits = model(rows, causal=True).float()
                nll = F.cross_entropy(logits.reshape(-1, 2), rows.reshape(-1).long(),
                                      reduction="none").view(len(chunk), window, frame_bits)
                per_frame = nll.sum(-1)
                for row, (b, first) in enumerate(chunk):
                    total_nats += float(per_frame[row, first - b:].sum())
                if progress is not None:
                    progress(min(i + batch_size, len(plan)), len(plan))
    finally:
        model.train(was_training)
    return total_nats / LN2 / n, n


def expand_positional_encoding(model, max_frames: int) -> None:
    """Grow ``model`` to ``max_frames`` frames of context (``max_frames * frame_bits`` positions
    for the flat layout), in place.

    The existing rows of the learned position table are kept and new rows are drawn like the
    originals were at initialisation, so the outputs on positions the model already had do not
    change (causal attention never looks at later positions). The model's config is updated, so
    a checkpoint saved afterwards records the new size.
    """
    import dataclasses

    import torch
    import torch.nn as nn

    old = model.pos
    new_cfg = dataclasses.replace(model.cfg, max_frames=max_frames)
    n_new = new_cfg.max_positions
    if n_new < old.num_embeddings:
        raise BitlmError(f"expand_positional_encoding: {max_frames} frames is fewer than the "
                         f"model has ({model.cfg.max_frames}); it only grows")
    table = nn.Embedding(n_new, old.embedding_dim, device=old.weight.device,
                         dtype=old.weight.dtype)
    with torch.no_grad():
        nn.init.normal_(table.weight, mean=0.0, std=0.02)
        table.weight[: old.num_embeddings] = old.weight
    model.pos = table
    model.cfg = new_cfg
