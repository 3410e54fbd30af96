"""The framed layout's local predictors: a frame's bits one at a time from the backbone state.

``model.local`` selects one of them: ``joint`` (:class:`JointBitPredictor`, the default),
``tree`` and ``node_mlp`` (:class:`TreeBitPredictor`), ``mlp`` (:class:`LocalBitPredictor`).
Each maps ``h (..., C)`` and the frame's bits ``(..., F)`` to causal logits ``(..., F, 2)``,
where entry ``j`` reads only bits ``< j``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitlm_core.model.config import LOCALS, ModelConfig
from bitlm_core.model.layers import MLP


class LocalBitPredictor(nn.Module):
    """Predicts a frame's bits one at a time (framed layout).

    Bit ``j`` of frame ``t`` is predicted from ``h_t`` (the backbone's summary of frames < t),
    the phase ``j``, and the frame's earlier bits ``b_0 .. b_{j-1}``, entered as a sum of
    (phase, value) embeddings, which is an exact, order-aware code of the prefix. Residual MLP
    layers then compute the 2-way logits. All F bits of a frame are computed in parallel in
    training (the prefix sums are exclusive cumulative sums), so no bit sees itself or later bits.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        F_, d = cfg.frame_bits, cfg.local_dim
        self.frame_bits = F_
        self.inp = nn.Linear(cfg.d_model, d)
        self.phase = nn.Parameter(torch.zeros(F_, d))
        self.prefix = nn.Embedding(F_ * 2, d)  # (phase, bit value) -> vector
        self.layers = nn.ModuleList(
            nn.ModuleDict({"ln": nn.LayerNorm(d), "mlp": MLP(d, 4 * d, cfg.dropout)})
            for _ in range(cfg.local_layers)
        )
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2)

    def prefix_code(self, bits):
        """bits (..., F) in {0, 1} -> (..., F, d): exclusive cumulative sum of bit embeddings."""
        idx = torch.arange(self.frame_bits, device=bits.device) * 2 + bits.long()
        emb = self.prefix(idx)  # (..., F, d)
        shifted = torch.cat([torch.zeros_like(emb[..., :1, :]), emb[..., :-1, :]], dim=-2)
        return torch.cumsum(shifted, dim=-2)  # exact: bit j's entry never adds then subtracts

    def forward(self, h, bits=None):
        """h (..., C); bits (..., F) or None (non-causal) -> logits (..., F, 2)."""
        z = self.inp(h).unsqueeze(-2) + self.phase  # (..., F, d)
        if bits is not None:
            z = z + self.prefix_code(bits)
        for layer in self.layers:
            z = z + layer["mlp"](layer["ln"](z))
        return self.head(self.ln_f(z))


def prefix_nodes(bits, frame_bits: int):
    """bits (..., F) -> (..., F): the binary-tree node of each bit, chosen by the bits before it.

    Level ``j`` of the tree has ``2**j`` nodes, one per value of ``bits[..., :j]`` (MSB first);
    node ids run level by level, so bit ``j`` with prefix value ``p`` is node ``2**j - 1 + p``.
    """
    F_ = frame_bits
    place = 2 ** torch.arange(F_ - 1, -1, -1, device=bits.device)  # MSB first
    b = bits.long() * place
    before = torch.cumsum(b, dim=-1) - b  # exact integers: value of bits[:j] shifted up
    prefix = before // (2 ** (F_ - torch.arange(F_, device=bits.device)))
    return (2 ** torch.arange(F_, device=bits.device) - 1) + prefix


