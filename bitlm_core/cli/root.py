"""The ``bitlm`` command line (Typer + rich): bitlm's own commands, then the plugins'.

``run``, ``validate``, ``eval``, ``sample`` and ``plugins`` are the CLI's own; every other
command comes from a ``bitlm_commands`` record, bitlm's ``codec`` and ``quantize`` included.
Plugin commands are added when the CLI starts, each plugin's on their own: one whose command
module fails to import, whose factory returns something else than a Typer app or a function,
whose command name is taken (by the CLI's own commands or an earlier plugin's), or that Typer
cannot build, adds no command, and its plugin is listed as failed.

Start-up stays fast: nothing here imports torch or numpy; commands import them when they run.
Every command reports errors through :func:`bitlm_core.cli.errors.guard`.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

# One thread that waits passively beats two busy-waiting ones for small models on a 2-core
# machine (BENCHMARKS.md); must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

try:  # Typer 0.20+ ships its own copy of click, with its own exceptions
    from typer._click.exceptions import UsageError  # noqa: E402
except ImportError:  # pragma: no cover - older Typer
    from click.exceptions import UsageError  # noqa: E402

from bitlm_core.cli import inference, plugins, run  # noqa: E402
from bitlm_core.cli.errors import _state, err, guard, out, show_plugin_warning  # noqa: E402
from bitlm_core.errors import PluginError  # noqa: E402

def failed_plugins() -> list:
    """The plugins that failed to load (as far as the CLI's start-up saw)."""
    from bitlm_core import plugins

    manager = plugins._MANAGER
    return [i for i in manager.infos.values() if i.status == "failed"] if manager else []


class BitlmGroup(TyperGroup):
    """The root command group: an unknown command, or ``--help``, mentions the plugins that
    failed to load (one of them may have provided the command)."""

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except UsageError as exc:
            failed = failed_plugins()
            if failed and args:
                exc.message += ("\nplugins that failed to load (one may provide it): "
                                + "; ".join(f"{i.name}: {i.error}" for i in failed))
            raise

    def format_help(self, ctx, formatter):
        super().format_help(ctx, formatter)
        failed = failed_plugins()
        if failed:
            names = ", ".join(i.name for i in failed)
            err.print(f"[yellow]warning:[/] {len(failed)} plugin(s) failed to load ({names}): "
                      "`bitlm plugins list` says why", markup=True)


app = typer.Typer(
    cls=BitlmGroup,
    name="bitlm",
    help="Train, evaluate and sample bit-native transformer language models.\n\n"
         "`bitlm run` with no spec trains the embedded quickstart.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        from bitlm_core import __version__

        out.print(f"bitlm {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    _state["debug"] = debug or os.environ.get("BITLM_DEBUG", "") not in ("", "0")
    warnings.showwarning = show_plugin_warning


app.command()(run.run)
app.command()(run.validate)
app.add_typer(plugins.plugins_app, name="plugins")
app.command("eval")(inference.eval_)
app.command()(inference.sample)


def command_names(typer_app: typer.Typer) -> set[str]:
    """The names ``bitlm`` already answers to."""
    names = {info.name or info.callback.__name__.replace("_", "-")
             for info in typer_app.registered_commands}
    return names | {info.name for info in typer_app.registered_groups}


def guard_all(typer_app: typer.Typer) -> None:
    """Wrap every command of ``typer_app`` and of its groups in :func:`guard`."""
    for info in typer_app.registered_commands:
        info.callback = guard(info.callback)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            guard_all(group.typer_instance)


def command_from(record, made: Any) -> typer.Typer:
    """A plugin command as a Typer app of its own (a group, or one command), or a TypeError."""
    if isinstance(made, typer.Typer):
        return made
    if callable(made):
        single = typer.Typer()
        single.command(name=record.name, short_help=record.description,
                       help=None if made.__doc__ else record.description)(made)
        return single
    raise TypeError(f"its factory returned {type(made).__name__}; return a typer.Typer (a "
                    "command group) or a function (one command)")


def add_plugin_commands(typer_app: typer.Typer) -> None:
    """Add every ``bitlm_commands`` record's command. A plugin's commands go in together or
    not at all: one that cannot be built, or whose name is taken (by the CLI's own commands or
    by another plugin's), fails its plugin, which then provides nothing."""
    from bitlm_core.plugins import BUILTIN_NAME, describe_exception
    from bitlm_core.registry import get_registry, load_factory

    try:  # plugin failures are reported when a command first uses the registry
        registry = get_registry(raise_conflicts=False, report=False)
    except PluginError:  # bitlm's own components failed: every command will say so
        return
    for kept, refused in registry.clashes:
        if kept.kind == "command" and registry.manager.infos[refused.plugin].status == "active":
            registry.fail(refused.plugin, f"its command '{refused.name}' is also provided by "
                                          f"{kept.origin}")
    own = command_names(typer_app)
    by_plugin: dict[str, list] = {}
    for record in registry.records["command"].values():
        by_plugin.setdefault(record.plugin, []).append(record)
    for plugin, records in by_plugin.items():
        try:
            built = []
            for record in records:
                if record.name in own:
                    raise ValueError(f"the command name '{record.name}' is bitlm's own")
                made = load_factory(record)()
                command = command_from(record, made)
                typer.main.get_command(command)  # Typer builds it now, or says why it cannot
                built.append((record, made, command))
        except Exception as exc:
            if plugin != BUILTIN_NAME:  # bitlm's own never fails: tests/test_cli.py checks it
                registry.fail(plugin, f"command '{record.name}': {describe_exception(exc)}")
            continue
        for record, made, command in built:
            if command is made:  # a group: its line in `bitlm --help` is the record's
                help_text = {} if command.info.help else {"help": record.description}
                typer_app.add_typer(command, name=record.name, short_help=record.description,
                                    **help_text)
            else:
                typer_app.registered_commands.extend(command.registered_commands)


add_plugin_commands(app)
guard_all(app)


def main() -> None:
    from bitlm_core.engine.runtime import ignore_stop_signals

    try:
        app()
    except SystemExit as done:
        if os.environ.get("WORLD_SIZE", "1") != "1":  # a process of a job (torchrun's)
            ignore_stop_signals()
            # ends now, without the interpreter's teardown: threads of the process group and
            # of autograd that outlive a run can deadlock it on the GIL (pytorch#190489), and
            # a worker that never exits holds the whole job
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        raise
    finally:  # the command is done: a late Ctrl-C must not break the exit
        ignore_stop_signals()
