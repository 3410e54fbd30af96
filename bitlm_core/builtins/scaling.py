"""The ``context`` scaling strategy: grow the model's context when training plateaus.

``grow(model)`` multiplies the number of byte frames the model can see by ``factor`` (capped at
``max_frames``) through :func:`bitlm_core.longcontext.expand_positional_encoding`: existing
position vectors are kept, so every output the model gave on the old context is unchanged, and
the trainer then feeds it windows of the new length.
"""

from __future__ import annotations


class ContextGrowth:
    """Options: ``factor`` (default 2), ``max_frames`` (default 1024 byte frames)."""

    name = "context"

    def __init__(self, factor: int = 2, max_frames: int = 1024):
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
            raise ValueError(f"factor must be an integer >= 2, got {factor!r}")
        if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 2:
            raise ValueError(f"max_frames must be an integer >= 2, got {max_frames!r}")
        self.factor, self.max_frames = factor, max_frames

    def can_grow(self, model) -> bool:
        return model.cfg.max_frames < self.max_frames

    def next_frames(self, model) -> int:
        """The context (byte frames) ``grow`` would give ``model``."""
        return min(self.max_frames, model.cfg.max_frames * self.factor)

    def grow(self, model):
        from bitlm_core.longcontext import expand_positional_encoding

        if self.can_grow(model):
            expand_positional_encoding(model, self.next_frames(model))
        return model

    def describe(self, before, after) -> str:
        return f"context {before.max_frames} -> {after.max_frames} byte frames"