class TreeBitPredictor(nn.Module):
    """Predicts a frame's bits one at a time with parameters chosen by each bit's prefix.

    The bits before bit ``j`` select a node of a binary tree (``2**F - 1`` nodes: 511 for 9-bit
    frames). With ``hidden=False`` (``local: tree``) the node holds a linear classifier of a
    shared projection ``z = gelu(W h_t)``. With ``hidden=True`` (``local: node_mlp``) the node
    also holds a bias added before the non-linearity, so each node computes its own
    one-hidden-layer function of ``h_t``: ``logits = V[node] . gelu(W h_t + E[node])``. ``W h_t``
    is computed once per frame, so a bit costs ``3 * local_dim`` multiply-adds. Either way the
    parity bit's node is chosen by the 8 data bits, so it can be learnt exactly. Non-causal use
    (no prefix known) uses one extra node per bit phase.
    """

    def __init__(self, cfg: ModelConfig, hidden: bool):
        super().__init__()
        F_, d = cfg.frame_bits, cfg.local_dim
        if F_ > 12:
            raise ValueError(f"tree local predictors support frames of up to 12 bits, got "
                             f"{F_}; use model.local: mlp")
        self.frame_bits = F_
        self.ln = nn.LayerNorm(cfg.d_model)
        self.inp = nn.Linear(cfg.d_model, d)
        n_nodes = 2 ** F_ - 1 + F_  # the tree, then one prefix-free node per phase
        self.weight = nn.Parameter(torch.randn(n_nodes, 2, d) * 0.02)
        self.bias = nn.Parameter(torch.zeros(n_nodes, 2))
        self.node_hidden = nn.Parameter(torch.zeros(n_nodes, d)) if hidden else None

    def forward(self, h, bits=None):
        """h (..., C); bits (..., F) or None (non-causal) -> logits (..., F, 2)."""
        F_ = self.frame_bits
        if bits is None:
            node = torch.arange(2 ** F_ - 1, 2 ** F_ - 1 + F_, device=h.device)
            node = node.expand(*h.shape[:-1], F_)
        else:
            node = prefix_nodes(bits, F_)  # (..., F)
        pre = self.inp(self.ln(h)).unsqueeze(-2)  # (..., 1, d)
        if self.node_hidden is not None:
            pre = pre + self.node_hidden[node]  # (..., F, d)
        z = F.gelu(pre)
        return torch.einsum("...fd,...fcd->...fc", z.expand(*node.shape, -1),
                            self.weight[node]) + self.bias[node]


