"""Plugin loading against fake *installed* distributions.

Each test writes ``<name>-<version>.dist-info/`` folders (METADATA + entry_points.txt) and the
plugin modules into ``tmp_path`` and puts ``tmp_path`` on ``sys.path``, so that
``importlib.metadata.entry_points(group="bitlm")`` finds them exactly as it finds a plugin
installed with pip. Every test builds a fresh manager and registry with
:func:`bitlm_core.plugins.load_plugins` / :class:`Registry`; the process-wide cached registry is
never touched.

Module and entry point names carry a per-test suffix, so nothing a test imports can leak into
another through ``sys.modules``. The plugins really installed in the environment (sdpa, rle...)
are seen as well; the assertions only concern the fake ones and the built-ins.
"""

from __future__ import annotations

import itertools
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from bitlm_core.errors import PluginError, ResolutionError
from bitlm_core.plugins import (BUILTIN_NAME, DISABLE_ENV, STRICT_ENV, PluginWarning,
                                load_plugins)
from bitlm_core.registry import LIST_HINT, Registry

_counter = itertools.count()

GOOD_PLUGIN = """
from bitlm_core.hookspecs import hookimpl
from bitlm_core.records import CompressorSpec


class {cls}:
    name = "{comp}"

    def __init__(self, level: int = 1):
        self.level = level

    def compress(self, bits):
        return bytes(bits)

    def decompress(self, data, max_bits=1 << 20):
        return data


@hookimpl
def bitlm_compressors():
    yield CompressorSpec("{comp}", {cls}, "a fake compressor for tests")
"""

# Provides a compressor, then raises in a hook collected later (samplers come after compressors).
RAISING_PLUGIN = """
from bitlm_core.hookspecs import hookimpl
from bitlm_core.records import CompressorSpec


@hookimpl
def bitlm_compressors():
    yield CompressorSpec("{comp}", dict, "would be dropped")


@hookimpl
def bitlm_samplers():
    raise RuntimeError("sampler hook exploded on purpose")
"""

WRONG_RECORD_PLUGIN = """
from bitlm_core.hookspecs import hookimpl
from bitlm_core.records import SamplerSpec


@hookimpl
def bitlm_compressors():
    # A sampler record from the compressor hook: the wrong type.
    yield SamplerSpec("{comp}", dict, "wrong kind of record")
"""

UNKNOWN_HOOK_PLUGIN = """
from bitlm_core.hookspecs import hookimpl


@hookimpl
def bitlm_tokenizers():
    return []
"""


@pytest.fixture
def uid(request) -> str:
    """A suffix unique to this test, for module and entry point names."""
    return f"{next(_counter)}_{abs(hash(request.node.nodeid)) % 10**6}"


@pytest.fixture
def site(tmp_path: Path, monkeypatch):
    """A fake site-packages folder on sys.path; returns ``install(dist, {ep: module}, files)``."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv(STRICT_ENV, raising=False)
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    before = set(sys.modules)

    def install(dist: str, entry_points: dict[str, str], modules: dict[str, str] | None = None,
                version: str = "0.1") -> Path:
        info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8")
        lines = ["[bitlm]"] + [f"{name} = {target}" for name, target in entry_points.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        for module, source in (modules or {}).items():
            (root / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        import importlib

        importlib.invalidate_caches()
        return info

    yield install
    for name in set(sys.modules) - before:
        if name.startswith("fakeplug_"):
            del sys.modules[name]


def build() -> Registry:
    """A fresh manager and registry, with PluginWarnings silenced (tests check them on purpose)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        return Registry(load_plugins())


def good(uid: str, comp: str | None = None) -> tuple[str, str]:
    module = f"fakeplug_good_{uid}"
    comp = comp or f"fakezip_{uid}"
    return module, GOOD_PLUGIN.format(cls="FakeCodec", comp=comp)


