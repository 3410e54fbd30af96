"""A finished (or interrupted) run, loaded for evaluation and sampling."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bitlm_core.app.build import build_model, check_memory, fit_to_checkpoint, placement
from bitlm_core.components import Components
from bitlm_core.errors import CheckpointError
from bitlm_core.spec import RunSpec
from bitlm_core.store.checkpoint import load_weights, read_state, usable_checkpoint
from bitlm_core.store.lock import checkpoint_lock
from bitlm_core.store.rundir import read_run_spec


@dataclass
class LoadedRun:
    run_dir: Path
    spec: RunSpec
    comps: Components
    model: Any
    step: int
    checkpoint: Path  # the step folder the weights came from
    state: dict[str, Any]  # its state.json


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def load_run(run_dir: Path | str, log: Callable[[str], None] = _stderr,
             device: str = "auto", prepare: bool = True) -> LoadedRun:
    """Rebuild a run's model from its resolved spec and newest usable checkpoint (never
    unpickles), on ``device`` (``auto``: cuda, else mps, else cpu; whatever the run trained
    on: checkpoints hold CPU tensors). A damaged newer checkpoint is skipped, and ``log`` says
    so. The checkpoint is read under the checkpoints' shared lock, so a run training in the
    folder meanwhile cannot delete it mid-read. A run trained with ``train.qat`` computes on its
    weight grid, as it did when its held-out figure was taken. Weights a quantizer stored are
    read back by it and run as stored, with its inference layers (``int8-dynamic``) when
    ``prepare``."""
    run_dir = Path(run_dir)
    spec = read_run_spec(run_dir)
    comps = Components.build(spec)
    check_memory(comps.spec, comps, training=False)  # a run folder's spec.yaml is input too
    where = placement(comps.spec, device, "--device")
    model = build_model(comps.spec, comps)
    with checkpoint_lock(run_dir, shared=True):
        ckpt = usable_checkpoint(run_dir, log)
        if ckpt is None:
            raise CheckpointError(f"{run_dir} has no checkpoint yet; run `bitlm run` to train "
                                  "it")
        state = read_state(ckpt)
        fit_to_checkpoint(model, state, ckpt)
        scheme = load_weights(ckpt, model)
    if comps.spec.train.qat is not None and scheme is None:
        # computes as it trained and was scored (a quantizer's weights run as it stored them)
        from bitlm_core.model.quant import qat_for_step

        qat_for_step(model, comps.spec.train.qat, state["step"])
    model.to(where).eval()
    if scheme is not None and prepare:  # e.g. int8-dynamic: faster layers for inference
        from bitlm_core.store.checkpoint import quantizer_call

        model = quantizer_call(scheme, ckpt, "prepare", model, where)
    return LoadedRun(run_dir, comps.spec, comps, model, state["step"], ckpt, state)
