"""The ``reference`` attention backend: explicit softmax(QK^T / sqrt(D)) V.

It is the numerical reference every faster backend is checked against, and the only built-in
backend that can return attention maps (``need_weights=True``).
"""

from __future__ import annotations

import math


def causal_mask(tq: int, tk: int, device=None):
    """(tq, tk) bool mask, True where query i may attend key j (bottom-right aligned)."""
    import torch

    offset = tk - tq
    rows = torch.arange(tq, device=device).unsqueeze(1)
    cols = torch.arange(tk, device=device).unsqueeze(0)
    return cols <= rows + offset


class ReferenceAttention:
    name = "reference"
    supports_weights = True

    def __call__(self, q, k, v, *, causal: bool, dropout_p: float = 0.0,
                 need_weights: bool = False):
        import torch
        import torch.nn.functional as F

        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        if causal:
            mask = causal_mask(q.size(-2), k.size(-2), q.device)
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
        out = torch.matmul(dropped, v)
        return out, (weights if need_weights else None)


#: Order in which ``auto`` tries backends; installed backends not listed come after these.
AUTO_PREFERENCE = ("sdpa", "reference")


def auto_attention():
    """The fastest installed backend (``sdpa`` when its plugin is installed, else ``reference``).

    The chosen backend's ``name`` says which one was picked; ``bitlm run`` prints it.
    """
    from bitlm_core.registry import get_registry

    registry = get_registry()
    names = [n for n in AUTO_PREFERENCE if registry.get("attention", n)]
    names += [n for n in registry.names("attention") if n not in names and n != "auto"]
    for name in names:
        try:
            backend = registry.build("attention", name, {}, "attention")
        except Exception:  # a backend that needs options cannot be picked blindly
            continue
        if not hasattr(backend, "name"):
            backend.name = name
        return backend
    return ReferenceAttention()
