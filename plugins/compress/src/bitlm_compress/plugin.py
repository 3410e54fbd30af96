"""Registers ``bitlm compress`` and ``bitlm decompress`` (entry point group ``bitlm``); the
command modules import torch and constriction only when a command runs."""

from __future__ import annotations

from bitlm_core.hookspecs import hookimpl
from bitlm_core.records import CommandSpec


@hookimpl
def bitlm_commands():
    yield CommandSpec("compress", "bitlm_compress.commands:compress_command",
                      "Compress any file with a trained run's model (lossless).")
    yield CommandSpec("decompress", "bitlm_compress.commands:decompress_command",
                      "Restore a file written by `bitlm compress`.")
