"""Registry behaviour with in-memory plugins (installed-distribution loading: test_plugin_loading)."""

import types
import warnings

import pytest

from bitlm_core.errors import PluginError, ResolutionError
from bitlm_core.hookspecs import hookimpl
from bitlm_core.plugins import PluginInfo, PluginManager, PluginWarning
from bitlm_core.records import CompressorSpec, SamplerSpec
from bitlm_core.registry import Registry, bind_options


class Codec:
    def __init__(self, level: int = 1, mode: str = "fast"):
        self.level, self.mode = level, mode


def module(name, **hooks):
    mod = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(mod, hook, hookimpl(fn))
    return mod


def manager_with(*modules):
    m = PluginManager()
    m.load_builtins()
    for mod in modules:
        m.register_module(PluginInfo(mod.__name__, f"dist-{mod.__name__}", "1.0", mod.__name__),
                          mod)
    return m


def test_records_carry_their_origin():
    reg = Registry(manager_with(module("zipper", bitlm_compressors=lambda: [
        CompressorSpec("zip", Codec, "test codec")])))
    rec = reg.resolve("compressor", "zip")
    assert (rec.plugin, rec.distribution) == ("zipper", "dist-zipper")
    assert reg.resolve("compressor", "identity").plugin == "core"


def test_duplicate_names_name_both_sources():
    a = module("alpha", bitlm_compressors=lambda: [CompressorSpec("zip", Codec)])
    b = module("beta", bitlm_compressors=lambda: [CompressorSpec("zip", Codec)])
    with pytest.raises(PluginError, match=r"compressor 'zip'.*'alpha'.*'beta'"):
        Registry(manager_with(a, b))


def test_a_hook_that_raises_drops_only_that_plugin():
    def boom():
        raise RuntimeError("kaput")

    good = module("good", bitlm_compressors=lambda: [CompressorSpec("zip", Codec)])
    bad = module("bad", bitlm_compressors=lambda: [CompressorSpec("half", Codec)],
                 bitlm_samplers=boom)
    with pytest.warns(PluginWarning, match="kaput"):
        reg = Registry(manager_with(good, bad))
    assert reg.names("compressor") == ["identity", "zip"]  # bad's 'half' was withdrawn
    assert reg.manager.infos["bad"].status == "failed"
    with pytest.raises(ResolutionError, match=r"bad: bitlm_samplers\(\) raised RuntimeError"):
        reg.resolve("compressor", "hlf", "compression.name")


def test_wrong_record_type_fails_the_plugin():
    bad = module("bad", bitlm_compressors=lambda: [SamplerSpec("x", Codec)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        reg = Registry(manager_with(bad))
    assert "expected CompressorSpec" in reg.manager.infos["bad"].error


def test_unknown_hook_name_fails_the_plugin():
    bad = module("typo", bitlm_compresors=lambda: [])
    with pytest.warns(PluginWarning, match="unknown hook"):
        m = manager_with(bad)
    assert m.infos["typo"].status == "failed"


def test_strict_mode_makes_failures_fatal(monkeypatch):
    monkeypatch.setenv("BITLM_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="unknown hook"):
        manager_with(module("typo", bitlm_compresors=lambda: []))


def test_bind_checks_names_required_and_simple_types():
    rec = CompressorSpec("zip", Codec)
    assert bind_options(rec, {"level": 3}).arguments == {"level": 3}
    with pytest.raises(ResolutionError, match="does not accept option 'levle'.*\n.*level"):
        bind_options(rec, {"levle": 3}, "compression")
    with pytest.raises(ResolutionError, match=r"compression\.options\.level should be int"):
        bind_options(rec, {"level": "high"}, "compression")
    with pytest.raises(ResolutionError, match="should be int, got bool"):
        bind_options(rec, {"level": True}, "compression")

    def needs(path: str):
        return path

    with pytest.raises(ResolutionError, match="missing required option.*path"):
        bind_options(CompressorSpec("n", needs), {})


def test_build_turns_factory_value_errors_into_spec_errors():
    def picky(level: int = 1):
        raise ValueError("level must be odd")

    reg = Registry(manager_with(module("p", bitlm_compressors=lambda: [
        CompressorSpec("picky", picky)])))
    with pytest.raises(ResolutionError, match="rejected its options: level must be odd"):
        reg.build("compressor", "picky", {}, "compression")


def test_conflicts_can_be_listed_instead_of_raised():
    a = module("alpha", bitlm_compressors=lambda: [CompressorSpec("zip", Codec)])
    b = module("beta", bitlm_compressors=lambda: [CompressorSpec("zip", Codec)])
    reg = Registry(manager_with(a, b), raise_conflicts=False)
    assert len(reg.conflicts) == 1 and "'alpha'" in reg.conflicts[0]
    assert reg.resolve("compressor", "zip").plugin == "alpha"  # the first one stays


def test_lazy_factories_are_imported_only_when_used():
    reg = Registry(manager_with(module("lazy", bitlm_compressors=lambda: [
        CompressorSpec("lazyzip", "fractions:Fraction", "a lazily imported factory"),
        CompressorSpec("broken", "no_such_module_xyz:Thing")])))
    rec = reg.resolve("compressor", "lazyzip")
    assert rec.lazy and str(reg.build("compressor", "lazyzip", {"numerator": 3})) == "3"
    with pytest.raises(PluginError, match=r"compressor 'broken' from plugin 'lazy'.*"
                                          r"ModuleNotFoundError"):
        reg.bind(reg.resolve("compressor", "broken"), {})


def test_a_factory_that_is_neither_callable_nor_an_import_path_fails_the_plugin():
    bad = module("bad", bitlm_compressors=lambda: [CompressorSpec("x", "not an import path")])
    with pytest.warns(PluginWarning, match="neither callable nor"):
        Registry(manager_with(bad))
