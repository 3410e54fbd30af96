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

from typing import TYPE_CHECKING, Optional

from bitlm_core.builtins.attention import (ReferenceAttention, check_chunking, chunk_mask,
                                           chunked)

__all__ = ["SdpaAttention", "chunk_mask"]  # chunk_mask lives in bitlm_core, shared with reference

if TYPE_CHECKING:  # torch is imported lazily at call time
    import torch


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
        check_chunking(chunk_size, overlap)
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
        return chunked(_attend, q, k, v, self.chunk_size, self.overlap, causal, dropout_p)

    def _dense_with_weights(self, q, k, v, causal: bool, dropout_p: float):
        """The slow path for ``need_weights=True``: explicit softmax(QK^T / sqrt(D)) V."""
        return ReferenceAttention(self.chunk_size, self.overlap)(
            q, k, v, causal=causal, dropout_p=dropout_p, need_weights=True)


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
