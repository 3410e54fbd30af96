"""Reversible blocks: each block's attention and feed-forward halves as a RevNet coupling.

The residual stream is carried twice, ``(x1, x2)``, both the embedded input at first; block
``i`` computes ``y1 = x1 + F(x2)`` and ``y2 = x2 + G(y1)`` with ``F`` its attention half
(``drop(attn(ln1(.)))``) and ``G`` its feed-forward half (``mlp(ln2(.))``); the backbone's
output is ``(x1 + x2) / 2`` (Gomez et al., "The Reversible Residual Network", 2017; the
coupling of Kitaev et al.'s Reformer, 2020). A block's inputs follow from its outputs,
``x2 = y2 - G(y1)`` and ``x1 = y1 - F(x2)``, so backward rebuilds them block by block from the
last block's outputs instead of keeping every block's activations: :class:`ReversibleStack`
keeps two tensors of the residual stream whatever the depth. Reconstruction is exact in exact
arithmetic only; in float32 it differs from the stored inputs by rounding (tested within a
stated tolerance).

The parameters are those of a plain block (same names and shapes), and a block whose two
output projections are zero is the identity here too, so depth growth works unchanged.
Dropout is replayed in backward: the random state before each half is saved in forward and
restored for its recomputation. Without gradients (evaluation, decoding with the key/value
cache) the coupling runs as a plain loop.
"""

from __future__ import annotations

import contextlib

import torch


def attention_half(block, x, causal: bool, cache=None, need_weights: bool = False):
    """F of the coupling: (drop(attn(ln1(x))), attention maps)."""
    a, weights = block.attn(block.ln1(x), causal, cache, need_weights)
    return block.drop(a), weights


def feedforward_half(block, x):
    """G of the coupling: mlp(ln2(x))."""
    return block.mlp(block.ln2(x))


def coupling_step(block, x1, x2, causal: bool, cache=None, need_weights: bool = False):
    """One reversible block: (y1, y2, attention map)."""
    f, w = attention_half(block, x2, causal, cache, need_weights)
    y1 = x1 + f
    return y1, x2 + feedforward_half(block, y1), w


def coupled(blocks, x, causal: bool, caches=None, need_weights: bool = False):
    """The coupling as a plain loop (autograd keeps what it needs): (output, maps)."""
    x1 = x2 = x
    maps = []
    for i, block in enumerate(blocks):
        x1, x2, w = coupling_step(block, x1, x2, causal,
                                  None if caches is None else caches[i], need_weights)
        maps.append(w)
    return (x1 + x2) / 2, maps


def reversible(blocks, x, causal: bool, caches=None, need_weights: bool = False):
    """The blocks on ``x`` (B, T, C) as a reversible stack: (output, maps). With gradients
    (training) backward rebuilds inputs from outputs; otherwise, or when attention maps or a
    cache are asked for, the plain loop."""
    if not torch.is_grad_enabled() or caches is not None or need_weights or not len(blocks):
        return coupled(blocks, x, causal, caches, need_weights)
    params = [p for block in blocks for p in block.parameters()]
    replay = any(block.training and block.drop.p > 0 for block in blocks)
    y1, y2 = ReversibleStack.apply(x, list(blocks), causal, replay, *params)
    return (y1 + y2) / 2, [None] * len(blocks)


def _device_generator(device):
    """(get, set) of the random state that dropout on ``device`` draws from, besides the
    CPU's: CUDA's of that GPU, MPS's; None for the CPU."""
    if device.type == "cuda":
        return (lambda: torch.cuda.get_rng_state(device),
                lambda s: torch.cuda.set_rng_state(s, device))
    if device.type == "mps":
        return torch.mps.get_rng_state, torch.mps.set_rng_state
    return None


def _rng_state(device):
    generator = _device_generator(device)
    return {"cpu": torch.get_rng_state(),
            "device": generator[0]() if generator is not None else None}


@contextlib.contextmanager
def _replayed(state, device):
    """The random state ``state`` inside the block, the current one restored after."""
    if state is None:
        yield
        return
    generator = _device_generator(device)
    now = _rng_state(device)
    torch.set_rng_state(state["cpu"])
    if generator is not None:
        generator[1](state["device"])
    try:
        yield
    finally:
        torch.set_rng_state(now["cpu"])
        if generator is not None:
            generator[1](now["device"])


def _autocast_state(device_type: str):
    """Forward's autocast, for backward's recomputation (which autograd runs without it)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return device_type, torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type autocast does not know (meta)
        pass
    return None


def _autocast_as(state):
    return contextlib.nullcontext() if state is None else torch.autocast(state[0],
                                                                           dtype=state[1])


class ReversibleStack(torch.autograd.Function):
    """forward(x, blocks, causal, replay, *params) -> (y1, y2) of the last block, keeping only
    those two tensors (and the random states when ``replay``); backward walks the blocks in
    reverse, rebuilding each block's inputs and recomputing its halves with gradients.

    The parameters are inputs only so that the outputs require gradients whenever they do;
    their gradients are accumulated by the nested backward of each half (as reentrant
    checkpointing does), so this function returns None for them."""

    @staticmethod
    def forward(ctx, x, blocks, causal, replay, *params):
        ctx.blocks, ctx.causal, ctx.n_params = blocks, causal, len(params)
        ctx.autocast = _autocast_state(x.device.type)
        ctx.states = []
        x1 = x2 = x
        with torch.no_grad():
            for block in blocks:
                f_state = _rng_state(x.device) if replay else None
                x1 = x1 + attention_half(block, x2, causal)[0]
                g_state = _rng_state(x.device) if replay else None
                x2 = x2 + feedforward_half(block, x1)
                ctx.states.append((f_state, g_state))
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2 = ctx.saved_tensors
        device = y1.device
        for block, (f_state, g_state) in zip(reversed(ctx.blocks), reversed(ctx.states)):
            # each half's recomputed graph is run backward here, one block at a time: the
            # parameters' gradients accumulate through autograd as usual (their hooks fire),
            # and no more than one block's gradients and activations exist at once
            with torch.enable_grad(), _autocast_as(ctx.autocast):
                y1_ = y1.detach().requires_grad_()
                with _replayed(g_state, device):
                    g = feedforward_half(block, y1_)
            torch.autograd.backward(g, dy2)
            with torch.no_grad():
                x2 = y2 - g
                dx1 = dy1 + y1_.grad
            del g, y1_
            with torch.enable_grad(), _autocast_as(ctx.autocast):
                x2_ = x2.detach().requires_grad_()
                with _replayed(f_state, device):
                    f = attention_half(block, x2_, ctx.causal)[0]
            torch.autograd.backward(f, dx1)
            with torch.no_grad():
                x1 = y1 - f
                dx2 = dy2 + x2_.grad
            del f, x2_
            y1, y2, dy1, dy2 = x1, x2, dx1, dx2
        return (dy1 + dy2, None, None, None, *([None] * ctx.n_params))
