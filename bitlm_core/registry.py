"""Name -> component resolution, with errors that read like a good compiler's.

The registry asks every loaded plugin for its records (one hook call per plugin and kind, each
isolated), checks them, fills in where each came from, and rejects two records of one kind with
one name, naming both sources. :meth:`Registry.resolve` turns a spec's ``name`` into a record
and :meth:`Registry.bind` checks a spec's ``options`` against the factory's signature, both
before any tensor is built.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Mapping

from bitlm_core.errors import BitlmError, PluginError, ResolutionError
from bitlm_core.plugins import PluginManager, describe_exception, get_manager
from bitlm_core.records import KINDS, ComponentSpec

LIST_HINT = "run `bitlm plugins list` to see installed plugins and what they provide"


def close_matches(word: str, choices: list[str]) -> list[str]:
    return difflib.get_close_matches(word, choices, n=3, cutoff=0.5)


class Registry:
    """Every component of every loaded plugin, by kind and name.

    Two plugins providing one name is a :class:`PluginError` naming both, raised when the
    registry is built; ``raise_conflicts=False`` records it in ``conflicts`` instead (for
    ``bitlm plugins list``, which must be able to show the clash). A plugin failed after the
    registry was built (:meth:`fail`, as the CLI does when a plugin's command cannot be added)
    loses every record it provided, and its clashes go with it.
    """

    def __init__(self, manager: PluginManager, raise_conflicts: bool = True):
        self.manager = manager
        self.records: dict[str, dict[str, ComponentSpec]] = {k: {} for k in KINDS}
        self.clashes: list[tuple[ComponentSpec, ComponentSpec]] = []  # (kept, refused)
        for kind in KINDS.values():
            self._collect(kind)
        if self.conflicts and raise_conflicts:
            raise PluginError("\n".join(self.conflicts))

    @property
    def conflicts(self) -> list[str]:
        """One message per name that two active plugins provide, naming both."""
        active = {n for n, i in self.manager.infos.items() if i.status == "active"}
        return [f"two plugins provide the {kept.kind} '{kept.name}': {kept.origin} and "
                f"{refused.origin}. Uninstall one of them, or disable one with "
                f"BITLM_DISABLE_PLUGINS={refused.plugin}"
                for kept, refused in self.clashes
                if kept.plugin in active and refused.plugin in active]

    def fail(self, plugin: str, message: str) -> None:
        """Drop everything ``plugin`` provided and report it failed (a half-loaded plugin is
        worse than a missing one)."""
        for records in self.records.values():
            for name in [n for n, r in records.items() if r.plugin == plugin]:
                del records[name]
        info = self.manager.infos[plugin]
        info.provides.clear()
        self.manager.fail(info, message)

    def _collect(self, kind) -> None:
        for plugin_name, function in self.manager.hook_impls(kind.hook):
            info = self.manager.infos[plugin_name]
            if info.status != "active":
                continue
            try:
                produced = list(function() or [])
                for record in produced:
                    if not isinstance(record, kind.record):
                        raise TypeError(
                            f"hook {kind.hook} yielded {type(record).__name__}, expected "
                            f"{kind.record.__name__}"
                        )
                    if not isinstance(record.name, str) or not record.name.strip():
                        raise TypeError(f"hook {kind.hook} yielded a record without a name")
                    if not (callable(record.factory) or _is_import_path(record.factory)):
                        raise TypeError(f"{kind.name} '{record.name}' has a factory that is "
                                        "neither callable nor a 'module:attribute' string")
            except Exception as exc:
                self.fail(plugin_name, f"{kind.hook}() raised {describe_exception(exc)}")
                continue
            provided = []
            for record in produced:
                record = record.with_origin(plugin_name, info.distribution)
                existing = self.records[kind.name].get(record.name)
                if existing is not None:
                    self.clashes.append((existing, record))
                    continue
                self.records[kind.name][record.name] = record
                provided.append(record.name)
            if provided:  # set, not added to: a manager may be collected again
                info.provides[kind.name] = provided

    # -- lookup ---------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self.records[kind])

    def get(self, kind: str, name: str) -> ComponentSpec | None:
        return self.records[kind].get(name)

    def resolve(self, kind: str, name: str, path: str = "") -> ComponentSpec:
        """The record named ``name`` of ``kind``, or a ResolutionError that helps fix it."""
        record = self.records[kind].get(name)
        if record is not None:
            return record
        title = KINDS[kind].title
        where = f" at {path}" if path else ""
        lines = [f"unknown {kind} '{name}'{where}"]
        names = self.names(kind)
        matches = close_matches(name, names)
        if matches:
            lines.append(f"  did you mean: {', '.join(matches)}?")
        lines.append(f"  available {title}: {', '.join(names) if names else '(none)'}")
        failed = [i for i in self.manager.infos.values() if i.status == "failed"]
        if failed:
            lines.append("  plugins that failed to load (one may have provided it):")
            lines.extend(f"    {i.name}: {i.error}" for i in failed)
        disabled = [i.name for i in self.manager.infos.values() if i.status == "disabled"]
        if disabled:
            lines.append(f"  disabled plugins: {', '.join(disabled)}")
        lines.append(f"  {LIST_HINT}")
        raise ResolutionError("\n".join(lines))

    def bind(self, record: ComponentSpec, options: Mapping[str, Any] | None,
             path: str = "") -> inspect.BoundArguments:
        """Check ``options`` against the factory's signature without calling it."""
        return bind_options(record, options or {}, path)

    def build(self, kind: str, name: str, options: Mapping[str, Any] | None = None,
              path: str = "") -> Any:
        """Resolve, bind and call the factory: the component object itself."""
        record = self.resolve(kind, name, path)
        bound = self.bind(record, options, path)
        try:
            return load_factory(record)(*bound.args, **bound.kwargs)
        except (ValueError, TypeError) as exc:  # OptionError, CodecError... included
            raise ResolutionError(
                f"{kind} '{name}' at {path or kind} rejected its options: {exc}"
            ) from exc
        except BitlmError:
            raise
        except Exception as exc:  # a plugin's failure, not the spec's: say whose
            raise PluginError(f"{kind} '{name}' from {record.origin} failed to build: "
                              f"{describe_exception(exc)}") from exc


def _is_import_path(value: Any) -> bool:
    return isinstance(value, str) and value.count(":") == 1 and all(value.split(":"))


def load_factory(record: ComponentSpec):
    """The record's factory; a lazy one that fails to import is the plugin's error, named."""
    try:
        return record.load()
    except Exception as exc:
        raise PluginError(f"{record.kind} '{record.name}' from {record.origin} cannot be "
                          f"loaded ({record.factory}): {describe_exception(exc)}") from None


def bind_options(record: ComponentSpec, options: Mapping[str, Any],
                 path: str = "") -> inspect.BoundArguments:
    factory = load_factory(record)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without signatures: accept and hope
        return inspect.Signature().bind()
    params = signature.parameters
    accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    accepted = [n for n, p in params.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    where = f"{path}.options" if path else "options"
    if not accepts_kwargs:
        for key in options:
            if key not in accepted:
                hint = close_matches(str(key), accepted)
                lines = [f"{record.kind} '{record.name}' does not accept option '{key}' "
                         f"at {where}.{key}"]
                if hint:
                    lines.append(f"  did you mean: {', '.join(hint)}?")
                lines.append(f"  accepted options: {', '.join(accepted) if accepted else '(none)'}")
                raise ResolutionError("\n".join(lines))
    try:
        bound = signature.bind(**dict(options))
    except TypeError as exc:
        missing = [n for n, p in params.items()
                   if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                   and n not in options]
        detail = f"missing required option(s): {', '.join(missing)}" if missing else str(exc)
        raise ResolutionError(
            f"{record.kind} '{record.name}' at {where}: {detail}"
        ) from None
    # Check simple annotated types (int, float, bool, str) so that a typo such as
    # temperature: "hot" fails at validation time rather than deep inside torch.
    for key, value in options.items():
        param = params.get(key)
        if param is None or param.default is param.empty and param.annotation is param.empty:
            continue
        expected = _simple_type(param)
        if expected is not None and not _type_ok(value, expected):
            raise ResolutionError(
                f"{record.kind} '{record.name}' option {where}.{key} should be "
                f"{expected.__name__}, got {type(value).__name__} {value!r}"
            )
    return bound


def _simple_type(param: inspect.Parameter) -> type | None:
    ann = param.annotation
    if isinstance(ann, str):
        ann = {"int": int, "float": float, "bool": bool, "str": str}.get(ann.strip())
    if ann in (int, float, bool, str):
        return ann
    default = param.default
    if default is not param.empty and default is not None and type(default) in (int, float,
                                                                                bool, str):
        return type(default)
    return None


def _type_ok(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


_REGISTRY: Registry | None = None


def get_registry(refresh: bool = False, raise_conflicts: bool = True,
                 report: bool = True) -> Registry:
    """The process-wide registry (built on first use, over the process-wide plugin manager;
    ``refresh`` loads the plugins again).

    ``report`` shows the plugin failures kept back so far (a warning each; in strict mode an
    error, on every call while a plugin is failed). The CLI builds the registry with
    ``report=False`` while it starts, so that a broken plugin cannot take bitlm's own
    commands away; the first command that uses the registry reports.
    """
    global _REGISTRY
    if _REGISTRY is None or refresh:
        _REGISTRY = Registry(get_manager(refresh=refresh, defer_warnings=not report),
                             raise_conflicts=False)
    if report:
        _REGISTRY.manager.flush_warnings()
    if _REGISTRY.conflicts and raise_conflicts:
        raise PluginError("\n".join(_REGISTRY.conflicts))
    return _REGISTRY
