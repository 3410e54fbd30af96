"""The ``sdpa`` attention backend: :func:`torch.nn.functional.scaled_dot_product_attention`.

Same call convention as bitlm's ``reference`` backend (see
:class:`bitlm_core.interfaces.AttentionBackend`)::

    out, weights = backend(q, k, v, causal=True, dropout_p=0.0, need_weights=False)

with q of shape (B, H, Tq, D) and k, v of shape (B, H, Tk, D). When ``Tq < Tk`` (decoding with a
key/value cache) the queries are the *last* Tq positions, so a causal query i sees the keys
j <= i + Tk - Tq ("bottom-right" alignment).

How the causal mask is expressed, cheapest first:

* ``Tq == Tk``: ``is_causal=True``; no dense mask is ever built.
* ``Tq == 1``: the single query is the newest position and sees every key; no mask at all.
* ``1 < Tq < Tk``: a (Tq, Tk) boolean mask. torch's ``is_causal`` aligns the mask to the top
  left, which would be wrong here, so it is never used when Tq != Tk.
* ``Tq > Tk`` with ``causal=True`` is rejected: the first queries would see no key at all.

Chunked (local) attention, ``SdpaAttention(chunk_size=S, overlap=W)``: positions are split into
chunks ``[c*S, (c+1)*S)`` counted from the first *key* position (absolute positions, so a cached
decoding step lands in the same chunk as it would in a full forward pass). A query attends to
the keys of its own chunk plus the ``W`` positions just before the chunk starts (and, when
causal, only to keys at or before itself). Work and memory are O(T * (S + W)): attention is
computed chunk by chunk and no T-by-T matrix exists unless ``need_weights=True`` asks for one.

Dropout: ``dropout_p`` is applied to the attention probabilities whenever it is positive, exactly
like the ``reference`` backend; the caller passes 0.0 outside training.

Attention maps: torch's kernel cannot return them, so ``supports_weights`` is False. Asking for
them anyway (``need_weights=True``) does not fail: the call falls back to the explicit reference
computation (the ``reference`` backend itself, or the same dense softmax with the chunk mask when
chunking is on), which is slower and uses O(Tq * Tk) memory.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # torch is imported lazily at call time
    import torch


def chunk_mask(tq: int, tk: int, chunk_size: int, overlap: int, causal: bool,
               device=None) -> "torch.Tensor":
    """(tq, tk) bool mask of chunked attention, True where query i may attend key j.

    Queries are the last ``tq`` of ``tk`` positions. Only used for the dense ``need_weights``
    fallback; the fast path never materialises it.
    """
    import torch

    pos_q = torch.arange(tk - tq, tk, device=device).unsqueeze(1)  # absolute positions
    pos_k = torch.arange(tk, device=device).unsqueeze(0)
    chunk_start = (pos_q // chunk_size) * chunk_size
    mask = (pos_k >= chunk_start - overlap) & (pos_k < chunk_start + chunk_size)
    if causal:
        mask &= pos_k <= pos_q
    return mask


class SdpaAttention:
    """Attention on torch's fused ``scaled_dot_product_attention`` kernel.

    Args:
        chunk_size: when set, attend locally in chunks of this many positions (see module
            docstring); ``None`` (the default) is full attention.
        overlap: with ``chunk_size``, how many positions before its chunk a query may also see.
    """

    name = "sdpa"
    supports_weights = False

    def __init__(self, chunk_size: Optional[int] = None, overlap: int = 0):
        if chunk_size is not None:
            if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
                raise ValueError(f"chunk_size must be a positive integer or None, "
                                 f"got {chunk_size!r}")
        if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
            raise ValueError(f"overlap must be a non-negative integer, got {overlap!r}")
        if overlap and chunk_size is None:
            raise ValueError("overlap only makes sense with chunk_size (chunked attention)")
        self.chunk_size = chunk_size
        self.overlap = overlap

    def __repr__(self) -> str:
        if self.chunk_size is None:
            return "SdpaAttention()"
        return f"SdpaAttention(chunk_size={self.chunk_size}, overlap={self.overlap})"

    # -- public call ------------------------------------------------------------------------
    def __call__(self, q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", *,
                 causal: bool, dropout_p: float = 0.0, need_weights: bool = False
                 ) -> tuple["torch.Tensor", Optional["torch.Tensor"]]:
        """q (B, H, Tq, D), k, v (B, H, Tk, D) -> (out (B, H, Tq, D), weights or None).

        ``need_weights=True`` falls back to the explicit reference computation and returns the
        (B, H, Tq, Tk) attention probabilities (before dropout), like the ``reference`` backend.
        """
        _check_shapes(q, k, v, causal, chunked=self.chunk_size is not None)
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
        if need_weights:
            return self._dense_with_weights(q, k, v, causal, dropout_p)
        if self.chunk_size is None:
            return _attend(q, k, v, causal, dropout_p), None
        return self._chunked(q, k, v, causal, dropout_p), None

    # -- implementations --------------------------------------------------------------------
    def _chunked(self, q, k, v, causal: bool, dropout_p: float):
        """Chunk by chunk over the query positions; each chunk sees S + overlap keys at most."""
        import torch

        tq, tk = q.size(-2), k.size(-2)
        offset = tk - tq  # absolute position of the first query
        size = self.chunk_size
        outs = []
        for start in range((offset // size) * size, tk, size):
            end = min(start + size, tk)
            q_from = max(start, offset)
            k_from = max(0, start - self.overlap)
            # Query block and key block both end at absolute position end - 1, so the causal
            # mask of this block is the bottom-right aligned one.
            outs.append(_attend(q[..., q_from - offset:end - offset, :],
                                k[..., k_from:end, :], v[..., k_from:end, :],
                                causal, dropout_p))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)

    def _dense_with_weights(self, q, k, v, causal: bool, dropout_p: float):
        """The slow path for ``need_weights=True``: explicit softmax(QK^T / sqrt(D)) V."""
        if self.chunk_size is None:
            from bitlm_core.builtins.attention import ReferenceAttention

            return ReferenceAttention()(q, k, v, causal=causal, dropout_p=dropout_p,
                                        need_weights=True)
        import torch
        import torch.nn.functional as F

        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        mask = chunk_mask(q.size(-2), k.size(-2), self.chunk_size, self.overlap, causal,
                          q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
        return torch.matmul(dropped, v), weights


def _attend(q, k, v, causal: bool, dropout_p: float):
    """One fused SDPA call with the cheapest correct way of expressing causality."""
    import torch.nn.functional as F

    tq, tk = q.size(-2), k.size(-2)
    if not causal or tq == 1:
        # tq == 1 and causal: the only query is the newest position, it sees every key.
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if tq == tk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    from bitlm_core.builtins.attention import causal_mask

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(tq, tk, q.device),
                                          dropout_p=dropout_p)


def _check_shapes(q, k, v, causal: bool, chunked: bool) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"sdpa attention expects 4-d q, k, v of shape (B, H, T, D); got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[:-1] != v.shape[:-1] or q.shape[:2] != k.shape[:2] or q.size(-1) != k.size(-1):
        raise ValueError(f"sdpa attention: incompatible shapes q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)} (expected q (B, H, Tq, D), "
                         f"k (B, H, Tk, D), v (B, H, Tk, Dv))")
    tq, tk = q.size(-2), k.size(-2)
    if tq > tk and (causal or chunked):
        raise ValueError(f"sdpa attention: {tq} queries but only {tk} keys; with causal or "
                         "chunked attention the queries must be the last Tq <= Tk positions")
