"""The optimizer and its schedule: AdamW, warm-up then cosine decay, state kept across growth."""

from __future__ import annotations

import math
from typing import Any

import torch

from bitlm_core.spec import TrainSection


def lr_at(step: int, t: TrainSection) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``t.steps``.

    ``step`` counts optimizer steps (not micro-batches), so the horizon is the real number of
    updates whatever ``grad_accum`` is.
    """
    warmup = min(t.warmup_steps, max(t.steps - 1, 0))
    if step < warmup:
        return t.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, t.steps - warmup)
    floor = t.lr * t.min_lr_ratio
    return floor + 0.5 * (t.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, t: TrainSection,
                   parameters=None) -> torch.optim.AdamW:
    """AdamW over the model's parameters (or those of ``parameters``, a pipeline's stage);
    weight decay on matrices only (not on biases, norms or embeddings' 1-D vectors)."""
    params = list(model.parameters() if parameters is None else parameters)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=t.lr, betas=(t.beta1, t.beta2))


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """The gradient norm before clipping to ``max_norm`` (0 disables clipping and returns 0)."""
    if max_norm <= 0:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))


def carry_optimizer_state(old_state, before: dict[str, Any], model, new_state) -> int:
    """Move optimizer state (Adam moments, step counts) across a growth.

    ``old_state`` is the optimizer's ``state`` before the growth, keyed by parameter;
    ``before`` maps the model's parameter names to the parameters it had then; ``new_state``
    is the new optimizer's ``state``. A parameter that survived keeps its state. A parameter
    that a growth replaced by a larger one of the same name (more positions, more feed-forward
    units: the trained values sit in its leading corner) gets the old moments in that corner,
    so the trained part does not restart its moment estimates. The new entries start with both
    moments at zero. Their first Adam step is then the learning rate, as for a new parameter,
    but the next ones grow to about twice it for some tens of steps: the step count, carried for
    the whole tensor, has already switched off Adam's start-up correction. That was measured and
    kept: starting their second moment at the trained entries' mean instead, which keeps those
    steps small, ended 0.04 bits per byte worse on two seeds (benchmarks/scaling.py, width).
    Returns how many parameters kept state.
    """
    kept = 0
    for name, p in model.named_parameters():
        old = before.get(name)
        if old is None or old not in old_state:
            continue
        if old is p:
            new_state[p] = old_state[p]
        elif old.dim() == p.dim() and all(o <= n for o, n in zip(old.shape, p.shape)):
            corner = tuple(slice(0, o) for o in old.shape)
            moved = {}
            for key, value in old_state[old].items():
                if torch.is_tensor(value) and value.shape == old.shape:
                    grown = torch.zeros_like(p, dtype=value.dtype)
                    grown[corner] = value
                    value = grown
                moved[key] = value
            new_state[p] = moved
        else:
            continue
        kept += 1
    return kept