# -- a valid plugin ---------------------------------------------------------------------------
def test_valid_fake_plugin_is_active_and_resolvable(site, uid):
    module, source = good(uid)
    ep = f"fakegood_{uid}"
    site("fakeplug", {ep: module}, {module: source}, version="0.3")
    reg = build()

    info = reg.manager.infos[ep]
    assert info.status == "active" and info.error is None
    assert info.distribution == "fakeplug" and info.version == "0.3"
    assert info.module == module
    assert info.provides == {"compressor": [f"fakezip_{uid}"]}

    record = reg.resolve("compressor", f"fakezip_{uid}", "compression.name")
    assert record.plugin == ep
    assert record.distribution == "fakeplug"
    assert ep in record.origin and "fakeplug" in record.origin
    codec = reg.build("compressor", f"fakezip_{uid}", {"level": 3}, "compression")
    assert codec.level == 3
    # The built-ins are still there, registered first.
    assert list(reg.manager.infos)[0] == BUILTIN_NAME
    assert reg.resolve("compressor", "identity").plugin == BUILTIN_NAME


def test_valid_fake_plugin_resolves_from_a_spec(site, uid):
    from bitlm_core.components import resolve_spec
    from bitlm_core.spec import validate_spec

    module, source = good(uid)
    site("fakeplug", {f"fakegood_{uid}": module}, {module: source})
    reg = build()
    spec = validate_spec({"compression": {"name": f"fakezip_{uid}", "options": {"level": 2}}})
    resolved = resolve_spec(spec, reg)
    assert resolved["compression"].record.plugin == f"fakegood_{uid}"
    assert resolved["compression"].options == {"level": 2}

    bad = validate_spec({"compression": {"name": f"fakezip_{uid}", "options": {"levle": 2}}})
    with pytest.raises(ResolutionError) as exc:
        resolve_spec(bad, reg)
    msg = str(exc.value)
    assert "compression.options.levle" in msg and "did you mean: level" in msg


# -- failures are isolated ---------------------------------------------------------------------
def test_missing_module_fails_without_breaking_others(site, uid):
    module, source = good(uid)
    missing = f"fakeplug_nowhere_{uid}.plugin"
    site("fakeplug", {f"fakegood_{uid}": module, f"fakebroken_{uid}": missing},
         {module: source})

    with pytest.warns(PluginWarning, match=f"fakebroken_{uid}.*ModuleNotFoundError"):
        reg = Registry(load_plugins())

    broken = reg.manager.infos[f"fakebroken_{uid}"]
    assert broken.status == "failed"
    assert "ModuleNotFoundError" in broken.error and f"fakeplug_nowhere_{uid}" in broken.error
    assert broken.distribution == "fakeplug"
    assert broken in reg.manager.failed()
    # The other fake plugin and the built-ins still work.
    assert reg.manager.infos[f"fakegood_{uid}"].status == "active"
    assert reg.manager.infos[BUILTIN_NAME].status == "active"
    assert reg.resolve("compressor", f"fakezip_{uid}").plugin == f"fakegood_{uid}"
    assert reg.resolve("encoder", "parity9").plugin == BUILTIN_NAME


def test_module_raising_on_import_fails(site, uid):
    module = f"fakeplug_importboom_{uid}"
    site("fakeplug", {f"fakeboom_{uid}": module},
         {module: "raise ImportError('needs libfoo, which is not installed')\n"})
    with pytest.warns(PluginWarning, match="needs libfoo"):
        reg = Registry(load_plugins())
    assert reg.manager.infos[f"fakeboom_{uid}"].status == "failed"


def test_hook_that_raises_fails_and_its_records_are_dropped(site, uid):
    module = f"fakeplug_raising_{uid}"
    comp = f"halfzip_{uid}"
    site("fakeplug", {f"fakeraise_{uid}": module},
         {module: RAISING_PLUGIN.format(comp=comp)})

    with pytest.warns(PluginWarning, match="sampler hook exploded on purpose"):
        reg = Registry(load_plugins())

    info = reg.manager.infos[f"fakeraise_{uid}"]
    assert info.status == "failed"
    assert "bitlm_samplers" in info.error and "RuntimeError" in info.error
    # The compressor it yielded before its sampler hook raised is gone.
    assert reg.get("compressor", comp) is None
    assert all(r.plugin != f"fakeraise_{uid}" for recs in reg.records.values()
               for r in recs.values())
    with pytest.raises(ResolutionError):
        reg.resolve("compressor", comp)
    # Built-ins are untouched.
    assert reg.get("sampler", "autoregressive") is not None


