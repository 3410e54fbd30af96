"""From a run spec and its components to a model: the config, the model, grown to a checkpoint."""

from __future__ import annotations

from typing import Any

from bitlm_core.components import Components
from bitlm_core.model import BitTransformerLM, ModelConfig
from bitlm_core.spec import RunSpec

NON_CAUSAL_NEIGHBOURS = 3  # positions on either side a non-causal model's input reads


def model_config(spec: RunSpec, encoder, causal: bool = True) -> ModelConfig:
    m = spec.model
    return ModelConfig(layout=m.layout, frame_bits=encoder.frame_bits,
                       frame_parity=bool(getattr(encoder, "has_parity", False)),
                       neighbours=0 if causal else NON_CAUSAL_NEIGHBOURS,
                       max_frames=spec.data.seq_len,
                       d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
                       d_ff=m.d_ff or 4 * m.d_model, dropout=m.dropout,
                       local=m.local, local_layers=m.local_layers, local_dim=m.local_dim or m.d_model)


def build_model(spec: RunSpec, comps: Components) -> BitTransformerLM:
    """The model the spec describes, initialised from ``train.seed``."""
    import torch

    torch.manual_seed(spec.train.seed)
    return BitTransformerLM(model_config(spec, comps.encoder, comps.causal), comps.attention)


def fit_to_checkpoint(model, saved: dict[str, Any]) -> None:
    """Grow a model built from the spec to the size a checkpoint was saved at (a run whose
    ``scaling.strategy`` grew its context, depth or width). Nothing saved is evaluated."""
    from bitlm_core.model.growth import fit_to_config

    fit_to_config(model, saved.get("model_config"))
