"""Scaling strategies: grow the model when training plateaus, without changing its outputs.

``context`` multiplies the number of byte frames the model can see by ``factor`` (capped at
``max_frames``) through :func:`bitlm_core.model.growth.expand_positional_encoding`: existing
position vectors are kept, so every output the model gave on the old context is unchanged, and
the trainer then feeds it windows of the new length. ``depth`` adds blocks that start as the
identity and ``width`` adds feed-forward units that start silent
(:mod:`bitlm_core.model.growth`).

A strategy has ``grow(model)`` (in place, returns the model), and optionally ``can_grow(model)``,
``next_frames(model)`` (when it changes the context) and ``describe(before, after)`` (configs).
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
        from bitlm_core.model.growth import expand_positional_encoding

        if self.can_grow(model):
            expand_positional_encoding(model, self.next_frames(model))
        return model

    def describe(self, before, after) -> str:
        return f"context {before.max_frames} -> {after.max_frames} byte frames"


def _positive_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class DepthGrowth:
    """Options: ``add`` (blocks added per growth, default 2), ``max_layers`` (default 12),
    ``init`` (``copy``, default: the new blocks start as copies of the existing ones, bottom
    up; ``random``: drawn like a new model).

    New blocks go on top with zero residual output projections, so the model's outputs are
    unchanged when it grows (:func:`bitlm_core.model.growth.add_layers`).
    """

    name = "depth"

    def __init__(self, add: int = 2, max_layers: int = 12, init: str = "copy"):
        self.add = _positive_int("add", add, 1)
        self.max_layers = _positive_int("max_layers", max_layers, 2)
        from bitlm_core.model.growth import check_init  # (the model package imports torch)

        self.init = check_init(init)

    def can_grow(self, model) -> bool:
        return model.cfg.n_layers < self.max_layers

    def grow(self, model):
        from bitlm_core.model.growth import add_layers

        if self.can_grow(model):
            add_layers(model, min(self.add, self.max_layers - model.cfg.n_layers), self.init)
        return model

    def describe(self, before, after) -> str:
        return f"depth {before.n_layers} -> {after.n_layers} layers"


class WidthGrowth:
    """Options: ``factor`` (default 2), ``max_d_ff`` (default 4096 hidden units), ``init``
    (``copy``, default: new units start with the input weights of existing ones; ``random``).

    Multiplies the feed-forward hidden units of every block (``model.d_ff``); the new units
    start with zero output weights, so the model's outputs are unchanged when it grows
    (:func:`bitlm_core.model.growth.widen_feedforward`). The residual width ``d_model`` stays.
    """

    name = "width"

    def __init__(self, factor: int = 2, max_d_ff: int = 4096, init: str = "copy"):
        self.factor = _positive_int("factor", factor, 2)
        self.max_d_ff = _positive_int("max_d_ff", max_d_ff, 2)
        from bitlm_core.model.growth import check_init  # (the model package imports torch)

        self.init = check_init(init)

    def can_grow(self, model) -> bool:
        return model.cfg.d_ff < self.max_d_ff

    def grow(self, model):
        from bitlm_core.model.growth import widen_feedforward

        if self.can_grow(model):
            widen_feedforward(model, min(self.max_d_ff, model.cfg.d_ff * self.factor), self.init)
        return model

    def describe(self, before, after) -> str:
        return f"feed-forward width {before.d_ff} -> {after.d_ff} hidden units"
