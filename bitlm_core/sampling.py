"""Generation helpers shared by samplers: next-bit choice and parity-aware frame completion."""

from __future__ import annotations


def choose_bit(logits, generator, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0):
    """Pick one bit per row from (B, 2) logits.

    ``temperature`` 0 (or ``top_k`` 1) is greedy. With two outcomes, top-p keeps only the more
    likely bit when its probability already reaches ``top_p``.
    """
    import torch

    if temperature <= 0 or top_k == 1:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        best = probs.max(dim=-1, keepdim=True)
        keep_only_best = best.values >= top_p
        onehot = torch.zeros_like(probs).scatter_(-1, best.indices, 1.0)
        probs = torch.where(keep_only_best, onehot, probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def parity_bit(frame_bits_so_far):
    """Even parity of the data bits of the current frame: (B, 8) -> (B,)."""
    return frame_bits_so_far.long().sum(dim=-1) % 2
