"""The ``reference`` attention backend: explicit softmax(QK^T / sqrt(D)) V.

It is the numerical reference every faster backend is checked against, and the only built-in
backend that can return attention maps (``need_weights=True``).
"""

from __future__ import annotations

import math


def causal_mask(tq: int, tk: int, device=None):
    """(tq, tk) bool mask, True where query i may attend key j (bottom-right aligned)."""
    import torch

    offset = tk - tq
    rows = torch.arange(tq, device=device).unsqueeze(1)
    cols = torch.arange(tk, device=device).unsqueeze(0)
    return cols <= rows + offset


def chunk_mask(tq: int, tk: int, chunk_size: int, overlap: int, causal: bool,
               device=None):
    """(tq, tk) bool mask of chunked attention, True where query i may attend key j.

    Positions are absolute, counted from the first key; queries are the last ``tq`` of ``tk``.
    A query sees its own chunk ``[c * chunk_size, (c + 1) * chunk_size)`` and the ``overlap``
    positions before it (and, when causal, nothing after itself). Only the ``need_weights``
    paths build it; chunked attention itself never does.
    """
    import torch

    pos_q = torch.arange(tk - tq, tk, device=device).unsqueeze(1)
    pos_k = torch.arange(tk, device=device).unsqueeze(0)
    chunk_start = (pos_q // chunk_size) * chunk_size
    mask = (pos_k >= chunk_start - overlap) & (pos_k < chunk_start + chunk_size)
    if causal:
        mask &= pos_k <= pos_q
    return mask


def check_chunking(chunk_size, overlap) -> None:
    """ValueError unless ``chunk_size`` is None or a positive int and ``overlap`` fits it."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, "
                             f"got {chunk_size!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"overlap must be a non-negative integer, got {overlap!r}")
    if overlap and chunk_size is None:
        raise ValueError("overlap only makes sense with chunk_size (chunked attention)")


def chunked(attend, q, k, v, chunk_size: int, overlap: int, causal: bool, dropout_p: float):
    """Chunked attention, chunk by chunk over the query positions: O(T * (S + overlap)).

    ``attend(q_block, k_block, v_block, causal, dropout_p)`` is the backend's own full
    attention for one block; each block's queries and keys end at the same absolute position,
    so its causal mask is the bottom-right aligned one.
    """
    import torch

    tq, tk = q.size(-2), k.size(-2)
    offset = tk - tq  # absolute position of the first query
    outs = []
    for start in range((offset // chunk_size) * chunk_size, tk, chunk_size):
        end = min(start + chunk_size, tk)
        q_from = max(start, offset)
        k_from = max(0, start - overlap)
        outs.append(attend(q[..., q_from - offset:end - offset, :], k[..., k_from:end, :],
                           v[..., k_from:end, :], causal, dropout_p))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def dense_attention(q, k, v, causal: bool, dropout_p: float = 0.0, mask=None):
    """Explicit softmax(QK^T / sqrt(D)) V -> (out, probabilities before dropout).

    ``mask`` (Tq, Tk), True where attention is allowed, replaces the causal mask when given.
    """
    import torch
    import torch.nn.functional as F

    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    if mask is None and causal:
        mask = causal_mask(q.size(-2), k.size(-2), q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return torch.matmul(dropped, v), weights


class ReferenceAttention:
    """Explicit attention. Options ``chunk_size`` and ``overlap``: chunked (local) attention
    computed block by block, so memory grows linearly with length (see :func:`chunked`)."""

    name = "reference"
    supports_weights = True

    def __init__(self, chunk_size: int | None = None, overlap: int = 0):
        check_chunking(chunk_size, overlap)
        self.chunk_size, self.overlap = chunk_size, overlap

    def __call__(self, q, k, v, *, causal: bool, dropout_p: float = 0.0,
                 need_weights: bool = False):
        if self.chunk_size is None:
            out, weights = dense_attention(q, k, v, causal, dropout_p)
        elif need_weights:  # the full (Tq, Tk) map only when asked for
            mask = chunk_mask(q.size(-2), k.size(-2), self.chunk_size, self.overlap, causal,
                              q.device)
            out, weights = dense_attention(q, k, v, causal, dropout_p, mask)
        else:
            return chunked(lambda *a: dense_attention(*a)[0], q, k, v, self.chunk_size,
                           self.overlap, causal, dropout_p), None
        return out, (weights if need_weights else None)


def auto_attention(chunk_size: int | None = None, overlap: int = 0):
    """The installed backend of highest ``priority`` (on its record) that accepts the chunking
    asked for; ``reference`` when no other does. Ties go to the name first in sorted order.

    The chosen backend's ``name`` says which one was picked; ``bitlm run`` prints it.
    """
    from bitlm_core.registry import get_registry

    check_chunking(chunk_size, overlap)
    options = {"chunk_size": chunk_size, "overlap": overlap} if chunk_size is not None else {}
    registry = get_registry()
    ranked = sorted((r for r in registry.records["attention"].values()
                     if getattr(r, "priority", None) is not None),
                    key=lambda r: (-r.priority, r.name))
    for record in ranked:
        try:
            backend = registry.build("attention", record.name, options, "attention")
        except Exception:  # a backend that needs other options cannot be picked blindly
            continue
        if not hasattr(backend, "name"):
            backend.name = record.name
        return backend
    return ReferenceAttention(chunk_size, overlap)
