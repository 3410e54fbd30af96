"""Generation: decoders that give the next bit's logits, and the choice of a bit from them.

A decoder is primed with a prompt of whole frames and then alternates ``logits()`` (B, 2) and
``push(bits)``; ``history`` holds every bit so far. :class:`CachedDecoder` is the base of each
layout's key/value-cached decoder (``model.cached_decoder``); :class:`FullForwardDecoder` runs
the whole context through the model for every bit, the slow reference they are checked against.
"""

from __future__ import annotations

import torch

from bitlm_core.errors import BitsError


def prompt_bits(model, prompt):
    """A decoder's starting history: (B, P) uint8 bits of whole frames, or a BitsError."""
    history = prompt.to(next(model.parameters()).device, torch.uint8)
    if history.size(1) % model.frame_bits:
        raise BitsError(f"prompt has {history.size(1)} bits, not a whole number of "
                        f"{model.frame_bits}-bit frames")
    return history


class CachedDecoder:
    """Causal, cached, bit-by-bit decoding; a layout's subclass defines ``_prime`` (fill the
    cache from whole frames) and ``_push`` (take one more bit).

    When the context is full the decoder keeps the last half of it (cut at a frame boundary)
    and re-primes, so generation can run past ``max_frames``. ``bounded`` keeps only the last
    ``max_frames`` whole frames of ``history`` (all that re-priming reads), so that decoding a
    long stream costs the same per bit all along.
    """

    def __init__(self, model, prompt, bounded: bool = False):
        self.model, self.Fb, self.history = model, model.frame_bits, prompt_bits(model, prompt)
        self.window = model.cfg.max_frames * self.Fb if bounded else None
        self.last = None  # logits of the next bit
        with torch.no_grad():
            self._prime(self.history)

    def _context(self, bits, trim: bool = False):
        """The whole frames to prime with: all of ``bits``, or only the last half-context
        when they do not fit (one position goes to BOS) or ``trim`` asks for room."""
        cfg = self.model.cfg
        if trim or bits.size(1) > (cfg.max_frames - 1) * self.Fb:
            keep = max(1, cfg.max_frames // 2) * self.Fb
            bits = bits[:, max(0, bits.size(1) - keep):]
        self.caches = [dict() for _ in self.model.blocks]
        return bits

    def logits(self):
        return self.last

    @torch.no_grad()
    def push(self, bit):
        bit = bit.to(self.history.device, torch.uint8).view(-1, 1)
        self.history = torch.cat([self.history, bit], dim=1)
        self._push(bit)
        self._bound()

    def _bound(self) -> None:
        """``bounded``: drop the history's oldest whole frames past the window."""
        L = self.history.size(1)
        if self.window is not None and L > self.window and L % self.Fb == 0:
            self.history = self.history[:, L - self.window:]  # whole frames: it starts on one

    def _prime(self, bits, trim: bool = False) -> None:
        raise NotImplementedError

    def _push(self, bit) -> None:
        raise NotImplementedError


class FullForwardDecoder:
    """The decoder interface without a cache: every ``logits()`` is a full forward pass.

    It is what cached decoding is checked and measured against. Within the context it gives the
    cached decoder's logits (up to float rounding); past the context it keeps the last
    ``max_frames - 1`` whole frames.
    """

    def __init__(self, model, prompt):
        self.model, self.Fb, self.history = model, model.frame_bits, prompt_bits(model, prompt)

    @torch.no_grad()
    def logits(self):
        Fb, L = self.Fb, self.history.size(1)
        done = L - L % Fb  # bits of whole frames
        keep = (self.model.cfg.max_frames - 1) * Fb
        start = max(0, done - keep)
        # pad the unfinished frame to a whole one: outputs at index L only see bits < L
        pad = torch.zeros(self.history.size(0), Fb - L % Fb, dtype=torch.uint8,
                          device=self.history.device)
        window = torch.cat([self.history[:, start:], pad], dim=1)
        return self.model(window, causal=True)[:, L - start]

    def push(self, bit):
        self.history = torch.cat([self.history, bit.to(self.history.device, torch.uint8)
                                  .view(-1, 1)], dim=1)


def choose_bit(logits, generator, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0):
    """Pick one bit per row from (B, 2) logits.

    ``temperature`` 0 (or ``top_k`` 1) is greedy. With two outcomes, top-p keeps only the more
    likely bit when its probability already reaches ``top_p``.
    """
    if temperature <= 0 or top_k == 1:
        return logits.argmax(dim=-1)
    # drawn where the generator lives (the CPU's, for samples that do not depend on the device)
    where = generator.device if generator is not None else logits.device
    probs = torch.softmax(logits.float().to(where) / temperature, dim=-1)
    if top_p < 1.0:
        best = probs.max(dim=-1, keepdim=True)
        keep_only_best = best.values >= top_p
        onehot = torch.zeros_like(probs).scatter_(-1, best.indices, 1.0)
        probs = torch.where(keep_only_best, onehot, probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)


def parity_bit(frame_bits_so_far):
    """Even parity of the data bits of the current frame: (B, 8) -> (B,)."""
    return frame_bits_so_far.long().sum(dim=-1) % 2
