"""The run folder: what ``bitlm run`` writes, and the checks made before writing into one.

A run folder holds::

    spec.yaml          the fully resolved spec (every default filled in)
    data/              the corpus as packed, memory-mapped bits
    checkpoints/       see bitlm_core.store.checkpoint
    metrics.jsonl      one JSON record per logged step, evaluation, telemetry, alert, growth
    attention/         attention maps (attention.full_attn_logging)
    samples.txt        generated text
    summary.json       final figures

Running the same spec into an existing folder resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from bitlm_core.errors import CheckpointError
from bitlm_core.spec import RunSpec, validate_spec

SPEC_FILE = "spec.yaml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.txt"
SUMMARY_FILE = "summary.json"
DATA_DIR = "data"
ATTENTION_DIR = "attention"


class MetricsLog:
    """A run's ``metrics.jsonl``: one JSON record per line, appended."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_FILE

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def prepare_run_dir(spec: RunSpec, run_dir: Path, restart: bool) -> bool:
    """Create or check the run folder; True when it holds a checkpoint to resume from.

    ``spec`` must be completed (:func:`bitlm_core.components.complete_spec`): the folder keeps
    what the run really used. The spec already there is read as this version reads specs, so
    keys added since it was written take their defaults and do not count as a difference.
    """
    from bitlm_core.store.checkpoint import latest_checkpoint

    if spec.incomplete():
        raise ValueError(f"prepare_run_dir needs a completed spec ({', '.join(spec.incomplete())}"
                         " left to installed components): pass it through "
                         "bitlm_core.components.complete_spec first")
    saved = run_dir / SPEC_FILE
    if restart and saved.is_file():
        shutil.rmtree(run_dir)  # only ever a run folder: never a folder bitlm did not write
    if saved.is_file():
        previous = read_run_spec(run_dir).to_dict()
        diff = [k for k in _diff_keys(previous, spec.to_dict()) if not k.startswith("output.")]
        if diff:
            raise CheckpointError(
                f"run folder {run_dir} holds a run of a different spec (differs at: "
                f"{', '.join(diff[:6])}). Choose another folder with --out, or pass --restart "
                "to discard that run"
            )
        return latest_checkpoint(run_dir) is not None
    if run_dir.exists() and any(run_dir.iterdir()):
        raise CheckpointError(f"{run_dir} exists and is not a bitlm run folder (no {SPEC_FILE});"
                              " choose another folder with --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SPEC_FILE).write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False),
                                     encoding="utf-8")
    return False


def read_run_spec(run_dir: Path) -> RunSpec:
    """The resolved spec a run folder was trained with, or a CheckpointError saying what the
    folder is not."""
    spec_path = Path(run_dir) / SPEC_FILE
    if not spec_path.is_file():
        raise CheckpointError(f"{run_dir} is not a bitlm run folder (no {SPEC_FILE}); give the "
                              "folder that `bitlm run` wrote (default runs/<name>)")
    try:
        raw = yaml.safe_load(spec_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{spec_path} is not valid YAML ({exc}); the run folder is "
                              "damaged") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{spec_path} is not a spec; the run folder is damaged")
    return validate_spec(raw, str(spec_path))
