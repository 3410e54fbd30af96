"""Exceptions that reach users.

Every error raised for bad input derives from :class:`BitlmError`. The CLI prints its message
(one clear paragraph: what is wrong, and what to do) and exits non-zero; ``--debug`` shows the
traceback. Messages are written for the person who made the mistake, not for the code.
"""

from __future__ import annotations


class BitlmError(Exception):
    """Base class of every user-facing bitlm error."""

    exit_code = 2


class SpecError(BitlmError):
    """A run spec is missing, malformed, or does not validate."""


class ResolutionError(SpecError):
    """A spec names a component that no installed plugin provides, or gives it bad options."""


class OptionError(SpecError, ValueError):
    """A component's option has a value it cannot use. Factories may raise it (or any
    ValueError): the registry then reports it with the spec key of the component."""


class PluginError(BitlmError):
    """A plugin failed to load, or two plugins provide the same name."""


class BitsError(BitlmError, ValueError):
    """A bit tensor is malformed: wrong dtype, values other than 0 and 1, or a bad length."""


class ParityError(BitsError):
    """A 9-bit frame's parity bit does not match its data bits."""


class DataError(BitlmError):
    """A corpus or text file cannot be used: missing, empty, too short, or not UTF-8."""


class CodecError(BitlmError, ValueError):
    """A compressed stream is truncated, corrupted, hostile, or exceeds the caller's limit."""


class CheckpointError(BitlmError):
    """A checkpoint or run folder is missing, incomplete, or inconsistent with the spec."""


class SafetyError(BitlmError):
    """A strict safety gate blocked an output (exit status 3: the input was fine)."""

    exit_code = 3
