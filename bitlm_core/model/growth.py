"""Growing a trained model without changing what it computes: more layers, wider feed-forward.

Both operations work in place, keep every trained weight, and update ``model.cfg`` so that a
checkpoint saved afterwards records the new size (and :func:`fit_to_config` can rebuild it):

* :func:`add_layers` appends transformer blocks (copies of the existing ones by default) whose
  two residual projections (attention output and feed-forward output) start at zero. A
  pre-norm block computes ``x = x + attn(ln1(x))`` then ``x = x + mlp(ln2(x))``, so a new
  block is the identity until training moves those projections, which get gradients from the
  first step (their inputs are not zero).
* :func:`widen_feedforward` gives every block's feed-forward layer more hidden units: the new
  units get input weights (copies of existing units' by default), so they compute something
  from the start, and zero output weights, so the block's output is unchanged until training
  uses them.

* :func:`expand_positional_encoding` gives the model more positions, keeping the trained ones.

These are the operations behind the ``depth``, ``width`` and ``context`` scaling strategies.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bitlm_core.errors import BitlmError, CheckpointError, OptionError

LAYER_INITS = ("copy", "random")  # where grown parts start: copies of trained ones, or new


def check_init(init: Any, where: str = "") -> str:
    """``init`` when it is one of :data:`LAYER_INITS`, else an :class:`OptionError` (a
    ValueError too, so a strategy's factory can use it as is; it names ``where`` when given)."""
    if init not in LAYER_INITS:
        prefix = f"{where}: " if where else ""
        raise OptionError(f"{prefix}init must be one of {', '.join(LAYER_INITS)}, got {init!r}")
    return init


def add_layers(model, n: int, init: str = "copy") -> None:
    """Append ``n`` blocks that leave the model's outputs unchanged (see the module docs).

    ``init="copy"`` makes the new blocks copies of the existing ones, bottom up (2 blocks grown
    by 2 become 0, 1, copy of 0, copy of 1: "stacking"), so their attention and feed-forward
    layers start from trained features; ``"random"`` draws them like a new model. Either way
    the two residual output projections of each new block start at zero.
    """
    import copy

    import torch

    from bitlm_core.model.layers import Block, init_weights

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise BitlmError(f"add_layers: n must be a positive integer, got {n!r}")
    check_init(init, "add_layers")
    ref = next(model.parameters())
    existing = list(model.blocks)
    for i in range(n):
        if init == "copy" and existing:
            source = existing[i % len(existing)]
            backend = source.attn.backend  # shared, not copied: a backend may hold resources
            block = copy.deepcopy(source, memo={id(backend): backend})
        else:
            block = Block(model.cfg, existing[0].attn.backend if existing else None)
            block.apply(init_weights)
            block.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for proj in (block.attn.proj, block.mlp.proj):
                proj.weight.zero_()
                proj.bias.zero_()
        model.blocks.append(block)
    model.cfg = dataclasses.replace(model.cfg, n_layers=len(model.blocks))


def widen_feedforward(model, d_ff: int, init: str = "copy") -> None:
    """Give every block ``d_ff`` feed-forward hidden units (more than it has; see module docs).

    ``init="copy"``: new unit ``j`` starts with the input weights of unit ``j mod d_ff_old``, a
    feature the block has already learned; ``"random"``: drawn like a new model. Either way its
    output weights start at zero.
    """
    import torch
    import torch.nn as nn

    from bitlm_core.model.layers import INIT_STD

    old_ff = model.cfg.d_ff
    if isinstance(d_ff, bool) or not isinstance(d_ff, int) or d_ff <= old_ff:
        raise BitlmError(f"widen_feedforward: d_ff must be an integer above the model's "
                         f"{old_ff}, got {d_ff!r}; it only grows")
    check_init(init, "widen_feedforward")
    source = torch.arange(old_ff, d_ff) % old_ff
    for block in model.blocks:
        fc, proj = block.mlp.fc, block.mlp.proj
        kw = {"device": fc.weight.device, "dtype": fc.weight.dtype}
        new_fc = nn.Linear(fc.in_features, d_ff, **kw)
        new_proj = nn.Linear(d_ff, proj.out_features, **kw)
        with torch.no_grad():
            new_fc.weight[:old_ff], new_fc.bias[:old_ff] = fc.weight, fc.bias
            if init == "copy":
                new_fc.weight[old_ff:] = fc.weight[source]
                new_fc.bias[old_ff:] = fc.bias[source]
            else:
                nn.init.normal_(new_fc.weight[old_ff:], mean=0.0, std=INIT_STD)
                new_fc.bias[old_ff:] = 0.0
            new_proj.weight.zero_()
            new_proj.weight[:, :old_ff] = proj.weight
            new_proj.bias.copy_(proj.bias)
        block.mlp.fc, block.mlp.proj = new_fc, new_proj
    model.cfg = dataclasses.replace(model.cfg, d_ff=d_ff)


def fit_to_config(model, saved: dict[str, Any] | None) -> None:
    """Grow a model built from a run's spec to the size its checkpoint was saved at.

    ``saved`` is the checkpoint's ``model_config`` (JSON data, never evaluated). A run whose
    scaling strategy grew the model saved more positions, layers or feed-forward units than the
    spec builds; anything else that differs is left for the weight loader to report.
    """
    saved = saved or {}
    frames, layers, d_ff = (saved.get(k) for k in ("max_frames", "n_layers", "d_ff"))
    for key, value in (("max_frames", frames), ("n_layers", layers), ("d_ff", d_ff)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise CheckpointError(f"checkpoint model_config.{key} is {value!r}, not an integer "
                                  "(the checkpoint's state.json is damaged)")
    if frames is not None and frames > model.cfg.max_frames:
        expand_positional_encoding(model, frames)
    if layers is not None and layers > model.cfg.n_layers:
        add_layers(model, layers - model.cfg.n_layers)
    if d_ff is not None and d_ff > model.cfg.d_ff:
        widen_feedforward(model, d_ff)


def expand_positional_encoding(model, max_frames: int) -> None:
    """Grow ``model`` to ``max_frames`` frames of context (``max_frames * frame_bits`` positions
    for the flat layout), in place.

    The existing rows of the learned position table are kept and new rows are drawn like the
    originals were at initialisation, so the outputs on positions the model already had do not
    change (causal attention never looks at later positions). The model's config is updated, so
    a checkpoint saved afterwards records the new size.
    """
    import torch
    import torch.nn as nn

    from bitlm_core.model.layers import INIT_STD

    old = model.pos
    new_cfg = dataclasses.replace(model.cfg, max_frames=max_frames)
    n_new = new_cfg.max_positions
    if n_new < old.num_embeddings:
        raise BitlmError(f"expand_positional_encoding: {max_frames} frames is fewer than the "
                         f"model has ({model.cfg.max_frames}); it only grows")
    table = nn.Embedding(n_new, old.embedding_dim, device=old.weight.device,
                         dtype=old.weight.dtype)
    with torch.no_grad():
        nn.init.normal_(table.weight, mean=0.0, std=INIT_STD)
        table.weight[: old.num_embeddings] = old.weight
    model.pos = table
    model.cfg = new_cfg
