"""BitTransformerLM: a transformer that gives a probability for every bit of a text.

Two layouts share one interface (``forward(tokens, causal) -> logits (B, L, 2)``, where
``logits[:, i]`` is the distribution of bit ``i``):

``flat``
    one transformer position per bit. In causal mode position ``i`` reads bit ``i-1`` (a BOS
    token at ``i = 0``) and predicts bit ``i``. A bit-phase embedding tells each position where
    in its byte frame the predicted bit sits.

``framed``
    the backbone runs over byte frames (``frame_bits`` bits each: 9 for ``parity9``). Frame
    ``t``'s hidden state summarises frames ``< t`` (a BOS frame first); a small local module
    predicts the frame's bits one at a time from that state plus the frame's earlier bits. The
    cost is that of a byte-level model, and prediction stays bit by bit.

Non-causal mode (for denoising objectives) reads tokens in {0, 1, MASK} and predicts each
position's own bit; nothing is shifted.

Shapes: B batch, L bits, T backbone positions, F frame bits, C = d_model, H heads, D head size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitlm_core.errors import BitsError

MASK = 2  # token value of a masked bit (non-causal objectives)
BOS = 3  # token value of "before the start" (flat layout, causal)
LAYOUTS = ("flat", "framed")
LOCALS = ("joint", "tree", "node_mlp", "mlp")  # local bit predictors of the framed layout


@dataclass(frozen=True)
class ModelConfig:
    layout: str = "framed"
    frame_bits: int = 9
    max_frames: int = 128  # context length in byte frames
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    dropout: float = 0.0
    local: str = "joint"  # framed: local bit predictor, one of LOCALS
    local_layers: int = 2  # framed, mlp: residual MLP layers of the local bit predictor
    local_dim: int = 128  # framed: width of the local bit predictor
    frame_parity: bool = False  # each frame's last bit is the even parity of the others
    neighbours: int = 0  # non-causal input: also read this many positions on either side

    @property
    def max_positions(self) -> int:
        return self.max_frames * (self.frame_bits if self.layout == "flat" else 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d, hidden)
        self.proj = nn.Linear(hidden, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model ({cfg.d_model}) must be divisible by n_heads "
                             f"({cfg.n_heads})")
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout
        self.backend = backend

    def forward(self, x, causal: bool, cache: dict | None = None, need_weights: bool = False):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
                   for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        out, weights = self.backend(q, k, v, causal=causal,
                                    dropout_p=self.dropout if self.training else 0.0,
                                    need_weights=need_weights)
        out = out.transpose(1, 2).reshape(B, T, C)
        return self.proj(out), weights


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig, backend):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg, backend)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, causal: bool, cache: dict | None = None, need_weights: bool = False):
        a, weights = self.attn(self.ln1(x), causal, cache, need_weights)
        x = x + self.drop(a)
        x = x + self.mlp(self.ln2(x))
        return x, weights


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
        if cfg.frame_parity:  # the parity bit of each data value, placed after it
            self.register_buffer("parity", self.value_bits.sum(-1) % 2, persistent=False)
        else:
            self.parity = None

    def forward(self, h, bits=None, known=None):
        """h (..., C); bits (..., F) -> causal logits (..., F, 2). Non-causal (``bits`` None):
        each bit's marginal, given the frame's ``known`` tokens (..., F) in {0, 1, MASK} when
        passed: only the values that agree with every known bit keep their mass."""
        F_ = self.frame_bits
        s = self.head(self.ln(h)).float()  # one score per value, MSB-first order
        e = torch.exp(s - s.detach().amax(dim=-1, keepdim=True))
        n = F_ - 1 if self.parity is not None else F_  # bits scored through ``e``
        if bits is None:
            return self._marginals(e, n, known)
        levels = [e]  # levels[i]: sums over the values sharing a prefix of length n - i
        for _ in range(n - 1):
            levels.append(levels[-1][..., 0::2] + levels[-1][..., 1::2])
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


class BitTransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig, backend):
        super().__init__()
        if cfg.layout not in LAYOUTS:
            raise ValueError(f"model.layout must be one of {', '.join(LAYOUTS)}, got "
                             f"{cfg.layout!r}")
        self.cfg = cfg
        Fb, C = cfg.frame_bits, cfg.d_model
        if cfg.layout == "flat":
            self.tok = nn.Embedding(4, C)  # 0, 1, MASK, BOS
            self.phase = nn.Embedding(Fb, C)
        else:
            # a whole frame, by its value (its data value when the last bit is parity)
            self.frame_table = nn.Embedding(2 ** (Fb - cfg.frame_parity), C)
            self.frame_in = nn.Embedding(Fb * 3, C)  # frames with a MASK: (phase, value) sums
            self.bos = nn.Parameter(torch.zeros(C))
        self.pos = nn.Embedding(cfg.max_positions, C)
        if cfg.neighbours:  # non-causal objectives: neighbours without learning to attend
            self.neighbour_mix = nn.Linear(2 * cfg.neighbours * C, C)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, backend) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(C)
        if cfg.layout == "flat":
            self.head = nn.Linear(C, 2)
        elif cfg.local == "joint":
            self.local = JointBitPredictor(cfg)
        elif cfg.local == "mlp":
            self.local = LocalBitPredictor(cfg)
        elif cfg.local in LOCALS:
            self.local = TreeBitPredictor(cfg, hidden=cfg.local == "node_mlp")
        else:
            raise ValueError(f"model.local must be one of {', '.join(LOCALS)}, got "
                             f"{cfg.local!r}")
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def frame_bits(self) -> int:
        return self.cfg.frame_bits

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_backend(self, backend) -> None:
        for block in self.blocks:
            block.attn.backend = backend

    # -- the backbone ---------------------------------------------------------------------
    def _backbone(self, x, causal: bool, start: int = 0, caches=None, need_weights=False):
        T = x.size(1)
        if start + T > self.cfg.max_positions:
            raise BitsError(f"input needs {start + T} positions, the model has "
                            f"{self.cfg.max_positions}; score long texts with a sliding window")
        x = self.drop(x + self.pos(torch.arange(start, start + T, device=x.device)))
        maps = []
        for i, block in enumerate(self.blocks):
            x, w = block(x, causal, None if caches is None else caches[i], need_weights)
            maps.append(w)
        return self.ln_f(x), maps

    def _frame_embed(self, tokens):
        """tokens (B, T, F) in {0, 1, MASK} -> (B, T, C).

        A whole frame is looked up by its value (a sum of per-bit vectors, linear in the bits,
        learnt far slower: 3.31 against 2.97 held-out bits per byte after 400 steps). A frame
        holding a MASK (non-causal objectives) is the sum of one vector per (phase, value).
        """
        Fb = self.frame_bits
        tokens = tokens.long()
        masked = (tokens > 1).any(dim=-1)
        data = tokens[..., : Fb - 1] if self.cfg.frame_parity else tokens
        place = 2 ** torch.arange(data.size(-1) - 1, -1, -1, device=tokens.device)  # MSB first
        x = self.frame_table((data * place).sum(dim=-1).masked_fill(masked, 0))
        if masked.any():
            idx = torch.arange(Fb, device=tokens.device) * 3 + tokens
            x = torch.where(masked.unsqueeze(-1), self.frame_in(idx).sum(dim=-2), x)
        return x

    def _mix_neighbours(self, x):
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

    def forward(self, tokens, causal: bool = True, return_attention: bool = False,
                targets=None):
        """tokens (B, L) -> logits (B, L, 2); with ``return_attention`` also per-layer maps.

        Causal: tokens are bits and logits[:, i] depends only on tokens[:, :i]. Non-causal:
        tokens may hold MASK and logits[:, i] predicts bit i from every token. Non-causal with
        ``targets`` (framed layout; bits (B, L)): bit i of a frame is predicted from every token
        and from the target bits before it *in its own frame* (the chain rule within a frame,
        for objectives that mask whole frames).
        """
        if tokens.dim() != 2:
            raise BitsError(f"model input must have shape (B, L), got {tuple(tokens.shape)}")
        B, L = tokens.shape
        Fb = self.frame_bits
        if self.cfg.layout == "flat":
            if causal:
                bos = torch.full((B, 1), BOS, dtype=tokens.dtype, device=tokens.device)
                inp = torch.cat([bos, tokens[:, :-1]], dim=1)
            else:
                inp = tokens
            phase = torch.arange(L, device=tokens.device) % Fb
            x = self.tok(inp.long()) + self.phase(phase)
            if not causal:
                x = self._mix_neighbours(x)
            if targets is not None:
                raise BitsError("targets (the chain rule within a frame) need the framed "
                                "layout; use model.layout: framed")
            h, maps = self._backbone(x, causal, need_weights=return_attention)
            logits = self.head(h)
        else:
            if L % Fb:
                raise BitsError(f"framed model input has {L} bits, not a whole number of "
                                f"{Fb}-bit frames")
            frames = tokens.view(B, L // Fb, Fb)
            if causal:
                x = self._frame_embed(frames[:, :-1])
                x = torch.cat([self.bos.expand(B, 1, -1), x], dim=1)
                h, maps = self._backbone(x, True, need_weights=return_attention)
                logits = self.local(h, frames)
            else:
                h, maps = self._backbone(self._mix_neighbours(self._frame_embed(frames)), False,
                                         need_weights=return_attention)
                if targets is not None:
                    logits = self.local(h, targets.view(B, L // Fb, Fb))
                elif self.cfg.local == "joint":
                    logits = self.local(h, known=frames)
                else:
                    logits = self.local(h)
            logits = logits.reshape(B, L, 2)
        return (logits, maps) if return_attention else logits

    def frame_states(self, tokens):
        """Framed layout, non-causal: the backbone's output (B, T, C) for tokens (B, L) that may
        hold MASK; ``self.local(h, bits)`` then gives the bits of a frame one by one."""
        if self.cfg.layout != "framed":
            raise BitsError("frame_states needs the framed layout")
        B, L = tokens.shape
        frames = tokens.view(B, L // self.frame_bits, self.frame_bits)
        return self._backbone(self._mix_neighbours(self._frame_embed(frames)), False)[0]

    # -- incremental decoding -------------------------------------------------------------
    def decoder(self, prompt, cache: bool = True):
        """A decoder primed with ``prompt`` (B, P) bits of whole frames: key/value-cached, or
        (``cache=False``) one full forward pass per bit, the slow reference."""
        return IncrementalDecoder(self, prompt) if cache else FullForwardDecoder(self, prompt)


def _prompt_bits(model: BitTransformerLM, prompt):
    """A decoder's starting history: (B, P) uint8 bits of whole frames, or a BitsError."""
    history = prompt.to(torch.uint8)
    if history.size(1) % model.frame_bits:
        raise BitsError(f"prompt has {history.size(1)} bits, not a whole number of "
                        f"{model.frame_bits}-bit frames")
    return history


