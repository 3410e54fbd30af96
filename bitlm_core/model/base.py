"""BitTransformerLM: a transformer that gives a probability for every bit of a text.

Two layouts share one interface, ``forward(tokens, causal) -> logits (B, L, 2)``, where
``logits[:, i]`` is the distribution of bit ``i``, and ``decoder(prompt)`` for generation:

``flat`` (:class:`bitlm_core.model.flat.FlatBitLM`)
    one transformer position per bit.

``framed`` (:class:`bitlm_core.model.framed.FramedBitLM`)
    the backbone runs over byte frames and a small local module predicts each frame's bits one
    by one; the cost of a byte-level model, and prediction stays bit by bit.

Both are subclasses of :class:`BitTransformerLM`, which owns what they share: the position
table, the transformer blocks, the final norm, the non-causal neighbour mixing, the
initialisation. ``BitTransformerLM(cfg, backend)`` returns the subclass that ``cfg.layout``
names (as ``pathlib.Path()`` returns a ``PosixPath``), so code that builds a model from a
config need not know the layouts.

Non-causal mode (for denoising objectives) reads tokens in {0, 1, MASK} and predicts each
position's own bit; nothing is shifted.

Shapes: B batch, L bits, T backbone positions, F frame bits, C = d_model, H heads, D head size.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from bitlm_core.errors import BitsError
from bitlm_core.model.config import LAYOUTS, ModelConfig
from bitlm_core.model.layers import (Block, autocast, init_weights, run_group,
                                     scale_residual_projections)
from bitlm_core.model.act import act_blocks, init_halting
from bitlm_core.model.reversible import reversible


def layout_class(layout: str) -> type["BitTransformerLM"]:
    """The model class of a layout name (``flat`` or ``framed``)."""
    cls = BitTransformerLM.layouts.get(layout)
    if cls is None:
        raise ValueError(f"model.layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return cls


class BitTransformerLM(nn.Module):
    """The shared backbone of both layouts (see the module docs).

    A subclass builds its own input embeddings first, then calls :meth:`_add_backbone`, then
    builds its output head and calls :meth:`_init_parameters`: parameters are created in that
    order, which fixes the state dict, the optimizer's parameter order and the random numbers
    drawn at initialisation.
    """

    layout: ClassVar[str] = ""
    layouts: ClassVar[dict[str, type["BitTransformerLM"]]] = {}  # filled by the subclasses

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("layout"):  # a layout's own class (not, e.g., FSDP's subclass of it)
            BitTransformerLM.layouts[cls.layout] = cls

    def __new__(cls, *args, **kwargs):
        if cls is BitTransformerLM:
            cfg = args[0] if args else kwargs["cfg"]
            cls = layout_class(cfg.layout)
        return super().__new__(cls)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.layout != self.layout:
            raise ValueError(f"{type(self).__name__} is the {self.layout!r} layout, the config "
                             f"asks for {cfg.layout!r}")
        self.cfg = cfg

    # -- construction (called by subclasses, in this order) -------------------------------
    def _add_backbone(self, backend) -> None:
        cfg, C = self.cfg, self.cfg.d_model
        self.pos = nn.Embedding(cfg.max_positions, C)
        if cfg.neighbours:  # non-causal objectives: neighbours without learning to attend
            self.neighbour_mix = nn.Linear(2 * cfg.neighbours * C, C)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, backend) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(C)
        if cfg.act:  # adaptive computation time: a halting unit per position
            self.halt = nn.Linear(C, 1)

    def _init_parameters(self) -> None:
        self.apply(init_weights)
        scale_residual_projections(self, self.cfg.n_layers)
        if self.cfg.act:
            init_halting(self.halt, self.cfg.act_max_steps or self.cfg.n_layers)

    # -- what every layout has --------------------------------------------------------------
    @property
    def frame_bits(self) -> int:
        return self.cfg.frame_bits

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_backend(self, backend) -> None:
        for block in self.blocks:
            block.attn.backend = backend

    def backbone(self, x, causal: bool, start: int = 0, caches=None, need_weights=False):
        """Embedded positions ``x (B, T, C)`` starting at ``start`` -> (normed states, maps).

        ``caches`` (one dict per block) makes attention keep and extend its keys and values,
        for incremental decoding. The blocks compute in ``cfg.precision`` (autocast; the
        weights stay float32) and the states come out in float32.
        """
        x = self.enter(x, start)
        with autocast(self.cfg.precision, x.device):
            if self.cfg.act:
                x, maps = act_blocks(self, x, causal, caches, need_weights)
            else:
                x, maps = self.run_blocks(x, causal, caches, need_weights)
        return self.ln_f(x.float()), maps

    def enter(self, x, start: int = 0):
        """Embedded positions ``x (B, T, C)`` starting at ``start``, as the first block takes
        them: plus the position table, through dropout."""
        T = x.size(1)
        if start + T > self.cfg.max_positions:
            raise BitsError(f"input needs {start + T} positions, the model has "
                            f"{self.cfg.max_positions}; score long texts with a sliding window")
        return self.drop(x + self.pos(torch.arange(start, start + T, device=x.device)))

    def run_blocks(self, x, causal: bool, caches=None, need_weights=False, blocks=None):
        """The transformer blocks (or those of ``blocks``, a slice of them: a pipeline's
        stage) on ``x``: plain, reversible (``cfg.reversible``) or with their activations
        recomputed in backward (``cfg.checkpointing``)."""
        cfg = self.cfg
        blocks = self.blocks if blocks is None else blocks
        if cfg.reversible:
            return reversible(blocks, x, causal, caches, need_weights)
        group = {"none": 0, "blocks": 1, "every_k": cfg.checkpoint_k}[cfg.checkpointing]
        if not group or caches is not None or not torch.is_grad_enabled():
            return run_group(blocks, x, causal, caches, need_weights)
        maps = []
        for i in range(0, len(blocks), group):
            x, ws = checkpoint(run_group, blocks[i:i + group], x, causal, None,
                               need_weights, use_reentrant=False)
            maps.extend(ws)
        return x, maps

    def mix_neighbours(self, x):
        """Non-causal input (B, T, C): add a learned map of the ``neighbours`` embeddings on
        either side of each position (zeros past the ends). Measured on masked frame diffusion
        (quickstart corpus, 600 steps): a bound of 4.40 bits per byte without, 3.69 with one
        neighbour on either side, 3.18 with three (the default for non-causal objectives), 3.20
        with seven. From absolute positions alone the transformer learns to attend to its
        neighbours slowly; a causal model needs none of this (its input is the previous frame)."""
        if not self.cfg.neighbours:
            return x
        parts = []
        for k in range(1, self.cfg.neighbours + 1):
            pad = x.new_zeros(x.size(0), min(k, x.size(1)), x.size(2))
            parts.append(torch.cat([pad, x[:, :-k]], dim=1)[:, : x.size(1)])
            parts.append(torch.cat([x[:, k:], pad], dim=1)[:, -x.size(1):])
        return x + self.neighbour_mix(torch.cat(parts, dim=-1))

    @staticmethod
    def check_input(tokens) -> None:
        if tokens.dim() != 2:
            raise BitsError(f"model input must have shape (B, L), got {tuple(tokens.shape)}")

    # -- what each layout defines -------------------------------------------------------------
    def forward(self, tokens, causal: bool = True, return_attention: bool = False,
                targets=None):
        """tokens (B, L) -> logits (B, L, 2); with ``return_attention`` also per-layer maps.

        Causal: tokens are bits and logits[:, i] depends only on tokens[:, :i]. Non-causal:
        tokens may hold MASK and logits[:, i] predicts bit i from every token. Non-causal with
        ``targets`` (framed layout; bits (B, L)): bit i of a frame is predicted from every token
        and from the target bits before it *in its own frame* (the chain rule within a frame,
        for objectives that mask whole frames).
        """
        raise NotImplementedError

    def causal_input(self, tokens):
        """Causal mode's input (B, T, C) for bits (B, L), before :meth:`enter`: position
        ``t`` holds what the prediction of backbone position ``t`` may read."""
        raise NotImplementedError

    def causal_head(self, h, tokens):
        """Causal logits (B, L, 2) from the normed backbone states ``h`` of ``tokens``."""
        raise NotImplementedError

    def decoder(self, prompt, cache: bool = True):
        """A decoder primed with ``prompt`` (B, P) bits of whole frames: key/value-cached, or
        (``cache=False``) one full forward pass per bit, the slow reference. It has
        ``logits() -> (B, 2)`` for the next bit, ``push(bits (B,))`` and ``history (B, P')``."""
        from bitlm_core.model.decoding import FullForwardDecoder

        return self.cached_decoder(prompt) if cache else FullForwardDecoder(self, prompt)

    def cached_decoder(self, prompt, bounded: bool = False):
        """The layout's key/value-cached decoder (see :meth:`decoder`); ``bounded`` keeps only
        the history it may need again (for coding long streams)."""
        raise NotImplementedError

    def frame_states(self, tokens):
        """Non-causal backbone states of whole frames: the framed layout's (see there)."""
        raise BitsError(f"frame_states needs the framed layout; this model is {self.layout}")
