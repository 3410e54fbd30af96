"""Plugin loading: built-ins first, then entry points in group ``bitlm``, each in isolation.

A plugin that fails to import, defines a hook the core does not know, or raises while yielding
its records is skipped with a warning and reported as ``failed`` by ``bitlm plugins list``; the
rest keep working. Two environment switches change that:

``BITLM_STRICT_PLUGINS=1``
    any plugin failure is fatal (for plugin authors who want to see their error at once).
``BITLM_DISABLE_PLUGINS=1`` (or ``all``), or a comma-separated list of plugin names
    skip external plugins (all of them, or the ones named); they are listed as ``disabled``.

This module imports no torch: listing plugins must stay fast.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from bitlm_core import hookspecs
from bitlm_core.errors import PluginError

ENTRY_POINT_GROUP = "bitlm"
STRICT_ENV = "BITLM_STRICT_PLUGINS"
DISABLE_ENV = "BITLM_DISABLE_PLUGINS"
BUILTIN_MODULE = "bitlm_core.builtins.plugin"
BUILTIN_NAME = "core"


class PluginWarning(UserWarning):
    """A plugin was skipped because it failed to load."""


@dataclass
class PluginInfo:
    """What is known of one plugin: where it came from and whether it loaded."""

    name: str
    distribution: str | None
    version: str | None
    module: str
    status: str = "active"  # active | disabled | failed
    error: str | None = None
    provides: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "status": self.status,
            "error": self.error,
            "provides": self.provides,
        }


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on", "all"}


def strict_mode() -> bool:
    return _truthy(os.environ.get(STRICT_ENV))


def disabled_names() -> set[str] | None:
    """None when nothing is disabled; an empty set means every external plugin is disabled."""
    raw = os.environ.get(DISABLE_ENV, "").strip()
    if not raw or raw.lower() in {"0", "false", "no", "off"}:
        return None
    if _truthy(raw):
        return set()
    return {n.strip() for n in raw.split(",") if n.strip()}


def describe_exception(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class PluginManager:
    """Wraps a pluggy manager and keeps a :class:`PluginInfo` for every plugin seen."""

    def __init__(self, defer_warnings: bool = False) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self._known_hooks = {
            name for name in dir(hookspecs) if name.startswith("bitlm_")
        }
        self.defer_warnings = defer_warnings  # keep warnings until flush_warnings()
        self.pending: list[str] = []

    # -- failures ------------------------------------------------------------------------
    def fail(self, info: PluginInfo, message: str) -> None:
        """Record that a plugin failed: a warning, or an error in strict mode or for core."""
        info.status = "failed"
        info.error = message
        if self.pm.get_plugin(info.name) is not None:
            self.pm.unregister(name=info.name)
        text = f"bitlm plugin '{info.name}' ({info.module}) failed and was skipped: {message}"
        if info.name == BUILTIN_NAME:
            raise PluginError(f"bitlm's built-in components failed to load: {message}")
        if self.defer_warnings:
            self.pending.append(text)
        else:
            self._report(text)

    @staticmethod
    def _report(text: str) -> None:
        if strict_mode():
            raise PluginError(f"{text}\n(unset {STRICT_ENV} to skip failing plugins instead)")
        warnings.warn(text, PluginWarning, stacklevel=3)

    def flush_warnings(self) -> None:
        """Report the failures kept back (the CLI defers them while it starts, so that its own
        commands are all there): a warning each once, or in strict mode an error, raised again
        at every call while they last. From now on failures are reported at once."""
        self.defer_warnings = False
        if strict_mode() and self.pending:
            self._report(self.pending[0])
        pending, self.pending = self.pending, []
        for text in pending:
            self._report(text)

    # -- loading -------------------------------------------------------------------------
    def register_module(self, info: PluginInfo, module: Any) -> None:
        self.infos[info.name] = info
        unknown = [
            name
            for name in dir(module)
            if name.startswith("bitlm_")
            and callable(getattr(module, name))
            and hasattr(getattr(module, name), "bitlm_impl")
            and name not in self._known_hooks
        ]
        if unknown:
            self.fail(info, f"defines unknown hook(s) {', '.join(unknown)}; "
                            f"known hooks: {', '.join(sorted(self._known_hooks))}")
            return
        try:
            self.pm.register(module, name=info.name)
        except Exception as exc:  # pluggy validation errors and name clashes
            self.fail(info, describe_exception(exc))

    def load_builtins(self) -> None:
        module = importlib.import_module(BUILTIN_MODULE)
        from bitlm_core import __version__

        info = PluginInfo(BUILTIN_NAME, "bitlm-core", __version__, BUILTIN_MODULE)
        self.register_module(info, module)

    def load_entry_points(self) -> None:
        disabled = disabled_names()
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                name=ep.name,
                distribution=dist.metadata["Name"] if dist is not None else None,
                version=dist.version if dist is not None else None,
                module=ep.value,
            )
            if ep.name in self.infos:
                first = self.infos[ep.name]
                info.name = f"{ep.name}#{info.distribution}"
                self.infos[info.name] = info
                self.fail(info, f"entry point name '{ep.name}' is also used by {first.module} "
                                f"({first.distribution}); rename one of them")
                continue
            if disabled is not None and (not disabled or ep.name in disabled):
                info.status = "disabled"
                info.error = f"disabled by {DISABLE_ENV}"
                self.infos[ep.name] = info
                continue
            self.infos[ep.name] = info
            try:
                module = ep.load()
            except Exception as exc:
                self.fail(info, describe_exception(exc))
                continue
            self.register_module(info, module)

    def hook_impls(self, hook_name: str):
        """(plugin name, function) for every implementation of a hook, built-ins first."""
        caller = getattr(self.pm.hook, hook_name)
        impls = caller.get_hookimpls()
        order = list(self.infos)
        impls = sorted(impls, key=lambda i: order.index(i.plugin_name)
                       if i.plugin_name in order else len(order))
        return [(impl.plugin_name, impl.function) for impl in impls]

    def failed(self) -> list[PluginInfo]:
        return [i for i in self.infos.values() if i.status == "failed"]


def load_plugins(include_external: bool = True, defer_warnings: bool = False) -> PluginManager:
    """Build a plugin manager with the built-ins and (by default) every installed plugin."""
    manager = PluginManager(defer_warnings)
    manager.load_builtins()
    if include_external:
        manager.load_entry_points()
    return manager


_MANAGER: PluginManager | None = None


def get_manager(refresh: bool = False, defer_warnings: bool = False) -> PluginManager:
    """The process-wide plugin manager (loaded on first use, or again with ``refresh``):
    the CLI and the registry share it, so every plugin is loaded once."""
    global _MANAGER
    if _MANAGER is None or refresh:
        _MANAGER = load_plugins(defer_warnings=defer_warnings)
    return _MANAGER
