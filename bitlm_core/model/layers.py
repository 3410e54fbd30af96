"""The transformer's parts: feed-forward, self-attention, the pre-norm block, initialisation."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitlm_core.model.config import ModelConfig

INIT_STD = 0.02  # GPT-2's initialisation of every weight matrix and embedding


def init_weights(module: nn.Module) -> None:
    """Normal(0, 0.02) weights and zero biases, as GPT-2 (apply with ``model.apply``)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)


def scale_residual_projections(model: nn.Module, n_layers: int) -> None:
    """GPT-2: residual output projections start at std 0.02 / sqrt(2 * n_layers)."""
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            nn.init.normal_(p, mean=0.0, std=INIT_STD / math.sqrt(2 * n_layers))


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device):
    """Autocast to ``precision`` (``bf16``, ``fp16``) on ``device``; ``fp32`` changes nothing."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def run_group(blocks, x, causal: bool, caches=None, need_weights: bool = False):
    """``blocks`` one after the other on ``x``: (output, their attention maps)."""
    maps = []
    for i, block in enumerate(blocks):
        x, w = block(x, causal, None if caches is None else caches[i], need_weights)
        maps.append(w)
    return x, maps


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Evaluation mode inside the block; the model's own mode is restored afterwards, even on
    an error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


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
