"""Reading run folders for people and their tools: the report, the dashboard and the MCP server.

Everything here reads what ``bitlm run`` wrote (``metrics.jsonl``, ``spec.yaml``,
``summary.json``, the run lock) and never writes. Every read is bounded: a metrics file is read
at most :data:`MAX_METRICS_BYTES` at a time, a line longer than :data:`MAX_LINE_BYTES` or not a
JSON object is skipped, and a summary or spec larger than bitlm writes is ignored. None of it
imports torch, so listing hundreds of runs is quick.

* :func:`read_metrics` returns the records from a byte offset on, and the offset to go on from:
  a live view polls with it and never reads a line twice.
* :func:`curves` turns records into named series of ``(step, value)`` columns, plus the time of
  each training step, the growth events and the alerts.
* :func:`run_info` is one row of a runs table: status, the spec's main settings, final figures.
* :func:`list_runs` finds the run folders directly inside a folder.
* :func:`resolve_run` turns a run name from a client into a folder inside the runs folder, or a
  :class:`~bitlm_core.errors.DataError`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Iterable, Optional

from bitlm_core.errors import DataError
from bitlm_core.store.lock import RUN_LOCK
from bitlm_core.store.rundir import MARKER, METRICS_FILE, SPEC_FILE, SUMMARY_FILE

class NoSuchRun(DataError):
    """A run name that is well formed but names no run of the folder (a server's 404)."""


MAX_METRICS_BYTES = 64 << 20  # read per call; a live view asks again from the offset returned
MAX_LINE_BYTES = 1 << 16  # bitlm's records are a few hundred bytes
MAX_SUMMARY_BYTES = 1 << 20
MAX_RUNS = 10_000  # run folders listed from one folder
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

#: the spec settings shown beside a run (dotted path -> column name)
SETTINGS = {
    "model.layout": "layout", "model.d_model": "d_model", "model.n_layers": "layers",
    "model.n_heads": "heads", "data.seq_len": "seq_len", "train.steps": "steps",
    "train.batch_size": "batch", "train.lr": "lr", "objective.name": "objective",
    "compression.name": "compression", "compression.prob": "compression_prob",
    "safety.gate.name": "gate", "scaling.strategy.name": "scaling",
}


def open_regular(path: Path):
    """``path`` opened for reading if it is a regular file; an OSError for a symbolic link, a
    FIFO, a device or a folder (a run folder from elsewhere must not make a server read
    ``~/.ssh`` through a link, or hang on a pipe)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_metrics(run_dir: Path, offset: int = 0,
                 max_bytes: int = MAX_METRICS_BYTES) -> tuple[list[dict[str, Any]], int]:
    """The whole records of ``metrics.jsonl`` from byte ``offset`` on (at most ``max_bytes``
    read), and the offset after the last whole line read. A line still being written is left
    for the next call; a missing file gives no records. An ``offset`` past the file's end
    means it was rewritten (a resumed run drops its later records): reading starts again at 0,
    so the offset returned is then smaller than the one given."""
    path = Path(run_dir) / METRICS_FILE
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if offset > size:  # the file was rewritten (a resumed run drops later records)
                offset = 0
            f.seek(offset)
            chunk = f.read(max_bytes)
    except FileNotFoundError:
        return [], 0
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    end = chunk.rfind(b"\n") + 1
    records = []
    for line in chunk[:end].splitlines():
        if len(line) > MAX_LINE_BYTES:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step", 0), int):
            records.append(record)
    if end == 0 and len(chunk) == max_bytes:  # one line longer than max_bytes: skip it
        end = len(chunk)
    return records, offset + end


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def json_safe(value: Any) -> Any:
    """``value`` with every float JSON cannot hold (NaN, infinities) as None, and keys as text:
    what servers and reports send is strict JSON."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def curves(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Series for plots: ``{"series": {name: {"step": [...], "value": [...]}}, "time": {...},
    "events": [...]}``.

    Series names: ``train/bits_per_byte``, ``train/lr``, ``train/grad_norm``, ``train/loss``,
    ``train/raw/bits_per_byte`` and ``train/compressed_batches`` (with compression on),
    ``train/direct_loss``, ``val/bits_per_byte`` (every held-out evaluation; the final one is
    ``final/bits_per_byte``), and every telemetry value as ``telemetry/<split>/<metric>``.
    ``time`` maps training steps to seconds. ``events`` are growths (``split: scaling``) and
    alerts, each with its step and a short text."""
    series: dict[str, dict[str, list]] = {}
    time: dict[str, list] = {"step": [], "seconds": []}
    events: list[dict[str, Any]] = []

    def add(name: str, step: int, value: Any) -> None:
        v = _number(value)
        if v is None:
            return
        s = series.setdefault(name, {"step": [], "value": []})
        s["step"].append(step)
        s["value"].append(v)

    for r in records:
        step, split = r.get("step", 0), r.get("split")
        if split == "train":
            for key, value in r.items():
                if key not in ("split", "step", "time", "raw/batches"):
                    add(f"train/{key}", step, value)
            t = _number(r.get("time"))
            if t is not None:
                time["step"].append(step)
                time["seconds"].append(t)
        elif split == "val":
            add("final/bits_per_byte" if r.get("final") else "val/bits_per_byte", step,
                r.get("bits_per_byte"))
        elif split == "telemetry":
            for key, value in r.items():
                if key.startswith("telemetry/"):
                    add(key, step, value)
        elif split in ("scaling", "alert"):
            text = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("split", "step"))
            events.append({"step": step, "kind": "growth" if split == "scaling" else "alert",
                           "text": text[:300]})
    return {"series": series, "time": time, "events": events}


def read_json_file(path: Path, limit: int = MAX_SUMMARY_BYTES) -> Optional[dict[str, Any]]:
    """A JSON object from a file of at most ``limit`` bytes (summary.json), or None."""
    try:
        with open_regular(path) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            return None
        value = json.loads(data)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_spec_dict(run_dir: Path) -> Optional[dict[str, Any]]:
    """A run's spec.yaml as plain data (bounded, safe YAML), or None when unreadable."""
    from bitlm_core.spec import parse_yaml
    from bitlm_core.store.rundir import MAX_SPEC_BYTES

    try:
        with open_regular(Path(run_dir) / SPEC_FILE) as f:
            text = f.read(MAX_SPEC_BYTES + 1)
        if len(text) > MAX_SPEC_BYTES:
            return None
        return parse_yaml(text.decode("utf-8"), SPEC_FILE)
    except (OSError, ValueError):  # SpecError is a ValueError too
        return None