class JointBitPredictor(nn.Module):
    """Predicts a frame's bits one at a time from one score per frame value (``local: joint``).

    ``h_t`` gives a score ``s_v`` to each of the ``2**F`` values ``v`` a frame can take. The
    probability of bit ``j`` given the frame's earlier bits is read from those scores exactly:

        P(b_j = x | b_<j) = sum(exp s_v : v starts with b_<j, x) / sum(exp s_v : v starts with b_<j)

    so a bit never depends on itself or on later bits, and the bits' log-probabilities add up to
    the log-softmax of the whole frame. Every score takes part in every bit it can affect, which
    lets all bits of a frame learn from each example; that is why it learns faster than
    per-node classifiers (``tree``, ``node_mlp``), which see a node only when its prefix occurs.

    The sums are built level by level from ``exp(s - max s)``: level ``F`` holds the values,
    level ``k`` the ``2**k`` sums over the values sharing a prefix of length ``k`` (pairwise
    adds of strided views: a reduction over a last dimension of 2 is ten times slower); bit
    ``j`` with prefix ``p`` has logits ``log`` of the two level-``j+1`` sums below ``p``. A sum that
    underflows (its values lie more than about 87 nats below the best one) is clamped to the
    smallest normal float, so probabilities are exact except in that far tail, where they are
    floored and every loss stays finite. Non-causal use (no prefix known) returns each bit's
    marginal: the sums over the values with that bit at 0 and at 1.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        F_ = cfg.frame_bits
        if F_ > 12:
            raise ValueError(f"model.local 'joint' supports frames of up to 12 bits, got {F_}; "
                             f"use model.local: mlp")
        self.frame_bits = F_
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, 2 ** (F_ - 1) if cfg.frame_parity else 2 ** F_)
        n = F_ - 1 if cfg.frame_parity else F_  # bits that index the scores
        value = torch.arange(2 ** n)
        # value_bits[v, i]: bit i (MSB first) of value v, for conditioning on known bits
        self.register_buffer("value_bits", ((value[:, None] >> torch.arange(n - 1, -1, -1))
                                            & 1).float(), persistent=False)
        self.register_buffer("pair", torch.arange(2), persistent=False)  # a prefix's two ways
        if cfg.frame_parity:  # the parity bit of each data value, placed after it
            self.register_buffer("parity", self.value_bits.sum(-1) % 2, persistent=False)
        else:
            self.parity = None

    def forward(self, h, bits=None, known=None):
        """h (..., C); bits (..., F) -> causal logits (..., F, 2). Non-causal (``bits`` None):
        each bit's marginal, given the frame's ``known`` tokens (..., F) in {0, 1, MASK} when
        passed: only the values that agree with every known bit keep their mass."""
        F_ = self.frame_bits
        n = F_ - 1 if self.parity is not None else F_  # bits scored through ``e``
        if bits is None:
            return self._marginals(self._weights(h), n, known)
        levels = self.frame_levels(h)
        e = levels[0]
        pairs = []
        prefix = prefix_nodes(bits, F_) - (2 ** torch.arange(F_, device=bits.device) - 1)
        two = torch.arange(2, device=bits.device)
        for j in range(n):  # the two length-(j+1) prefixes extending bit j's prefix
            pairs.append(levels[n - 1 - j].gather(-1, 2 * prefix[..., j, None] + two))
        if self.parity is not None:  # data value -> all its mass on its own parity
            data = prefix[..., F_ - 1, None]
            odd = self.parity[data]
            pairs.append(e.gather(-1, data) * torch.cat([1 - odd, odd], -1))
        return torch.stack(pairs, dim=-2).clamp_min(torch.finfo(e.dtype).tiny).log()

    def _weights(self, h):
        s = self.head(self.ln(h)).float()  # one score per value, MSB-first order
        return torch.exp(s - s.detach().amax(dim=-1, keepdim=True))

    def frame_levels(self, h):
        """h (..., C) -> the prefix sums every bit of a frame is read from: ``levels[i]`` holds
        the sums over the values sharing a prefix of length ``n - i`` (``levels[0]``: the
        values' weights). Decoding computes them once per frame (:meth:`next_bit_logits`)."""
        levels = [self._weights(h)]
        n = self.frame_bits - 1 if self.parity is not None else self.frame_bits
        for _ in range(n - 1):
            levels.append(levels[-1][..., 0::2] + levels[-1][..., 1::2])
        return levels

    def next_bit_logits(self, levels, j: int, value):
        """Logits (B, 2) of bit ``j`` of a frame whose first ``j`` bits, read as a number MSB
        first, are ``value`` (B, 1) (long), from :meth:`frame_levels` of (B, C): entry ``j``
        of :meth:`forward`'s causal logits, computed alone, so that decoding a frame costs one
        score head and a gather per bit, not a head per bit."""
        e, n = levels[0], len(levels)
        if j < n:
            pair = levels[n - 1 - j].gather(-1, 2 * value + self.pair)
        else:  # the parity bit: all of the data value's mass on its own parity
            odd = self.parity[value]
            pair = e.gather(-1, value) * torch.cat([1 - odd, odd], -1)
        return pair.clamp_min(torch.finfo(e.dtype).tiny).log()

    def frame_log_probs(self, h):
        """h (..., C) -> (..., 2**n) log-probabilities of the frame's values (MSB first; the
        data values when the last bit is parity): the distribution the bits are read from."""
        return torch.log_softmax(self.head(self.ln(h)).float(), dim=-1)

    def _marginals(self, e, n: int, known=None):
        """Marginal of every bit under the value distribution, restricted (when ``known`` is
        given) to the values that agree with the frame's known bits (a MASK agrees with
        anything)."""
        w = e
        if known is not None:
            known = known.long()
            free = known > 1  # MASK
            data = known[..., :n].unsqueeze(-2).float()  # (..., 1, n)
            agree = (self.value_bits == data) | free[..., :n].unsqueeze(-2)  # (..., V, n)
            keep = agree.all(dim=-1)
            if self.parity is not None:
                par = known[..., n:].float()
                keep &= (self.parity == par) | free[..., n:]
            w = e * keep
        total = w.sum(-1, keepdim=True)
        ones = w @ self.value_bits  # (..., n): mass with bit i = 1
        if self.parity is not None:
            ones = torch.cat([ones, (w * self.parity).sum(-1, keepdim=True)], dim=-1)
        pairs = torch.stack([total - ones, ones], dim=-1)
        return pairs.clamp_min(torch.finfo(e.dtype).tiny).log()


def make_local(cfg: ModelConfig) -> nn.Module:
    """The local bit predictor ``cfg.local`` names."""
    if cfg.local == "joint":
        return JointBitPredictor(cfg)
    if cfg.local == "mlp":
        return LocalBitPredictor(cfg)
    if cfg.local in LOCALS:
        return TreeBitPredictor(cfg, hidden=cfg.local == "node_mlp")
    raise ValueError(f"model.local must be one of {', '.join(LOCALS)}, got {cfg.local!r}")