def test_hook_yielding_wrong_record_type_fails(site, uid):
    module = f"fakeplug_wrong_{uid}"
    site("fakeplug", {f"fakewrong_{uid}": module},
         {module: WRONG_RECORD_PLUGIN.format(comp=f"wrong_{uid}")})

    with pytest.warns(PluginWarning, match="SamplerSpec.*expected CompressorSpec"):
        reg = Registry(load_plugins())

    info = reg.manager.infos[f"fakewrong_{uid}"]
    assert info.status == "failed"
    assert "SamplerSpec" in info.error and "CompressorSpec" in info.error
    assert reg.get("compressor", f"wrong_{uid}") is None
    assert reg.get("sampler", f"wrong_{uid}") is None


def test_unknown_hook_fails(site, uid):
    module = f"fakeplug_unknownhook_{uid}"
    site("fakeplug", {f"fakeunknown_{uid}": module}, {module: UNKNOWN_HOOK_PLUGIN})
    with pytest.warns(PluginWarning, match="bitlm_tokenizers"):
        reg = Registry(load_plugins())
    info = reg.manager.infos[f"fakeunknown_{uid}"]
    assert info.status == "failed" and "bitlm_tokenizers" in info.error


def test_same_component_name_from_two_plugins_names_both(site, uid):
    comp = f"twinzip_{uid}"
    mod_a, src_a = f"fakeplug_twin_a_{uid}", GOOD_PLUGIN.format(cls="A", comp=comp)
    mod_b, src_b = f"fakeplug_twin_b_{uid}", GOOD_PLUGIN.format(cls="B", comp=comp)
    site("fakeplug-a", {f"twin_a_{uid}": mod_a}, {mod_a: src_a})
    site("fakeplug-b", {f"twin_b_{uid}": mod_b}, {mod_b: src_b})

    with pytest.raises(PluginError) as exc:
        build()
    msg = str(exc.value)
    assert f"'{comp}'" in msg and "compressor" in msg
    assert f"twin_a_{uid}" in msg and f"twin_b_{uid}" in msg
    assert "fakeplug-a" in msg and "fakeplug-b" in msg
    assert DISABLE_ENV in msg  # tells the user how to get out of it
    assert f"{DISABLE_ENV}=twin_b_{uid}" in msg  # by disabling the newcomer, not the first


def test_plugin_reusing_a_builtin_name_names_core(site, uid):
    module, source = good(uid, comp="identity")
    site("fakeplug", {f"fakeclash_{uid}": module}, {module: source})
    with pytest.raises(PluginError) as exc:
        build()
    msg = str(exc.value)
    assert "'identity'" in msg and f"'{BUILTIN_NAME}'" in msg and f"fakeclash_{uid}" in msg


# -- environment switches ----------------------------------------------------------------------
def test_strict_mode_makes_failures_fatal(site, uid, monkeypatch):
    site("fakeplug", {f"fakebroken_{uid}": f"fakeplug_nowhere_{uid}"})
    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(PluginError) as exc:
        load_plugins()
    msg = str(exc.value)
    assert f"fakebroken_{uid}" in msg and "ModuleNotFoundError" in msg
    assert STRICT_ENV in msg


def test_strict_mode_covers_hook_failures(site, uid, monkeypatch):
    module = f"fakeplug_raising_{uid}"
    site("fakeplug", {f"fakeraise_{uid}": module},
         {module: RAISING_PLUGIN.format(comp=f"halfzip_{uid}")})
    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(PluginError, match="sampler hook exploded on purpose"):
        Registry(load_plugins())


@pytest.mark.parametrize("value", ["1", "all"])
def test_disable_all_external_plugins(site, uid, monkeypatch, value):
    module, source = good(uid)
    site("fakeplug", {f"fakegood_{uid}": module, f"fakebroken_{uid}": f"fakeplug_nowhere_{uid}"},
         {module: source})
    monkeypatch.setenv(DISABLE_ENV, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)  # nothing is even tried
        reg = Registry(load_plugins())
    for name in (f"fakegood_{uid}", f"fakebroken_{uid}"):
        info = reg.manager.infos[name]
        assert info.status == "disabled" and DISABLE_ENV in (info.error or "")
    assert all(i.status == "disabled" for n, i in reg.manager.infos.items() if n != BUILTIN_NAME)
    assert reg.manager.infos[BUILTIN_NAME].status == "active"
    assert reg.get("compressor", f"fakezip_{uid}") is None
    assert module not in sys.modules  # a disabled plugin is never imported
    assert reg.get("compressor", "identity") is not None


