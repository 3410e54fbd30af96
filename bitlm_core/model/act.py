"""Adaptive computation time (ACT) over the transformer's blocks (Graves, "Adaptive Computation
Time for Recurrent Neural Networks", 2016, applied across depth as in Dehghani et al.'s
Universal Transformers, 2019, with distinct blocks rather than one shared block).

After block ``n`` a halting unit gives every position a probability ``p_n = sigmoid(w .
ln_f(h_n) + b)``. A position halts at the first block ``N`` where ``p_1 + ... + p_N`` reaches
``threshold`` (or at the last block it may use, ``max_steps``). Its output state is the mixture
``sum_{n<N} p_n h_n + R h_N`` with the remainder ``R = 1 - sum_{n<N} p_n``, and its ponder cost
is ``N + R``; ``ponder_weight`` times the mean cost is added to the loss by the trainer, which
reads it, with the mean number of blocks used, from ``model.ponder`` (set by the latest forward
pass) after the objective's call.

A halted position keeps being computed by the later blocks (other positions attend to it), but
its output no longer depends on them; so once every position of a forward pass has halted, the
remaining blocks are skipped. That saves time where a whole batch halts early (evaluation,
scoring); with the key/value cache (generation) every block still runs, so that the cache holds
the keys of every block and cached decoding gives what a full forward pass gives.

The halting bias starts at ``logit(1 / (2 * blocks))``: at initialisation the probabilities sum
to about one half over all blocks, so a new model uses every block and learns to halt early.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from bitlm_core.model.layers import run_group
from bitlm_core.model.reversible import coupling_step


def latest_ponder(model) -> dict | None:
    """``model.ponder`` of the latest forward pass when the model has adaptive computation
    time, else None (a model without ACT, or any other object)."""
    if not getattr(getattr(model, "cfg", None), "act", False):
        return None
    return getattr(model, "ponder", None)


def init_halting(unit, blocks: int) -> None:
    """Zero-mean small weights (as every linear layer) and the bias of the module docs."""
    p = 1.0 / (2 * blocks)
    with torch.no_grad():
        unit.bias.fill_(math.log(p / (1 - p)))


def block_states(model, x, causal: bool, caches=None, need_weights: bool = False):
    """(state after each block, its attention map), block by block, in the model's mode:
    plain or reversible (the coupling's two streams, whose mean is the state), each block
    recomputed in backward with ``checkpointing`` (ACT keeps every block's state, so the
    reversible stack's own recomputation does not apply; checkpointing does, a block at a time
    whatever ``checkpoint_k``, since every block's state is kept anyway)."""
    cfg, blocks = model.cfg, model.blocks
    recompute = cfg.checkpointing != "none" and caches is None and torch.is_grad_enabled()
    x1 = x2 = x
    for i, block in enumerate(blocks):
        cache = None if caches is None else caches[i]
        if cfg.reversible:
            if recompute:
                x1, x2, w = checkpoint(coupling_step, block, x1, x2, causal, None,
                                       need_weights, use_reentrant=False)
            else:
                x1, x2, w = coupling_step(block, x1, x2, causal, cache, need_weights)
            yield (x1 + x2) / 2, w
        elif recompute:
            x, (w,) = checkpoint(run_group, [block], x, causal, None, need_weights,
                                 use_reentrant=False)
            yield x, w
        else:
            x, w = block(x, causal, cache, need_weights)
            yield x, w


def act_blocks(model, x, causal: bool, caches=None, need_weights: bool = False):
    """The blocks with halting: (mixed states (B, T, C) in float32, maps). Sets
    ``model.ponder`` to ``{"cost": mean N + R (a tensor with gradients), "blocks": mean N,
    "halted_early": share of positions that halted before the last block}``."""
    cfg = model.cfg
    last = min(cfg.act_max_steps or len(model.blocks), len(model.blocks))
    B, T, _ = x.shape
    total = x.new_zeros(B, T, dtype=torch.float32)  # sum of halting probabilities so far
    running = torch.ones(B, T, dtype=torch.bool, device=x.device)
    used = x.new_zeros(B, T, dtype=torch.float32)  # blocks used
    remainder = x.new_zeros(B, T, dtype=torch.float32)
    mixed = x.new_zeros(x.shape, dtype=torch.float32)
    maps = []
    for n, (h, w) in enumerate(block_states(model, x, causal, caches, need_weights), start=1):
        maps.append(w)
        if n > last:  # past max_steps: computed for the cache only
            continue
        p = torch.sigmoid(model.halt(model.ln_f(h.float())).float()).squeeze(-1)
        stop = running & ((total + p >= cfg.act_threshold) | (n == last))
        weight = torch.where(stop, 1.0 - total, torch.where(running, p, 0.0))
        mixed = mixed + weight.unsqueeze(-1) * h.float()
        remainder = torch.where(stop, 1.0 - total, remainder)
        used = used + running.float()
        total = total + torch.where(running & ~stop, p, 0.0)
        running = running & ~stop
        if caches is None and not bool(running.any()):
            maps += [None] * (len(model.blocks) - n)
            break  # every position has halted: the later blocks change no output
    model.ponder = {"cost": (used + remainder).mean(), "blocks": used.mean().detach(),
                    "halted_early": (used < last).float().mean().detach()}
    return mixed, maps