def _at(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data if isinstance(data, (int, float, str, bool)) or data is None else None


def flock_holders() -> Optional[dict[tuple[int, int, int], int]]:
    """Exclusive ``flock`` holders by (device major, minor, inode), from Linux's
    ``/proc/locks`` (the kernel's own table: reading it takes no lock, so a run starting
    meanwhile is never disturbed); None where there is no such table."""
    try:
        with open("/proc/locks", "rb") as f:
            table = f.read(1 << 22).decode("ascii", "replace")
    except OSError:
        return None
    holders = {}
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK" or fields[3] != "WRITE":
            continue
        try:
            major, minor, inode = fields[5].split(":")
            holders[(int(major, 16), int(minor, 16), int(inode))] = int(fields[4])
        except ValueError:
            continue
    return holders


def _lock_file(run_dir: Path) -> Optional[os.stat_result]:
    try:
        st = os.lstat(Path(run_dir) / RUN_LOCK)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None  # a link is nobody's lock


def lock_holder(run_dir: Path, holders=None) -> Optional[int]:
    """The PID of the process holding ``run_dir``'s run lock (a training run), or None.

    From Linux's ``/proc/locks`` (:func:`flock_holders`; pass its result to check many runs
    with one read). Where there is no such table this says None: the PID written in a lock file
    outlives its process, and may be another process's by now."""
    st = _lock_file(run_dir)
    if st is None:
        return None
    holders = flock_holders() if holders is None else holders
    if holders is None:  # pragma: no cover - not Linux
        return None
    return holders.get((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))


def interrupt_holder(run_dir: Path) -> Optional[int]:
    """Send SIGINT (what Ctrl-C sends: the run checkpoints and stops) to the process training
    in ``run_dir``; its PID, or None when none is. The process is checked to have the lock
    file open (``/proc/PID/fd``) and signalled through a pidfd, so a PID that changed hands
    in between is never signalled."""
    import signal

    st = _lock_file(run_dir)
    pid = lock_holder(run_dir)
    if st is None or pid is None:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # pragma: no cover - no pidfds (old kernel, not Linux)
        return None
    try:
        holds = False
        fds = Path(f"/proc/{pid}/fd")
        for fd in fds.iterdir():
            try:
                other = os.stat(fd)
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                holds = True
                break
        if not holds:
            return None
        signal.pidfd_send_signal(pidfd, signal.SIGINT)
        return pid
    except OSError:
        return None
    finally:
        os.close(pidfd)


def is_run(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / SPEC_FILE).is_file()


def run_info(run_dir: Path, holders: Optional[dict[int, int]] = None) -> dict[str, Any]:
    """One row of a runs table: ``name``, ``status`` (running, finished, stopped), the spec's
    main settings (:data:`SETTINGS`), the last training step's figures and the summary's.
    ``holders``: :func:`flock_holders`, read once for many runs."""
    run_dir = Path(run_dir)
    spec = read_spec_dict(run_dir) or {}
    summary = read_json_file(run_dir / SUMMARY_FILE)
    holder = lock_holder(run_dir, holders)
    status = "running" if holder else "finished" if summary else "stopped"
    row: dict[str, Any] = {"name": run_dir.name, "status": status, "pid": holder,
                           "finished": summary is not None,
                           "spec_name": _at(spec, "name")}
    row.update({col: _at(spec, key) for key, col in SETTINGS.items()})
    last = _last_train_record(run_dir)
    row["last_step"] = last.get("step") if last else None
    row["train_bits_per_byte"] = _number(last.get("bits_per_byte")) if last else None
    row["time"] = _number(last.get("time")) if last else None
    if summary:
        row["held_out_bits_per_byte"] = _number(summary.get("held_out_bits_per_byte"))
        row["parameters"] = summary.get("parameters")
        row["train_seconds"] = _number(summary.get("train_seconds"))
    else:
        row["held_out_bits_per_byte"] = row["parameters"] = row["train_seconds"] = None
    try:
        row["modified"] = (run_dir / METRICS_FILE).stat().st_mtime
    except OSError:
        row["modified"] = None
    return row


def _last_train_record(run_dir: Path, tail: int = 1 << 14) -> Optional[dict[str, Any]]:
    """The last ``split: train`` record, read from the file's end only."""
    path = run_dir / METRICS_FILE
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - tail))
            chunk = f.read(tail)
    except OSError:
        return None
    for line in reversed(chunk.splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("split") == "train":
            return record
    return None


def list_runs(runs_dir: Path) -> list[Path]:
    """The run folders directly inside ``runs_dir`` (bitlm's marker and a spec), by name;
    symbolic links are not followed."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise DataError(f"{runs_dir} is not a folder; give the folder that holds your run "
                        "folders (default: runs)")
    found = []
    with os.scandir(runs_dir) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and RUN_NAME.fullmatch(entry.name) \
                    and is_run(Path(entry.path)):
                found.append(Path(entry.path))
                if len(found) >= MAX_RUNS:
                    break
    return sorted(found, key=lambda p: p.name)


def resolve_run(runs_dir: Path, name: Any, must_exist: bool = True) -> Path:
    """The folder of run ``name`` inside ``runs_dir``; a DataError for anything else: a name
    that is not a plain folder name (no ``/``, no ``..``), a symbolic link, or a folder that is
    not a run (when ``must_exist``)."""
    if name is None:
        raise DataError("give a run's name (the name of its folder in the runs folder)")
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
        raise DataError(f"run name {str(name)[:80]!r} is not a run folder's name: use letters, "
                        "digits, '.', '_' and '-' (no '/' or '..'), at most 128 characters")
    root = Path(runs_dir).resolve()
    path = root / name
    if path.is_symlink():
        raise DataError(f"run {name!r} is a symbolic link; only folders inside {root} are "
                        "served")
    if path.resolve().parent != root:
        raise DataError(f"run {name!r} is not inside {root}")
    if must_exist and not is_run(path):
        raise NoSuchRun(f"no run named {name!r} in {root}")
    return path
