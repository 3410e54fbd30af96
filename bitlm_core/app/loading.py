"""A finished (or interrupted) run, loaded for evaluation and sampling."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitlm_core.app.build import build_model, fit_to_checkpoint
from bitlm_core.components import Components
from bitlm_core.errors import CheckpointError
from bitlm_core.spec import RunSpec
from bitlm_core.store.checkpoint import latest_checkpoint, load_weights, read_state
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


def load_run(run_dir: Path | str) -> LoadedRun:
    """Rebuild a run's model from its resolved spec and newest checkpoint (never unpickles)."""
    run_dir = Path(run_dir)
    spec = read_run_spec(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir} has no checkpoint yet; run `bitlm run` to train it")
    state = read_state(ckpt)
    comps = Components.build(spec)
    model = build_model(comps.spec, comps)
    fit_to_checkpoint(model, state)
    load_weights(ckpt, model)
    model.eval()
    return LoadedRun(run_dir, comps.spec, comps, model, state["step"], ckpt, state)
