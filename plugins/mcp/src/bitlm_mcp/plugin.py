"""Registers ``bitlm mcp``; the MCP SDK is imported only when the command runs."""

from __future__ import annotations

from bitlm_core.hookspecs import hookimpl
from bitlm_core.records import CommandSpec


@hookimpl
def bitlm_commands():
    yield CommandSpec("mcp", "bitlm_mcp.commands:mcp_command",
                      "An MCP server on stdio: an assistant lists, reads, starts and samples runs.")
