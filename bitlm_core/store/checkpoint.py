"""Checkpoints: safetensors tensors plus JSON metadata, written atomically, never unpickled.

Layout inside a run folder::

    checkpoints/step-000200/model.safetensors      model weights (float, or int8 with row
                                                   scales after `bitlm quantize`)
    checkpoints/step-000200/optimizer.safetensors  AdamW moments (tensors only)
    checkpoints/step-000200/state.json             step, model config, resolved spec, metrics,
                                                   optimizer hyper-parameters
    checkpoints/latest                             name of the newest complete step folder

A step folder is written under a temporary name and renamed into place when complete; then
``latest`` is replaced atomically. A crash at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from bitlm_core.errors import CheckpointError
from bitlm_core.store.atomic import atomic_write_text, fsync_dir

FORMAT = "bitlm-checkpoint"
VERSION = 1


def optimizer_tensors(optimizer) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able groups."""
    import torch

    sd = optimizer.state_dict()
    tensors: dict[str, Any] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{idx}.{key}"] = t.detach().contiguous().cpu()
    return tensors, sd["param_groups"]


def restore_optimizer(optimizer, tensors: dict[str, Any], groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"optimizer state does not match the model: {exc}") from None


def save_checkpoint(run_dir: Path, step: int, model, optimizer, meta: dict[str, Any],
                    keep: int = 2, weights: dict[str, Any] | None = None,
                    weights_metadata: dict[str, str] | None = None) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically and point ``latest`` at it.

    ``weights`` replaces the model's own state dict (a quantized run saves int8 tensors);
    ``weights_metadata`` goes into the safetensors header (strings only).
    """
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if weights is None:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata=weights_metadata)
    groups: list[dict[str, Any]] = []
    if optimizer is not None:
        tensors, groups = optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {"format": FORMAT, "version": VERSION, "step": step,
             "optimizer_param_groups": groups, **meta}
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_text(root / "latest", name + "\n")
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    complete = sorted(p for p in root.glob("step-*")
                      if (p / "state.json").is_file() and (p / "model.safetensors").is_file())
    return complete[-1] if complete else None


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {ckpt / 'state.json'}: {exc}") from None
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise CheckpointError(f"{ckpt} is not a bitlm checkpoint of version {VERSION}")
    return state


def load_weights(ckpt: Path, model) -> None:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from bitlm_core.store.quantized import METADATA_KEY, SCHEME, dequantize_state

    path = str(ckpt / "model.safetensors")
    try:
        with safe_open(path, framework="pt") as f:
            scheme = (f.metadata() or {}).get(METADATA_KEY)
        weights = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read weights from {ckpt}: {exc}") from None
    if scheme == SCHEME:
        weights = dequantize_state(weights, str(ckpt))
    elif scheme is not None:
        raise CheckpointError(f"{ckpt} holds weights in the format {scheme!r}, which this "
                              f"bitlm cannot read (it reads float and {SCHEME!r}); upgrade "
                              "bitlm-core")
    elif any(str(t.dtype) == "torch.int8" for t in weights.values()):
        raise CheckpointError(f"{ckpt} holds int8 weight tensors but does not say how they "
                              "were quantized; the file is damaged or not written by bitlm")
    missing, unexpected = set(model.state_dict()) - set(weights), set(weights) - set(
        model.state_dict())
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {ckpt} does not fit the model built from its spec (missing: "
            f"{sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]}). If an older bitlm "
            f"wrote it (framed models gained a frame-value input table and the 'joint' local "
            f"predictor), train it again: bitlm run SPEC --restart")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {ckpt} has tensors of the wrong shape: "
                              f"{str(exc).splitlines()[-1]}") from None


def load_optimizer(ckpt: Path, optimizer, state: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    path = ckpt / "optimizer.safetensors"
    if state.get("quantized"):
        raise CheckpointError(f"{ckpt} holds weights quantized by `bitlm quantize` and no "
                              "optimizer state: it is for eval and sample. Train on from the "
                              "original run folder")
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no optimizer state; cannot resume training from it")
    restore_optimizer(optimizer, load_file(str(path)), state["optimizer_param_groups"])
