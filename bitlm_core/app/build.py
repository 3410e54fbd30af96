"""From a run spec and its components to a model: the config, the model, grown to a checkpoint."""

from __future__ import annotations

import re
from typing import Any

from bitlm_core.components import Components
from bitlm_core.errors import CheckpointError, SpecError
from bitlm_core.model import BitTransformerLM, ModelConfig
from bitlm_core.spec import RunSpec
from bitlm_core.store.checkpoint import weight_shapes

BLOCK = re.compile(r"blocks\.(\d+)\.")
NON_CAUSAL_NEIGHBOURS = 3  # positions on either side a non-causal model's input reads


def model_config(spec: RunSpec, encoder, causal: bool = True) -> ModelConfig:
    m = spec.model
    return ModelConfig(layout=m.layout, frame_bits=encoder.frame_bits,
                       frame_parity=bool(getattr(encoder, "has_parity", False)),
                       neighbours=0 if causal else NON_CAUSAL_NEIGHBOURS,
                       max_frames=spec.data.seq_len,
                       d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
                       d_ff=m.d_ff or 4 * m.d_model, dropout=m.dropout,
                       local=m.local, local_layers=m.local_layers,
                       local_dim=m.local_dim or m.d_model,
                       checkpointing=m.checkpointing, checkpoint_k=m.checkpoint_k,
                       reversible=m.reversible, precision=spec.train.precision,
                       act=m.act.enabled, act_threshold=m.act.threshold,
                       act_max_steps=m.act.max_steps or 0)


def build_model(spec: RunSpec, comps: Components) -> BitTransformerLM:
    """The model the spec describes, initialised from ``train.seed``."""
    import torch

    torch.manual_seed(spec.train.seed)
    return BitTransformerLM(model_config(spec, comps.encoder, comps.causal), comps.attention)


def placement(spec: RunSpec, device: str | None = None, key: str = "train.device"):
    """The torch device a run computes on: ``device`` when given (an option such as
    ``--device``, named by ``key``), else the spec's ``train.device``; its precision is checked
    against it. A SpecError names what this machine lacks and how to get it."""
    from bitlm_core.engine.device import check_precision, resolve_device

    where = resolve_device(device or spec.train.device, key)
    check_precision(spec.train.precision, where)
    return where


def fit_to_checkpoint(model, saved: dict[str, Any], ckpt) -> None:
    """Grow a model built from the spec to the size a checkpoint was saved at (a run whose
    ``scaling.strategy`` grew its context, depth or width). Nothing saved is evaluated, and
    the sizes in state.json are checked against the weights' own shapes first, so a damaged
    or hostile state.json cannot make bitlm build a model of any size."""
    from bitlm_core.model.growth import fit_to_config

    config = saved.get("model_config") or {}
    for key, held in sizes_held(model, weight_shapes(ckpt)).items():
        claimed = config.get(key)
        if claimed is not None and claimed != held:
            raise CheckpointError(f"{ckpt / 'state.json'} says model_config.{key} is "
                                  f"{str(claimed)[:40]}, its weights hold {held}; the "
                                  "checkpoint is damaged")
    fit_to_config(model, config)