def test_disable_plugins_by_name(site, uid, monkeypatch):
    module, source = good(uid)
    site("fakeplug", {f"fakegood_{uid}": module, f"fakebroken_{uid}": f"fakeplug_nowhere_{uid}"},
         {module: source})
    monkeypatch.setenv(DISABLE_ENV, f" fakebroken_{uid} , someotherplugin")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        reg = Registry(load_plugins())
    assert reg.manager.infos[f"fakebroken_{uid}"].status == "disabled"
    assert reg.manager.infos[f"fakegood_{uid}"].status == "active"
    assert reg.resolve("compressor", f"fakezip_{uid}").plugin == f"fakegood_{uid}"


def test_disabling_a_duplicate_resolves_the_clash(site, uid, monkeypatch):
    comp = f"twinzip_{uid}"
    mod_a, src_a = f"fakeplug_twin_a_{uid}", GOOD_PLUGIN.format(cls="A", comp=comp)
    mod_b, src_b = f"fakeplug_twin_b_{uid}", GOOD_PLUGIN.format(cls="B", comp=comp)
    site("fakeplug-a", {f"twin_a_{uid}": mod_a}, {mod_a: src_a})
    site("fakeplug-b", {f"twin_b_{uid}": mod_b}, {mod_b: src_b})
    monkeypatch.setenv(DISABLE_ENV, f"twin_b_{uid}")
    reg = build()
    assert reg.resolve("compressor", comp).plugin == f"twin_a_{uid}"


# -- resolution errors ---------------------------------------------------------------------------
def test_unknown_name_error_reads_like_a_compiler(site, uid):
    module, source = good(uid, comp=f"fakezip_{uid}")
    site("fakeplug", {f"fakegood_{uid}": module, f"fakebroken_{uid}": f"fakeplug_nowhere_{uid}"},
         {module: source})
    reg = build()
    typo = f"fakezp_{uid}"
    with pytest.raises(ResolutionError) as exc:
        reg.resolve("compressor", typo, "compression.name")
    msg = str(exc.value)
    assert f"unknown compressor '{typo}' at compression.name" in msg
    assert f"did you mean: fakezip_{uid}" in msg
    available = next(line for line in msg.splitlines() if "available compressors:" in line)
    assert "identity" in available and f"fakezip_{uid}" in available
    assert "failed to load" in msg
    assert f"fakebroken_{uid}" in msg and "ModuleNotFoundError" in msg
    assert LIST_HINT in msg and "bitlm plugins list" in msg


def test_unknown_name_error_lists_disabled_plugins(site, uid, monkeypatch):
    module, source = good(uid)
    site("fakeplug", {f"fakegood_{uid}": module}, {module: source})
    monkeypatch.setenv(DISABLE_ENV, f"fakegood_{uid}")
    reg = build()
    with pytest.raises(ResolutionError) as exc:
        reg.resolve("compressor", f"fakezip_{uid}", "compression.name")
    msg = str(exc.value)
    assert "disabled plugins" in msg and f"fakegood_{uid}" in msg
    assert "bitlm plugins list" in msg


def test_failed_plugin_provides_nothing(site, uid):
    module = f"fakeplug_raising_{uid}"
    site("fakeplug", {f"fakeraise_{uid}": module},
         {module: RAISING_PLUGIN.format(comp=f"halfzip_{uid}")})
    reg = build()
    assert reg.manager.infos[f"fakeraise_{uid}"].provides == {}


BACKENDS_PLUGIN = """
from bitlm_core.builtins.attention import ReferenceAttention
from bitlm_core.hookspecs import hookimpl
from bitlm_core.records import AttentionBackendSpec


class Fast(ReferenceAttention):
    name = "fast_{uid}"


class Unchunked(ReferenceAttention):
    name = "unchunked_{uid}"

    def __init__(self):  # takes no chunking options
        super().__init__()


@hookimpl
def bitlm_attention_backends():
    yield AttentionBackendSpec("fast_{uid}", Fast, "outranks every real backend", priority=1000)
    yield AttentionBackendSpec("hidden_{uid}", Fast, "never picked by auto", priority=None)
    yield AttentionBackendSpec("unchunked_{uid}", Unchunked, "no chunk options", priority=2000)
"""


