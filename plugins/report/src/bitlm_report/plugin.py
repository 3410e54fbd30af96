"""Registers the ``html`` reporter (called by ``bitlm run`` when a run ends) and ``bitlm
report``; matplotlib is imported only when a report is written."""

from __future__ import annotations

from bitlm_core.hookspecs import hookimpl
from bitlm_core.records import CommandSpec, ReporterSpec


@hookimpl
def bitlm_reporters():
    yield ReporterSpec("html", "bitlm_report.html:HtmlReport",
                       "report.html (self-contained) and PNG plots in the run folder")


@hookimpl
def bitlm_commands():
    yield CommandSpec("report", "bitlm_report.commands:report_command",
                      "Write report.html and PNG plots of one run, or of several overlaid.")
