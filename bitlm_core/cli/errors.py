"""How every ``bitlm`` command reports errors, and the consoles it prints on.

A :class:`~bitlm_core.errors.BitlmError` (bad input) prints one ``error:`` line on stderr and
exits with its status (2; 3 for a strict safety gate); Ctrl-C and SIGTERM say what was kept and
how to resume, and exit with 128 + the signal (130, 143); any other exception is a bug,
reported as an internal error with exit status 1. With
``--debug`` (or ``BITLM_DEBUG=1``) the traceback is shown instead. :func:`guard` gives a
command this behaviour; the CLI applies it to every command, bitlm's and plugins' alike.
"""

from __future__ import annotations

import functools
import os
import warnings
from contextlib import contextmanager
from typing import Any, Callable

import typer
from rich.console import Console
from rich.markup import escape

from bitlm_core.errors import BitlmError

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)
_state = {"debug": os.environ.get("BITLM_DEBUG", "") not in ("", "0")}
_default_showwarning = warnings.showwarning


def print_text(text: str) -> None:
    """Generated text on stdout exactly as it is (rich would wrap it at the terminal width)."""
    out.file.write(text + "\n")
    out.file.flush()


def _process() -> str:
    """``rank N: `` in a process of a job of several (torchrun's variables), else nothing."""
    rank, size = os.environ.get("RANK", ""), os.environ.get("WORLD_SIZE", "1")
    return f"rank {rank[:6]}: " if size != "1" and rank else ""


@contextmanager
def user_errors():
    """Turn bitlm errors into one message and an exit status; keep tracebacks for --debug."""
    try:
        yield
    except BitlmError as exc:
        if _state["debug"]:
            raise
        from bitlm_core.engine.runtime import ignore_stop_signals

        ignore_stop_signals()  # the process ends with this message: a SIGTERM (a job's
        # launcher stopping the other processes) must not replace it with "interrupted"
        err.print(f"[bold red]error:[/] {escape(_process() + str(exc))}", markup=True,
                  soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (bitlm_core.engine.runtime)
        if _state["debug"]:
            raise
        signum = getattr(exc, "signum", 2)
        if _process() and os.environ.get("RANK") != "0":
            pass  # the other processes of a job stopped with rank 0, which says so
        elif str(exc) and signum:
            err.print(f"interrupted: {exc}", markup=False, soft_wrap=True)
        else:
            err.print("interrupted. Run the same command again to resume from the last "
                      "checkpoint.")
        raise typer.Exit(128 + signum) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:  # a bug, not bad input: say so, and how to see more
        if _state["debug"]:
            raise
        err.print(f"[bold red]internal error:[/] {escape(f'{type(exc).__name__}: {exc}')}\n"
                  "Run again with --debug for the traceback.", markup=True, soft_wrap=True)
        raise typer.Exit(1) from None


def guard(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` reporting errors as :func:`user_errors` does (Typer reads the wrapped
    function's signature, so its options are unchanged)."""
    if getattr(command, "__bitlm_guarded__", False):
        return command

    @functools.wraps(command)
    def guarded(*args, **kwargs):
        from bitlm_core.engine.runtime import signals_as_interrupts

        # outermost: a second Ctrl-C while the first is reported is ignored, not a silent exit
        with signals_as_interrupts(exiting_after_stop=True), user_errors():
            return command(*args, **kwargs)

    guarded.__bitlm_guarded__ = True
    return guarded


def show_plugin_warning(message, category, filename, lineno, file=None, line=None):
    """Plugin and precision warnings as one yellow line; every other warning as Python shows it."""
    from bitlm_core.engine.device import PrecisionWarning
    from bitlm_core.plugins import PluginWarning

    if issubclass(category, (PluginWarning, PrecisionWarning)):
        err.print(f"[yellow]warning:[/] {message}", markup=True, soft_wrap=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)
