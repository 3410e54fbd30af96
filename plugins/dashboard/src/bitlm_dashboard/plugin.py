"""Registers ``bitlm dashboard``; the server is imported only when the command runs."""

from __future__ import annotations

from bitlm_core.hookspecs import hookimpl
from bitlm_core.records import CommandSpec


@hookimpl
def bitlm_commands():
    yield CommandSpec("dashboard", "bitlm_dashboard.commands:dashboard_command",
                      "A local web page of runs: live curves, overlays, start, stop, sample.")