def sizes_held(model, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """The context, depth and feed-forward width a checkpoint's tensors hold."""
    held: dict[str, int] = {}
    if "pos.weight" in shapes:
        per_frame = model.frame_bits if model.cfg.layout == "flat" else 1
        held["max_frames"] = shapes["pos.weight"][0] // per_frame
    blocks = {int(m.group(1)) for name in shapes if (m := BLOCK.match(name))}
    if blocks:
        held["n_layers"] = max(blocks) + 1
    if "blocks.0.mlp.fc.weight" in shapes:
        held["d_ff"] = shapes["blocks.0.mlp.fc.weight"][0]
    return held


def physical_memory() -> int | None:
    """Bytes of RAM on this machine, or None where the OS does not say."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def training_memory(spec: RunSpec, comps: Components) -> dict[str, int]:
    """An estimate, in bytes, of what one training step of ``spec`` holds in memory.

    ``parameters``: weights, gradients and AdamW's two moments, 16 bytes per parameter (counted
    on the ``meta`` device: nothing is allocated). ``activations``: what backward keeps of one
    micro-batch in float32, per position and layer about ``12 * d_model + 3 * d_ff`` values,
    plus ``3 * heads * T`` more for a backend that materialises attention maps
    (``supports_weights``, as ``reference``; SDPA does not), plus ``8 * 2**frame_bits`` for the
    framed layout's local head; with ``model.checkpointing`` or ``model.reversible``, one
    stored tensor per recomputed group (two streams for reversible) and one group's
    activations. Measured against peak memory (the quickstart, framed and flat, one thread;
    BENCHMARKS.md, Memory): the estimate is 1.1-1.2x of what training added to the process.
    """
    import torch

    cfg = model_config(spec, comps.encoder, comps.causal)
    with torch.device("meta"):
        n_params = BitTransformerLM(cfg, comps.attention).num_parameters()
    B, T, C, L = spec.train.batch_size, cfg.max_positions, cfg.d_model, cfg.n_layers
    block = 12 * C + 3 * cfg.d_ff  # what backward keeps of one block, per position
    if getattr(comps.attention, "supports_weights", True):
        block += 3 * cfg.n_heads * T
    if cfg.act:  # every block's state, mixture and halting values are kept
        if cfg.checkpointing != "none":  # and each block's input (two streams, reversible)
            per_position = L * (3 * C + (2 * C if cfg.reversible else C)) + block
        else:
            per_position = L * (3 * C + block)
    elif cfg.reversible:  # two residual streams, and one block recomputed at a time
        per_position = 2 * C + block
    elif cfg.checkpointing != "none":  # each group's input, and one group recomputed
        k = 1 if cfg.checkpointing == "blocks" else min(cfg.checkpoint_k, L)
        per_position = -(-L // k) * C + k * block
    else:
        per_position = L * block
    if cfg.layout == "framed":
        per_position += 8 * 2 ** cfg.frame_bits
    return {"parameters": 16 * n_params, "activations": 4 * B * T * per_position}


def check_memory(spec: RunSpec, comps: Components, training: bool = True,
                 processes: int = 1, shards: int = 1, micro: int | None = None,
                 stages: int = 1) -> None:
    """A SpecError when ``spec``'s model cannot fit this machine's memory, naming the figure
    and what to lower (before anything is built or written). ``training``: a whole training
    step (:func:`training_memory`); else the weights alone, 4 bytes per parameter.

    A job: ``processes`` of it on this machine, its parameters and optimizer state split into
    ``shards`` (FSDP), ``micro`` windows in each process's micro-batch; a pipeline of
    ``stages`` keeps a whole copy of the weights in each process, and splits the gradients,
    optimizer state and activations over its stages."""
    available = physical_memory()
    if available is None:
        return
    need = training_memory(spec, comps)
    if micro is not None:
        need["activations"] = need["activations"] * micro // spec.train.batch_size
    if stages > 1:  # parameters: 4 bytes of weights, 12 of gradients and AdamW's moments
        need["activations"] //= stages
        need["parameters"] = need["parameters"] // 4 + need["parameters"] * 3 // 4 // stages
    need = {k: v * processes // (shards if k == "parameters" else 1) for k, v in need.items()}
    if not training:
        if need["parameters"] // 4 > available:
            raise SpecError(f"this spec's model has {need['parameters'] // 16:,} parameters, "
                            f"{need['parameters'] / 4 / 2**30:,.1f} GiB of weights, and this "
                            f"machine has {available / 2**30:,.1f} GiB")
        return
    total = sum(need.values())
    if total <= available:
        return
    shown = {k: f"{v / 2**30:,.1f} GiB" for k, v in need.items()}
    g = spec.distributed.global_batch
    each = (f"train.batch_size={spec.train.batch_size}" if g is None or micro is None else
            f"{micro} windows (distributed.global_batch={g} shared)")
    job = f" in its {processes} processes on this machine" if processes > 1 else ""
    raise SpecError(f"one training step of this spec needs about {total / 2**30:,.1f} GiB of "
                    f"memory{job} ({shown['parameters']} for parameters and optimizer state, "
                    f"{shown['activations']} for activations of {each} x "
                    f"data.seq_len={spec.data.seq_len}), and this "
                    f"machine has {available / 2**30:,.1f} GiB. Lower train.batch_size (and "
                    "raise train.grad_accum to keep the batch), data.seq_len or the model's "
                    "size; attention: {name: sdpa} needs no attention maps")