def test_auto_attention_picks_the_highest_priority_that_accepts_the_options(site, uid,
                                                                           monkeypatch):
    import bitlm_core.registry as registry_module
    from bitlm_core.builtins.attention import auto_attention

    module = f"fakeplug_backends_{uid}"
    site("fakeplug-backends", {f"fakebackends_{uid}": module},
         {module: BACKENDS_PLUGIN.replace("{uid}", uid)})
    monkeypatch.setattr(registry_module, "_REGISTRY", build())
    assert auto_attention().name == f"unchunked_{uid}"  # the highest priority
    chunked = auto_attention(chunk_size=8, overlap=2)  # it takes no chunking: the next one
    assert chunked.name == f"fast_{uid}" and chunked.chunk_size == 8


def test_auto_never_picks_a_backend_that_declares_no_priority(site, uid, monkeypatch):
    import bitlm_core.registry as registry_module
    from bitlm_core.builtins.attention import auto_attention

    module = f"fakeplug_quiet_{uid}"
    site("fakeplug-quiet", {f"fakequiet_{uid}": module}, {module: (
        "from bitlm_core.builtins.attention import ReferenceAttention\n"
        "from bitlm_core.hookspecs import hookimpl\n"
        "from bitlm_core.records import AttentionBackendSpec\n\n\n"
        "class Quiet(ReferenceAttention):\n    name = 'aaa_quiet'\n\n\n"
        "@hookimpl\ndef bitlm_attention_backends():\n"
        "    yield AttentionBackendSpec('aaa_quiet', Quiet, 'sorts first, declares nothing')\n")})
    monkeypatch.setenv(DISABLE_ENV, "attention_sdpa")  # reference is then the only rival
    registry = build()
    monkeypatch.setattr(registry_module, "_REGISTRY", registry)
    assert registry.get("attention", "aaa_quiet") is not None
    assert registry.get("attention", "sdpa") is None
    assert auto_attention().name == "reference"


QUANTIZERS_PLUGIN = """
from bitlm_core.builtins.quantizers import Int8Rowwise
from bitlm_core.hookspecs import hookimpl
from bitlm_core.records import QuantizerSpec


class Halfway:
    name = "halfway"

    def quantize(self, model):
        return Int8Rowwise().quantize(model)

    def dequantize(self, tensors, model, source):
        return Int8Rowwise().dequantize(tensors, model, source)


class Broken(Int8Rowwise):
    name = "broken"

    def dequantize(self, tensors, model, source):
        return {"oops": tensors["no such tensor"]}


@hookimpl
def bitlm_quantizers():
    yield QuantizerSpec("halfway", Halfway, "no prepare")
    yield QuantizerSpec("broken", Broken, "fails to read back")
"""


def test_a_plugin_quantizer_is_checked_and_its_failures_are_named(site, uid, monkeypatch,
                                                                  tmp_path, tiny_spec):
    import bitlm_core.registry as registry_module
    from bitlm_core.app.loading import load_run
    from bitlm_core.app.quantize import quantize_run
    from bitlm_core.app.run import execute
    from bitlm_core.spec import load_spec

    module = f"fakeplug_quantizers_{uid}"
    site("fakeplug-quantizers", {f"fakequantizers_{uid}": module}, {module: QUANTIZERS_PLUGIN})
    monkeypatch.setattr(registry_module, "_REGISTRY", build())
    execute(load_spec(tiny_spec(steps=2, model={"d_model": 64})), tmp_path / "run",
            log=lambda m: None)
    with pytest.raises(PluginError, match="quantizer 'halfway' from .*has no prepare"):
        quantize_run(tmp_path / "run", tmp_path / "h", scheme="halfway")
    quantize_run(tmp_path / "run", tmp_path / "b", scheme="broken")
    with pytest.raises(PluginError, match="quantizer 'broken' from .*failed to dequantize"):
        load_run(tmp_path / "b")
