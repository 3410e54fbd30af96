"""The ``flat`` layout: one transformer position per bit, the classic design.

In causal mode position ``i`` reads bit ``i-1`` (a BOS token at ``i = 0``) and predicts bit
``i``. A bit-phase embedding tells each position where in its byte frame the predicted bit sits.
Nine times the positions of a byte model for ``parity9``, so much slower to train on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bitlm_core.errors import BitsError
from bitlm_core.model.base import BitTransformerLM
from bitlm_core.model.config import BOS, ModelConfig
from bitlm_core.model.decoding import CachedDecoder


class FlatBitLM(BitTransformerLM):
    layout = "flat"

    def __init__(self, cfg: ModelConfig, backend):
        super().__init__(cfg)
        C = cfg.d_model
        self.tok = nn.Embedding(4, C)  # 0, 1, MASK, BOS
        self.phase = nn.Embedding(cfg.frame_bits, C)
        self._add_backbone(backend)
        self.head = nn.Linear(C, 2)
        self._init_parameters()

    def embed(self, inputs, start: int = 0):
        """Input tokens (B, T) at positions ``start ..`` -> (B, T, C): token plus bit phase."""
        phase = torch.arange(start, start + inputs.size(1), device=inputs.device) % self.frame_bits
        return self.tok(inputs.long()) + self.phase(phase)

    def forward(self, tokens, causal: bool = True, return_attention: bool = False,
                targets=None):
        self.check_input(tokens)
        if targets is not None:
            raise BitsError("targets (the chain rule within a frame) need the framed "
                            "layout; use model.layout: framed")
        x = self.causal_input(tokens) if causal else self.mix_neighbours(self.embed(tokens))
        h, maps = self.backbone(x, causal, need_weights=return_attention)
        logits = self.head(h)
        return (logits, maps) if return_attention else logits

    def causal_input(self, tokens):
        """The bits shifted right by one behind a BOS token, embedded."""
        self.check_input(tokens)
        bos = torch.full((tokens.size(0), 1), BOS, dtype=tokens.dtype, device=tokens.device)
        return self.embed(torch.cat([bos, tokens[:, :-1]], dim=1))

    def causal_head(self, h, tokens):
        return self.head(h)

    def cached_decoder(self, prompt, bounded: bool = False):
        return FlatDecoder(self, prompt, bounded)


class FlatDecoder(CachedDecoder):
    """Cached decoding of the flat layout: one backbone position per pushed bit."""

    def _prime(self, bits, trim: bool = False) -> None:
        bits = self._context(bits, trim)
        bos = torch.full((bits.size(0), 1), BOS, dtype=torch.long, device=bits.device)
        self.pos = 0
        self._feed(torch.cat([bos, bits.long()], dim=1))  # predicts bits[0..], then the next

    def _feed(self, inputs) -> None:
        m = self.model
        h, _ = m.backbone(m.embed(inputs, self.pos), True, start=self.pos, caches=self.caches)
        self.pos += inputs.size(1)
        self.last = m.head(h[:, -1])

    def _push(self, bit) -> None:
        if self.pos < self.model.cfg.max_positions:
            self._feed(bit)
            return
        L = self.history.size(1)
        done = L - L % self.Fb
        self._prime(self.history[:, :done], trim=True)
        for b in self.history[:, done:].unbind(1):  # re-feed the unfinished frame's bits
            self._feed(b.view(-1, 1))
