"""Locks on run folders, so that two processes never write one run and nothing is deleted under
a reader.

Two lock files, both bitlm's own:

``.bitlm-lock`` in a run folder
    held exclusively by ``bitlm run`` for the whole run (and so by ``--restart`` while it
    deletes). A second ``bitlm run`` on the same folder stops at once with a message naming
    the holder's PID and command, which the holder writes into the file.
``checkpoints/.lock``
    held shared while a checkpoint is read (``bitlm eval``, ``sample``, ``quantize``, a
    resume), exclusively while checkpoints are deleted (pruning, ``--restart``). Readers may
    run alongside training; a checkpoint is never pruned while it is being read. Both sides
    hold it for the few milliseconds their reads and deletes take, so they wait for each other
    rather than fail.

The locks are the operating system's (``fcntl.flock``): they go when the process does, however
it ends, so a killed run never leaves a folder locked. Where ``fcntl`` does not exist (Windows),
folders are not locked and a warning says so once.
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bitlm_core.errors import CheckpointError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

RUN_LOCK = ".bitlm-lock"
CHECKPOINT_LOCK = ".lock"  # inside checkpoints/
HOLDER_BYTES = 512  # what is read of a lock file to name its holder


def _unlocked_warning() -> None:
    warnings.warn("run folders are not locked on this platform (no fcntl): do not start two "
                  "bitlm runs on one folder", RuntimeWarning, stacklevel=3)


def describe_holder(path: Path) -> str:
    """``PID 1234, bitlm run spec.yaml`` from a lock file, or ``unknown`` when unreadable."""
    try:
        with open(path, "rb") as f:
            text = f.read(HOLDER_BYTES).decode("utf-8", errors="replace").strip()
    except OSError:
        return "unknown"
    pid, _, what = text.partition(" ")
    return f"PID {pid}, {what}" if pid.isdigit() else "unknown"


@contextmanager
def run_lock(run_dir: Path, what: str = "") -> Iterator[None]:
    """Hold ``run_dir``'s run lock exclusively, or raise a CheckpointError naming the holder.

    The folder must exist. ``what`` (default: this process's command line) is written into the
    lock file for the message another process would show.
    """
    path = Path(run_dir) / RUN_LOCK
    if fcntl is None:  # pragma: no cover
        _unlocked_warning()
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(
                f"{run_dir} is in use by another bitlm process ({describe_holder(path)}); wait "
                "for it to finish, stop it, or choose another folder with --out") from None
        os.ftruncate(fd, 0)
        command = what or " ".join(os.path.basename(a) if i == 0 else a
                                   for i, a in enumerate(sys.argv))
        os.write(fd, f"{os.getpid()} {command}"[:HOLDER_BYTES].encode("utf-8", "replace"))
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextmanager
def checkpoint_lock(run_dir: Path, shared: bool) -> Iterator[None]:
    """Hold the checkpoints' lock shared (reading) or exclusively (deleting); waits for the
    other side. Nothing happens when the run has no checkpoints folder."""
    folder = Path(run_dir) / "checkpoints"
    if fcntl is None or not folder.is_dir():
        yield
        return
    try:
        fd = os.open(folder / CHECKPOINT_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a read-only run folder: nothing can delete in it either
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