class IncrementalDecoder:
    """Causal, cached, bit-by-bit decoding for both layouts.

    ``logits()`` gives (B, 2) for the next bit; ``push(bits)`` appends (B,) bits. When the
    context is full the decoder keeps the last half of it (cut at a frame boundary) and
    re-primes, so generation can run past ``max_frames``.
    """

    def __init__(self, model: BitTransformerLM, prompt):
        self.model, self.Fb, self.history = model, model.frame_bits, _prompt_bits(model, prompt)
        self._prime(self.history)

    @property
    def layout(self) -> str:
        return self.model.cfg.layout

    def _new_caches(self):
        return [dict() for _ in self.model.blocks]

    @torch.no_grad()
    def _prime(self, bits, trim: bool = False):
        """Fill the cache from whole frames; keep only the last half-context when they do not
        fit (one position goes to BOS) or when ``trim`` asks for room."""
        m, B = self.model, bits.size(0)
        if trim or bits.size(1) > (m.cfg.max_frames - 1) * self.Fb:
            keep = max(1, m.cfg.max_frames // 2) * self.Fb
            bits = bits[:, max(0, bits.size(1) - keep):]
        self.caches = self._new_caches()
        self.frame_prefix = bits[:, :0]  # bits of the current, unfinished frame
        if self.layout == "flat":
            bos = torch.full((B, 1), BOS, dtype=torch.long, device=bits.device)
            inp = torch.cat([bos, bits.long()], dim=1)  # predicts bits[0..], then the next bit
            phase = torch.arange(inp.size(1), device=bits.device) % self.Fb
            self.pos = 0
            h = self._step_flat(m.tok(inp) + m.phase(phase))
            self.last = m.head(h[:, -1])
        else:
            frames = bits.view(B, -1, self.Fb)
            x = torch.cat([m.bos.expand(B, 1, -1), m._frame_embed(frames)], dim=1)
            self.pos = 0
            h, _ = m._backbone(x, True, start=0, caches=self.caches)
            self.pos = x.size(1)
            self.h = h[:, -1]
            self.last = self._local_logits()

    def _step_flat(self, x):
        h, _ = self.model._backbone(x, True, start=self.pos, caches=self.caches)
        self.pos += x.size(1)
        return h

    def _local_logits(self):
        local = self.model.local
        j = self.frame_prefix.size(1)
        full = torch.zeros(self.h.size(0), self.Fb, dtype=torch.long, device=self.h.device)
        full[:, :j] = self.frame_prefix
        return local(self.h, full)[:, j]  # entry j only uses bits < j

    def logits(self):
        return self.last

    @torch.no_grad()
    def push(self, bit):
        m = self.model
        bit = bit.to(torch.uint8).view(-1, 1)
        self.history = torch.cat([self.history, bit], dim=1)
        L = self.history.size(1)
        if self.layout == "flat":
            if self.pos >= m.cfg.max_positions:
                self._prime(self.history[:, : L - (L % self.Fb)], trim=True)
                # re-feed the unfinished frame's bits
                for b in self.history[:, L - (L % self.Fb):].unbind(1):
                    self._feed_flat(b)
                return
            self._feed_flat(bit.view(-1))
        else:
            self.frame_prefix = torch.cat([self.frame_prefix, bit], dim=1)
            if self.frame_prefix.size(1) == self.Fb:
                if self.pos >= m.cfg.max_frames:
                    self._prime(self.history, trim=True)
                    return
                frame = self.frame_prefix.view(-1, 1, self.Fb)
                h, _ = m._backbone(m._frame_embed(frame), True, start=self.pos,
                                   caches=self.caches)
                self.pos += 1
                self.h = h[:, -1]
                self.frame_prefix = self.frame_prefix[:, :0]
            self.last = self._local_logits()

    def _feed_flat(self, bit):
        m = self.model
        phase = torch.full_like(bit, self.pos % self.Fb).long()
        x = (m.tok(bit.long()) + m.phase(phase)).unsqueeze(1)
        self.last = m.head(self._step_flat(x)[:, -1])


class FullForwardDecoder:
    """The decoder interface without a cache: every ``logits()`` is a full forward pass.

    It is what cached decoding is checked and measured against. Within the context it gives the
    cached decoder's logits (up to float rounding); past the context it keeps the last
    ``max_frames - 1`` whole frames.
    """

    def __init__(self, model: BitTransformerLM, prompt):
        self.model, self.Fb, self.history = model, model.frame_bits, _prompt_bits(model, prompt)

    @torch.no_grad()
    def logits(self):
        Fb, L = self.Fb, self.history.size(1)
        done = L - L % Fb  # bits of whole frames
        keep = (self.model.cfg.max_frames - 1) * Fb
        start = max(0, done - keep)
        # pad the unfinished frame to a whole one: outputs at index L only see bits < L
        pad = torch.zeros(self.history.size(0), Fb - L % Fb, dtype=torch.uint8,
                          device=self.history.device)
        window = torch.cat([self.history[:, start:], pad], dim=1)
        return self.model(window, causal=True)[:, L - start]

    def push(self, bit):
        self.history = torch.cat([self.history, bit.to(torch.uint8).view(-1, 1)], dim=1)
