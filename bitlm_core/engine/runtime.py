"""Process-wide settings of a session: torch threads, and how signals stop a run.

Signals: ``bitlm run`` must survive SIGINT (Ctrl-C) and SIGTERM (what docker, Slurm and systemd
send) at any moment with a resumable run folder. :func:`signals_as_interrupts` makes both raise
:class:`Interrupted` wherever the run is, and :class:`StepBoundary` (used by the training loop)
holds them back while a step or a checkpoint is under way: the loop stops after the step, saves,
and then raises. Handlers can only be set in the main thread; elsewhere both do nothing and
Python's own handling applies.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def set_threads(threads: int | str) -> None:
    """``train.threads``: an int pins torch's intra-op threads (1 is bitwise reproducible);
    ``"auto"`` keeps torch's default of one per core."""
    import torch

    if threads != "auto":
        torch.set_num_threads(int(threads))


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; ``signum`` says which (exit status 128 + signum), the
    message what was kept."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum = signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


_stopping = {"now": False}  # a stop signal was acted on: later ones are ignored while unwinding


def ignore_stop_signals() -> None:
    """From now on SIGINT and SIGTERM do nothing: for a process that is about to exit (after a
    stop, or once its command is done), so that a late signal cannot turn a clean exit into a
    death by signal in the middle of its last messages."""
    if _in_main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)


@contextmanager
def signals_as_interrupts(exiting_after_stop: bool = False) -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` inside the block (SIGTERM would otherwise
    end the process at once, with no cleanup), once: a second signal while the first is being
    acted on (a checkpoint saved, the message printed) is ignored, so it cannot cut either
    short. The previous handlers come back after, unless ``exiting_after_stop`` and a stop
    happened: then signals stay ignored (the CLI runs every command so, and exits next)."""
    if not _in_main_thread():
        yield
        return

    def interrupt(signum, frame):
        if _stopping["now"]:
            return
        _stopping["now"] = True
        raise Interrupted(signum, f"stopped by {signal_name(signum)}")

    _stopping["now"] = False  # a new command or run (a nested block starts before any stop)
    previous = {s: signal.signal(s, interrupt) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        if exiting_after_stop and _stopping["now"]:
            ignore_stop_signals()
        else:
            for s, handler in previous.items():
                signal.signal(s, handler)


class StepBoundary:
    """Inside the block, SIGINT and SIGTERM are noted instead of acted on: ``received`` holds
    the first, for the training loop to stop at the end of its step. ``log`` says what will
    happen, once per signal: the first stops after the step with a checkpoint; later ones while
    that checkpoint is written are told to wait for it (the save is never abandoned half-way).
    """

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.received: int | None = None
        self._previous: dict = {}

    def _note(self, signum, frame) -> None:
        name = signal_name(signum)
        if self.received is None:
            self.received = signum
            _stopping["now"] = True  # the handlers outside this block ignore later signals
            self.log(f"{name}: stopping after this step, with a checkpoint")
        else:
            self.log(f"{name} again: still saving the checkpoint; bitlm stops as soon as it is "
                     "written (the run stays resumable)")

    def __enter__(self) -> "StepBoundary":
        if _in_main_thread():
            self._previous = {s: signal.signal(s, self._note) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
