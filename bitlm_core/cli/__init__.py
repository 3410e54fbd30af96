"""The ``bitlm`` command line: ``app`` (Typer) and ``main`` (the console script).

Modules: ``root`` (the root command group; plugin commands), ``errors`` (how every command
reports errors), ``run`` (run, validate), ``inference`` (eval, sample), ``plugins`` (plugins
list, show), ``codec`` and ``quantize`` (registered through the ``bitlm_commands`` hook, as a
plugin's commands are). What the commands do lives in :mod:`bitlm_core.app`.
"""

from bitlm_core.cli.root import app, main
from bitlm_core.cli.errors import _state, user_errors  # noqa: F401 (_state: the --debug switch)

__all__ = ["app", "main", "user_errors"]
