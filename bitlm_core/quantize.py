"""Weight quantization: a trained run's matrices stored as int8, about 4x smaller on disk.

Scheme ``int8-rowwise`` (symmetric, one scale per output row): for every floating-point matrix
with at least :data:`MIN_ELEMENTS` entries (linear layers, embedding tables), each row ``w`` is
stored as ``q = round(w / s)`` in ``[-127, 127]`` with ``s = max|w| / 127``, and ``s`` is stored
beside it as ``<name>.qscale`` (float32). Vectors (biases, norms) and small matrices stay as they
are. Loading multiplies back (``q * s``, error at most ``s / 2`` per weight) and runs the float
model: the gain is storage and download size, not speed.

The checkpoint's ``model.safetensors`` says ``bitlm_weights: int8-rowwise`` in its metadata, and
:func:`bitlm_core.checkpoint.load_weights` dequantizes such files, so ``bitlm eval`` and
``bitlm sample`` read a quantized run like any other. There is no optimizer state: a quantized
run is for inference, not for more training.
"""

from __future__ import annotations

from typing import Any

from bitlm_core.errors import CheckpointError

SCHEME = "int8-rowwise"
METADATA_KEY = "bitlm_weights"
SCALE_SUFFIX = ".qscale"
MIN_ELEMENTS = 1024  # smaller matrices are not worth a scale per row


def quantize_state(weights: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Float tensors by name -> (tensors to save, names of the matrices stored as int8)."""
    import torch

    out: dict[str, Any] = {}
    quantized = []
    for name, w in weights.items():
        if name.endswith(SCALE_SUFFIX):
            raise CheckpointError(f"tensor {name!r} already looks quantized; quantize the "
                                  "original run, not a quantized one")
        if w.is_floating_point() and w.dim() == 2 and w.numel() >= MIN_ELEMENTS:
            w32 = w.detach().float().cpu()
            scale = w32.abs().amax(dim=1) / 127.0
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            out[name] = torch.round(w32 / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            out[name + SCALE_SUFFIX] = scale.contiguous()
            quantized.append(name)
        else:
            out[name] = w.detach().contiguous().cpu()
    return out, quantized


def dequantize_state(tensors: dict[str, Any], source: str) -> dict[str, Any]:
    """Tensors of an ``int8-rowwise`` file -> float32 tensors under the model's names."""
    import torch

    out = {}
    scales = {n[: -len(SCALE_SUFFIX)]: t for n, t in tensors.items() if n.endswith(SCALE_SUFFIX)}
    for name, t in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in tensors:
                raise CheckpointError(f"{source}: scale {name!r} has no int8 matrix beside it")
            continue
        if t.dtype != torch.int8:
            out[name] = t
            continue
        scale = scales.get(name)
        if scale is None or scale.dim() != 1 or t.dim() != 2 or scale.numel() != t.shape[0]:
            raise CheckpointError(f"{source}: int8 tensor {name!r} has no matching row scales "
                                  f"({name + SCALE_SUFFIX}); the file is damaged")
        out[name] = t.float() * scale.float()[:, None]
    return out


def quantize_run(src: Any, dst: Any, force: bool = False) -> dict[str, Any]:
    """Write a quantized copy of run folder ``src`` (its newest checkpoint) into ``dst``.

    ``dst`` must not exist or be an empty folder; with ``force``, a quantized run folder there
    (written by this function) is replaced, nothing else. The new folder is built beside
    ``dst`` and renamed into place, so an interrupted call leaves no half-written run. Returns
    what was done: tensors quantized, bytes before and after.
    """
    import os
    import shutil
    from pathlib import Path

    from bitlm_core.checkpoint import save_checkpoint
    from bitlm_core.run import SPEC_FILE, load_run

    src, dst = Path(src), Path(dst)
    run = load_run(src)  # checks src and that its weights fit the model its spec builds
    ckpt, state = run.checkpoint, run.state  # the one checkpoint the weights came from
    if state.get("quantized"):
        raise CheckpointError(f"{src} is already quantized; quantize the original run")
    before = (ckpt / "model.safetensors").stat().st_size
    a, b = src.resolve(), dst.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise CheckpointError(f"--out {dst} must be a folder of its own, neither {src} nor "
                              "inside it nor around it")
    if dst.exists():
        if not dst.is_dir():
            raise CheckpointError(f"--out {dst} is a file; give a folder")
        if any(dst.iterdir()) and not (force and _is_quantized_run(dst)):
            raise CheckpointError(
                f"{dst} exists and is not empty; choose another folder"
                + (" (--force only replaces a folder written by bitlm quantize)" if force
                   else ", or pass --force to replace a quantized run there"))
    tensors, names = quantize_state(run.model.state_dict())
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        shutil.copyfile(src / SPEC_FILE, tmp / SPEC_FILE)
        meta = {k: v for k, v in state.items()
                if k not in ("format", "version", "step", "optimizer_param_groups")}
        meta.update(quantized=SCHEME, quantized_from=f"{src.name}/{ckpt.name}")
        out = save_checkpoint(tmp, state["step"], run.model, None, meta, keep=1,
                              weights=tensors, weights_metadata={METADATA_KEY: SCHEME})
        after = (out / "model.safetensors").stat().st_size
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"source": str(ckpt), "checkpoint": str(dst / "checkpoints" / out.name),
            "step": state["step"], "scheme": SCHEME, "quantized_tensors": len(names),
            "tensors": len(run.model.state_dict()),
            "bytes_before": before, "bytes_after": after}


def _is_quantized_run(folder: Any) -> bool:
    """A folder this module wrote: a spec and a newest checkpoint marked as quantized."""
    from bitlm_core.checkpoint import latest_checkpoint, read_state
    from bitlm_core.run import SPEC_FILE

    if not (folder / SPEC_FILE).is_file():
        return False
    ckpt = latest_checkpoint(folder)
    try:
        return ckpt is not None and bool(read_state(ckpt).get("quantized"))
    except CheckpointError:
        return False
