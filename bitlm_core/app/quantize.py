"""``bitlm quantize``: a copy of a run whose weights are stored in fewer bits.

The formats are quantizers (the ``bitlm_quantizers`` hook: core's ``int8-rowwise``, a plugin's
``int8-dynamic`` and ``int4``); this module writes a whole run folder in one,
safely (built beside the target, renamed into place, never over anything but a quantized run).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from bitlm_core.app.loading import load_run
from bitlm_core.errors import CheckpointError
from bitlm_core.store.checkpoint import latest_checkpoint, read_state, save_checkpoint
from bitlm_core.store.quantized import METADATA_KEY, SCHEME
from bitlm_core.store.rundir import SPEC_FILE, foreign_files, write_marker


def quantize_run(src: Any, dst: Any, force: bool = False,
                 scheme: str = SCHEME) -> dict[str, Any]:
    """Write a copy of run folder ``src`` (its newest checkpoint) quantized by the quantizer
    ``scheme`` (``int8-rowwise``, or a plugin's) into ``dst``.

    ``dst`` must not exist or be an empty folder; with ``force``, a quantized run folder there
    (written by this function) is replaced, nothing else. The new folder is built beside
    ``dst`` and renamed into place, so an interrupted call leaves no half-written run. Returns
    what was done: tensors quantized, bytes before and after.
    """
    from bitlm_core.registry import get_registry
    from bitlm_core.store.checkpoint import quantizer_call

    src, dst = Path(src), Path(dst)
    get_registry().resolve("quantizer", scheme, "--scheme")  # an unknown name: its matches
    # on the CPU; checks src and that its weights fit the model its spec builds
    run = load_run(src, device="cpu", prepare=False)
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
        foreign = foreign_files(dst) if any(dst.iterdir()) else []
        if foreign:
            raise CheckpointError(f"{dst} holds files bitlm did not write ("
                                  f"{', '.join(foreign[:5])}); --force replaces only what bitlm "
                                  "wrote: move them away, or choose another folder")
    tensors, names = quantizer_call(scheme, src, "quantize", run.model)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write_marker(tmp)
        shutil.copyfile(src / SPEC_FILE, tmp / SPEC_FILE)
        meta = {k: v for k, v in state.items()
                if k not in ("format", "version", "step", "optimizer_param_groups")}
        meta.update(quantized=scheme, quantized_from=f"{src.name}/{ckpt.name}")
        out = save_checkpoint(tmp, state["step"], run.model, None, meta, keep=1,
                              weights=tensors, weights_metadata={METADATA_KEY: scheme})
        after = (out / "model.safetensors").stat().st_size
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)  # bitlm's files only: checked above
        else:
            os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"source": str(ckpt), "checkpoint": str(dst / "checkpoints" / out.name),
            "step": state["step"], "scheme": scheme, "quantized_tensors": len(names),
            "tensors": len(run.model.state_dict()),
            "bytes_before": before, "bytes_after": after}


def _is_quantized_run(folder: Any) -> bool:
    """A folder this module wrote: a spec and a newest checkpoint marked as quantized."""
    if not (folder / SPEC_FILE).is_file():
        return False
    ckpt = latest_checkpoint(folder)
    try:
        return ckpt is not None and bool(read_state(ckpt).get("quantized"))
    except CheckpointError:
        return False
