"""The model's configuration and the token values shared by its layouts and objectives."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

MASK = 2  # token value of a masked bit (non-causal objectives)
BOS = 3  # token value of "before the start" (flat layout, causal)
LAYOUTS = ("flat", "framed")
LOCALS = ("joint", "tree", "node_mlp", "mlp")  # local bit predictors of the framed layout
CHECKPOINTING = ("none", "blocks", "every_k")  # what backward recomputes
PRECISIONS = ("fp32", "bf16", "fp16")  # the blocks' compute precision


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
    checkpointing: str = "none"  # one of CHECKPOINTING: recompute blocks in backward
    checkpoint_k: int = 2  # every_k: blocks per recomputed group
    reversible: bool = False  # reversible coupling of each block's two halves
    precision: str = "fp32"  # one of PRECISIONS: autocast of the blocks (weights stay fp32)
    act: bool = False  # adaptive computation time over the blocks (bitlm_core.model.act)
    act_threshold: float = 0.99  # a position halts once its halting probabilities reach this
    act_max_steps: int = 0  # blocks a position may use at most; 0: all of them

    @property
    def max_positions(self) -> int:
        return self.max_frames * (self.frame_bits if self.layout == "flat" else 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
