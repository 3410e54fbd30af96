"""The run folder: what ``bitlm run`` writes, and the checks made before writing into one.

A run folder holds::

    .bitlm-run         marks the folder as bitlm's (format and version)
    .bitlm-lock        the run lock (bitlm_core.store.lock)
    spec.yaml          the fully resolved spec (every default filled in)
    data/              the corpus as packed, memory-mapped bits
    checkpoints/       see bitlm_core.store.checkpoint
    metrics.jsonl      one JSON record per logged step, evaluation, telemetry, alert, growth
    attention/         attention maps (attention.full_attn_logging)
    samples.txt        generated text
    summary.json       final figures
    report.html        curves, telemetry and samples for a person (a reporter plugin)
    plots/             the same curves as PNG images

Running the same spec into an existing folder resumes from its newest checkpoint. bitlm writes
into a folder only when it is new, empty, or already bitlm's (the marker, or, for folders of
bitlm-core 0.1, checkpoints of bitlm's format), and ``--restart`` deletes only the files above,
by name: whatever else is in the folder stays.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from bitlm_core.errors import CheckpointError
from bitlm_core.spec import RunSpec, parse_yaml, validate_spec

MARKER = ".bitlm-run"
SPEC_FILE = "spec.yaml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.txt"
SUMMARY_FILE = "summary.json"
DATA_DIR = "data"
DATA_FILES = ("train.bits", "train.json", "val.bits", "val.json")
ATTENTION_DIR = "attention"
REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
PLOT_FILES = ("bits_per_byte.png", "bits_per_byte_time.png", "lr.png", "telemetry.png",
              "compression.png")  # what a reporter may write into plots/, by name
MAX_SPEC_BYTES = 1 << 20  # a spec.yaml larger than this was not written by bitlm


class MetricsLog:
    """A run's ``metrics.jsonl``: one JSON record per line, appended."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_FILE

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate(self, step: int) -> int:
        """Keep only the records of steps up to ``step`` (a resumed run trains the later ones
        again) and drop lines that are not whole records (a run killed mid-write); return how
        many went. Rewritten atomically."""
        from bitlm_core.store.atomic import atomic_write_text

        if not self.path.is_file():
            return 0
        kept, dropped = [], 0
        with open(self.path, "rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    keep = isinstance(record, dict) and record.get("step", 0) <= step
                except ValueError:
                    keep = False
                if keep:
                    kept.append(line.decode("utf-8").rstrip("\n") + "\n")
                else:
                    dropped += 1
        if dropped:
            atomic_write_text(self.path, "".join(kept))
        return dropped


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def is_run_folder(run_dir: Path) -> bool:
    """Whether bitlm wrote this folder: its marker, or (bitlm-core 0.1, before the marker) a
    spec.yaml beside checkpoints whose state.json is bitlm's."""
    from bitlm_core.store.checkpoint import read_state, step_folders

    run_dir = Path(run_dir)
    if (run_dir / MARKER).is_file():
        return True
    if not (run_dir / SPEC_FILE).is_file():
        return False
    for folder in step_folders(run_dir):
        try:
            read_state(folder)
            return True
        except CheckpointError:
            continue
    return False


def write_marker(run_dir: Path) -> None:
    from bitlm_core import __version__
    from bitlm_core.store.atomic import atomic_write_text

    atomic_write_text(Path(run_dir) / MARKER, json.dumps(
        {"format": "bitlm-run", "version": 1, "written_by": f"bitlm-core {__version__}"}))


def remove_run(run_dir: Path) -> None:
    """Delete what bitlm wrote in a run folder (``--restart``), by name; everything else stays.
    Hold the run lock."""
    from bitlm_core.store.checkpoint import (CHECKPOINTS_DIR, LATEST, remove_step_folder,
                                             remove_temporary_folders, step_folders)
    from bitlm_core.store.lock import CHECKPOINT_LOCK, checkpoint_lock

    run_dir = Path(run_dir)
    with checkpoint_lock(run_dir, shared=False):
        for folder in step_folders(run_dir):
            remove_step_folder(folder)
        remove_temporary_folders(run_dir)
        (run_dir / CHECKPOINTS_DIR / LATEST).unlink(missing_ok=True)
    (run_dir / CHECKPOINTS_DIR / CHECKPOINT_LOCK).unlink(missing_ok=True)
    for name in DATA_FILES:
        (run_dir / DATA_DIR / name).unlink(missing_ok=True)
    for path in (run_dir / ATTENTION_DIR).glob("step-*.safetensors"):
        path.unlink()
    for name in PLOT_FILES:
        (run_dir / PLOTS_DIR / name).unlink(missing_ok=True)
    for name in (SPEC_FILE, METRICS_FILE, SAMPLES_FILE, SUMMARY_FILE, REPORT_FILE, MARKER):
        (run_dir / name).unlink(missing_ok=True)
    for folder in (CHECKPOINTS_DIR, DATA_DIR, ATTENTION_DIR, PLOTS_DIR):
        try:
            (run_dir / folder).rmdir()
        except OSError:  # missing, or holding files bitlm did not write
            pass


def foreign_files(run_dir: Path) -> list[str]:
    """What is in a run folder that bitlm does not write (paths relative to it)."""
    from bitlm_core.store.checkpoint import (CHECKPOINTS_DIR, CHECKSUMS, FILES, LATEST,
                                             TEMPORARY, step_of)
    from bitlm_core.store.lock import CHECKPOINT_LOCK, RUN_LOCK

    run_dir = Path(run_dir)
    own = {MARKER, RUN_LOCK, SPEC_FILE, METRICS_FILE, SAMPLES_FILE, SUMMARY_FILE, REPORT_FILE,
           DATA_DIR, ATTENTION_DIR, CHECKPOINTS_DIR, PLOTS_DIR}
    found = [p.name for p in run_dir.iterdir() if p.name not in own]
    inside = {DATA_DIR: lambda p: p.name in DATA_FILES,
              ATTENTION_DIR: lambda p: p.match("step-*.safetensors"),
              PLOTS_DIR: lambda p: p.name in PLOT_FILES,
              CHECKPOINTS_DIR: lambda p: p.name in (LATEST, CHECKPOINT_LOCK) or p.is_dir() and (
                  step_of(p) is not None or TEMPORARY.fullmatch(p.name))}
    for folder, is_own in inside.items():
        if (run_dir / folder).is_dir():
            found += [f"{folder}/{p.name}" for p in (run_dir / folder).iterdir()
                      if not is_own(p)]
    for step in (run_dir / CHECKPOINTS_DIR).glob("*"):
        if step.is_dir() and (step_of(step) is not None or TEMPORARY.fullmatch(step.name)):
            found += [f"{CHECKPOINTS_DIR}/{step.name}/{p.name}" for p in step.iterdir()
                      if p.name not in (*FILES, CHECKSUMS)]
    return sorted(found)


def check_writable(run_dir: Path) -> None:
    """A CheckpointError unless bitlm may write into ``run_dir``: new, empty, or bitlm's."""
    from bitlm_core.store.lock import RUN_LOCK

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is a file, not a folder; choose another --out")
    empty = run_dir.is_dir() and all(p.name == RUN_LOCK for p in run_dir.iterdir())
    if run_dir.is_dir() and not empty and not is_run_folder(run_dir):
        raise CheckpointError(f"{run_dir} exists and is not a bitlm run folder (no {MARKER} "
                              "or bitlm checkpoints); choose another folder with --out")


#: spec keys a run may be resumed with changed: where it is written and how its processes
#: talk, not what it trains
RESUMABLE_CHANGES = ("distributed.backend", "distributed.timeout_minutes",
                     "distributed.stages", "distributed.microbatches")


def prepare_run_dir(spec: RunSpec, run_dir: Path, restart: bool) -> bool:
    """Create or check the run folder; True when it holds a checkpoint to resume from.

    Call it holding the run lock (:func:`bitlm_core.store.lock.run_lock`); leftovers of an
    interrupted checkpoint save are deleted. ``spec`` must be completed
    (:func:`bitlm_core.components.complete_spec`): the folder keeps what the run really used.
    The spec already there is read as this version reads specs, so keys added since it was
    written take their defaults and do not count as a difference.
    """
    from bitlm_core.store.checkpoint import latest_checkpoint, remove_temporary_folders

    if spec.incomplete():
        raise ValueError(f"prepare_run_dir needs a completed spec ({', '.join(spec.incomplete())}"
                         " left to installed components): pass it through "
                         "bitlm_core.components.complete_spec first")
    check_writable(run_dir)
    if restart and is_run_folder(run_dir):
        remove_run(run_dir)
    saved = run_dir / SPEC_FILE
    if saved.is_file() and is_run_folder(run_dir):
        previous = read_run_spec(run_dir).to_dict()
        diff = [k for k in _diff_keys(previous, spec.to_dict())
                if not k.startswith("output.") and k not in RESUMABLE_CHANGES]
        if diff:
            raise CheckpointError(
                f"run folder {run_dir} holds a run of a different spec (differs at: "
                f"{', '.join(diff[:6])}). Choose another folder with --out, or pass --restart "
                "to discard that run"
            )
        if not (run_dir / MARKER).is_file():
            write_marker(run_dir)  # a folder of bitlm-core 0.1
        remove_temporary_folders(run_dir)
        return latest_checkpoint(run_dir) is not None
    from bitlm_core.store.atomic import atomic_write_text

    run_dir.mkdir(parents=True, exist_ok=True)
    write_marker(run_dir)
    atomic_write_text(run_dir / SPEC_FILE, yaml.safe_dump(spec.to_dict(), sort_keys=False))
    return False


def read_run_spec(run_dir: Path) -> RunSpec:
    """The resolved spec a run folder was trained with, or a CheckpointError saying what the
    folder is not."""
    spec_path = Path(run_dir) / SPEC_FILE
    if not spec_path.is_file():
        raise CheckpointError(f"{run_dir} is not a bitlm run folder (no {SPEC_FILE}); give the "
                              "folder that `bitlm run` wrote (default runs/<name>)")
    try:
        with open(spec_path, "rb") as f:
            text = f.read(MAX_SPEC_BYTES + 1)
        if len(text) > MAX_SPEC_BYTES:
            raise CheckpointError(f"{spec_path} is larger than {MAX_SPEC_BYTES >> 10} KB; it is "
                                  "not a spec bitlm wrote")
        raw = parse_yaml(text.decode("utf-8"), str(spec_path))
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8
        raise CheckpointError(f"cannot read {spec_path} ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); the run folder is damaged") from None
    return validate_spec(raw, str(spec_path))
