"""``bitlm plugins list`` and ``bitlm plugins show``: what is installed, and what it provides."""

from __future__ import annotations

import json
import warnings

import typer
from rich.table import Table

from bitlm_core.cli.errors import err, out
from bitlm_core.errors import BitlmError

plugins_app = typer.Typer(help="Inspect installed plugins and the components they provide.",
                          no_args_is_help=True)


@plugins_app.command("list")
def plugins_list(
    all_: bool = typer.Option(False, "--all", help="Also list every component and its "
                              "description."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List plugins: name, package, version, status (active, disabled, failed) and what each
    provides."""
    from bitlm_core.plugins import PluginWarning
    from bitlm_core.registry import get_registry

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)  # shown in the table instead
        registry = get_registry(raise_conflicts=False)
    infos = list(registry.manager.infos.values())
    if as_json:
        data = {"plugins": [i.as_dict() for i in infos], "conflicts": registry.conflicts}
        if all_:
            data["components"] = [
                {"kind": kind, "name": r.name, "plugin": r.plugin,
                 "description": r.description}
                for kind, records in registry.records.items() for r in records.values()]
        out.print_json(json.dumps(data))
        return
    table = Table(title="bitlm plugins")
    for col in ("plugin", "package", "version", "status", "provides"):
        table.add_column(col, overflow="fold")
    for i in infos:
        status = {"active": "[green]active[/]", "disabled": "[yellow]disabled[/]"}.get(
            i.status, f"[red]failed[/]: {i.error}")
        provides = "; ".join(f"{k}: {', '.join(v)}" for k, v in i.provides.items())
        table.add_row(i.name, i.distribution or "", i.version or "", status, provides)
    out.print(table)
    for conflict in registry.conflicts:
        err.print(f"[bold red]conflict:[/] {conflict}", markup=True, soft_wrap=True)
    if all_:
        _components_table(registry, list(registry.records))


def _components_table(registry, kinds: list[str], load_lazy: bool = False) -> None:
    """One row per component. Lazy factories are imported (torch and all) only when
    ``load_lazy``: ``plugins list --all`` must stay fast, ``plugins show`` may take its time."""
    import inspect

    table = Table(title="components")
    for col in ("kind", "name", "plugin", "options", "description"):
        table.add_column(col, overflow="fold")
    for kind in kinds:
        for r in sorted(registry.records[kind].values(), key=lambda r: r.name):
            if r.lazy and not load_lazy:
                params = ["(see `bitlm plugins show " + kind + "`)"]
            else:
                try:
                    params = [f"{n}={p.default!r}" if p.default is not p.empty else n
                              for n, p in inspect.signature(r.load()).parameters.items()
                              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
                except Exception as exc:  # a lazy factory that fails to import
                    params = [f"(cannot load: {type(exc).__name__}: {exc})"]
            table.add_row(kind, r.name, r.plugin or "", ", ".join(params), r.description)
    out.print(table)


@plugins_app.command("show")
def plugins_show(kind: str = typer.Argument(..., help="Component kind, e.g. attention, "
                                            "compressor, encoder, sampler.")) -> None:
    """Show the components of one kind, with their options and where they come from."""
    from bitlm_core.records import KINDS
    from bitlm_core.registry import close_matches, get_registry

    aliases = {k: k for k in KINDS}
    for k, spec in KINDS.items():
        aliases[spec.title.replace(" ", "-")] = k
        aliases[spec.title.split()[-1]] = k
        aliases[k + "s"] = k
    aliases.update({"compression": "compressor", "gate": "safety", "gates": "safety",
                    "metrics": "telemetry", "backend": "attention",
                    "backends": "attention"})
    resolved = aliases.get(kind.lower())
    if resolved is None:
        hint = close_matches(kind.lower(), list(aliases))
        raise BitlmError(f"unknown component kind '{kind}'"
                   + (f"; did you mean {', '.join(hint)}?" if hint else "")
                   + f"\n  kinds: {', '.join(KINDS)}")
    _components_table(get_registry(), [resolved], load_lazy=True)
