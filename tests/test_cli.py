"""Every ``bitlm`` command, end to end.

Commands that train, load a model, kill a process or need a different environment run in a
subprocess (``python -m bitlm_core.cli``); the many bad-spec and plugin-listing variants run the
Typer app in-process (``invoke``), which is much faster and checks the same exit status and
streams. One tiny run is trained once per module (``trained``) and shared by the tests that only
use its checkpoint (resume, eval, sample); a test that changes a run folder works on a copy.

Bad input must give exit status 2, one ``error:`` message on stderr, nothing on stdout and no
traceback; ``--debug`` brings the traceback back. Independent subprocesses are started together
(``cli_parallel``) so that their torch start-up overlaps on this 2-core machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

_conftest = importlib.util.spec_from_file_location("_bitlm_tests_conftest",
                                                   Path(__file__).with_name("conftest.py"))
conftest = importlib.util.module_from_spec(_conftest)
_conftest.loader.exec_module(conftest)

BPB = re.compile(r"held-out bits per byte: ([0-9.]+)")
RESUMED = re.compile(r"resuming from step-\d+ \(step (\d+) of (\d+)\)")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("BITLM_DEBUG", "BITLM_STRICT_PLUGINS", "BITLM_DISABLE_PLUGINS")}
    env.update({"COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb", "PYTHONIOENCODING": "utf-8"})
    env.update(extra or {})
    return env


def _cmd(args) -> list[str]:
    return [sys.executable, "-m", "bitlm_core.cli", *map(str, args)]


def cli(*args, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(args), capture_output=True, text=True, encoding="utf-8",
                          errors="replace", cwd=cwd, env=_env(env), timeout=timeout)


def cli_parallel(*arg_lists, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """Run several independent commands at once (torch start-up dominates; overlap it)."""
    procs = [subprocess.Popen(_cmd(a), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              encoding="utf-8", errors="replace", cwd=cwd, env=_env(env))
             for a in arg_lists]
    results = []
    try:
        for args, p in zip(arg_lists, procs):
            out, err = p.communicate(timeout=180)
            results.append(subprocess.CompletedProcess(_cmd(args), p.returncode, out, err))
    finally:
        for p in procs:  # only on a timeout: do not leave our own children behind
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.fixture
def invoke(monkeypatch):
    """Run the Typer app in this process (for commands that need no subprocess)."""
    from typer.testing import CliRunner

    import bitlm_core.cli as cli_module

    monkeypatch.setitem(cli_module._state, "debug", False)
    monkeypatch.delenv("BITLM_DEBUG", raising=False)

    def run(*args):
        result = CliRunner().invoke(cli_module.app, [str(a) for a in args])
        # Anything but a clean exit (SystemExit) is an exception the CLI let through.
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            result.exception)
        return result

    return run


def assert_user_error(proc, *needles: str, warnings_first: bool = False) -> str:
    """Exit 2, exactly one clear message on stderr, nothing on stdout, no traceback.

    ``proc`` is a CompletedProcess or a CliRunner result. ``warnings_first`` allows plugin
    warnings on stderr before the error message.
    """
    code = proc.returncode if isinstance(proc, subprocess.CompletedProcess) else proc.exit_code
    both = proc.stdout + proc.stderr
    assert code == 2, both
    assert "Traceback" not in both, both
    assert proc.stdout.strip() == "", proc.stdout
    if not warnings_first:
        assert proc.stderr.lstrip().startswith("error:"), proc.stderr
    assert proc.stderr.count("error:") == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in:\n{proc.stderr}"
    return proc.stderr


def write_spec(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny framed run, trained once for the module. Tests may resume it (which rewrites
    summary and samples) but must not change its spec or checkpoints."""
    root = tmp_path_factory.mktemp("trained")
    corpus = root / "tiny.txt"
    corpus.write_text(conftest.TINY_TEXT, encoding="utf-8")
    spec = write_spec(root / "spec.yaml", conftest.tiny_spec_dict(corpus))
    run_dir = root / "run"
    proc = cli("run", spec, "--out", run_dir, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return SimpleNamespace(root=root, corpus=corpus, spec=spec, run_dir=run_dir, proc=proc)


@pytest.fixture
def broken_plugin_env(tmp_path: Path) -> dict[str, str]:
    """PYTHONPATH with a fake installed distribution whose entry point names no module."""
    site = tmp_path / "site"
    info = site / "fakebroken-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakebroken\nVersion: 0.1\n",
                                   encoding="utf-8")
    (info / "entry_points.txt").write_text(
        "[bitlm]\nfakebroken = fakebroken_no_such_module.plugin\n", encoding="utf-8")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


# -- run ------------------------------------------------------------------------------------
def test_run_trains_evaluates_samples_and_writes_run_folder(trained):
    proc, run_dir = trained.proc, trained.run_dir
    assert "Traceback" not in proc.stdout + proc.stderr
    match = BPB.search(proc.stdout)
    assert match, proc.stdout
    bpb = float(match.group(1))
    assert 0 < bpb < 12
    lines = proc.stdout.splitlines()
    i = lines.index("--- sample 0 ---")
    assert lines[i + 1].startswith("the ")  # the spec's prompt, then the sample
    assert f"run folder: {run_dir}" in proc.stdout

    for name in ("spec.yaml", "metrics.jsonl", "samples.txt", "summary.json"):
        assert (run_dir / name).is_file(), name
    latest = run_dir / "checkpoints" / "latest"
    assert latest.is_file()
    ckpt = run_dir / "checkpoints" / latest.read_text().strip()
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "state.json").is_file()
    assert json.loads((ckpt / "state.json").read_text())["step"] == 6

    saved = yaml.safe_load((run_dir / "spec.yaml").read_text())
    assert saved["train"]["steps"] == 6
    assert saved["attention"]["name"] == "reference"  # defaults are filled in: fully resolved
    assert saved["data"]["encoder"]["name"] == "parity9"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6
    assert summary["held_out_bits_per_byte"] == pytest.approx(bpb, abs=1e-4)
    assert summary["samples"] and summary["samples"][0].startswith("the ")
    records = [json.loads(line) for line in
               (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert records and any(r.get("final") for r in records)
    assert "the " in (run_dir / "samples.txt").read_text(encoding="utf-8")


def test_run_again_resumes_without_retraining(trained):
    model_file = trained.run_dir / "checkpoints" / "step-000006" / "model.safetensors"
    before = model_file.stat().st_mtime_ns
    proc = cli("run", trained.spec, "--out", trained.run_dir, cwd=trained.root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = RESUMED.search(proc.stderr)
    assert match and match.groups() == ("6", "6"), proc.stderr
    assert "train loss" not in proc.stderr  # no training step was logged
    assert model_file.stat().st_mtime_ns == before  # no new checkpoint either
    assert BPB.search(proc.stdout).group(1) == BPB.search(trained.proc.stdout).group(1)


def test_run_into_folder_of_another_spec_errors(trained):
    spec_text = (trained.run_dir / "spec.yaml").read_text()
    proc = cli("run", trained.spec, "--out", trained.run_dir, "-o", "train.steps=7",
               cwd=trained.root)
    assert_user_error(proc, "different spec", "train.steps", "--restart", "--out")
    assert (trained.run_dir / "spec.yaml").read_text() == spec_text


def test_run_into_folder_that_is_not_a_run_errors(trained, tmp_path):
    folder = tmp_path / "busy"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    proc = cli("run", trained.spec, "--out", folder, cwd=tmp_path)
    assert_user_error(proc, "not a bitlm run folder", "--out")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_restart_discards_the_old_run(trained, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(trained.run_dir, run_dir)
    proc = cli("run", trained.spec, "--out", run_dir, "--restart", "-o", "train.steps=4",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming" not in proc.stderr
    assert "train loss" in proc.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4
    assert yaml.safe_load((run_dir / "spec.yaml").read_text())["train"]["steps"] == 4
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert steps[-1] == "step-000004" and "step-000006" not in steps


def test_restart_never_deletes_a_folder_that_is_not_a_run(tiny_spec, tmp_path):
    from bitlm_core.components import complete_spec
    from bitlm_core.errors import CheckpointError
    from bitlm_core.spec import load_spec
    from bitlm_core.store.rundir import prepare_run_dir

    folder = tmp_path / "my-documents"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    try:
        with pytest.raises(CheckpointError, match="not a bitlm run folder"):
            prepare_run_dir(complete_spec(load_spec(tiny_spec())), folder, restart=True)
    finally:
        assert (folder / "notes.txt").is_file(), "--restart deleted a folder it did not own"


def test_run_without_spec_uses_the_quickstart(tmp_path):
    proc = cli("run", "--out", tmp_path / "qs", "-q",
               "-o", "train.steps=1", "-o", "train.warmup_steps=0", "-o", "model.d_model=16",
               "-o", "model.n_layers=1", "-o", "model.n_heads=1", "-o", "data.seq_len=16",
               "-o", "train.batch_size=2", "-o", "train.eval_batches=1", "-o", "sample.bytes=4",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert BPB.search(proc.stdout)
    saved = yaml.safe_load((tmp_path / "qs" / "spec.yaml").read_text())
    assert saved["data"]["corpus"]["name"] == "quickstart"
    assert saved["model"]["d_model"] == 16  # the override is what was saved
    # completed: the objective's sampler, and `metrics: all` as the metrics installed
    assert saved["sample"]["sampler"] == {"name": "autoregressive",
                                          "options": {"temperature": 0.8}}
    from bitlm_core.registry import get_registry

    installed = get_registry().names("telemetry")
    assert [m["name"] for m in saved["telemetry"]["metrics"]] == installed
    records = [json.loads(line) for line in (tmp_path / "qs" / "metrics.jsonl").open()]
    telemetry = [r for r in records if r["split"] == "telemetry"]
    if {"negentropy", "lz_complexity", "symbiosis"} <= set(installed):  # bitlm-telemetry-kcs
        assert len(telemetry) == 1 and all(
            f"telemetry/{split}/{m}" in telemetry[0] for split in ("train", "val")
            for m in ("negentropy", "lz_complexity", "symbiosis"))
    else:  # core alone: nothing to log
        assert telemetry == [] and installed == []


@pytest.mark.needs("objective:diffusion", "sampler:diffusion")
def test_the_quickstart_trains_and_samples_with_the_diffusion_objective(tmp_path):
    proc = cli("run", "-o", "objective.name=diffusion", "-o", "train.steps=20",
               "--out", tmp_path / "qs", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"bound on held-out bits per byte: [0-9.]+ \(49,920 bytes, 20 steps\)",
                     proc.stdout), proc.stdout
    sample = proc.stdout.split("--- sample 0 ---\n", 1)[1]
    assert sample.startswith("It was ") and len(sample) > len("It was ") + 100
    saved = yaml.safe_load((tmp_path / "qs" / "spec.yaml").read_text())
    assert saved["sample"]["sampler"] == {"name": "diffusion", "options": {"temperature": 0.8}}


def test_kill_and_resume(tiny_spec, tmp_path):
    spec = tiny_spec(steps=60, train={"checkpoint_every": 2, "eval_every": 1000})
    run_dir = tmp_path / "killed"
    args = _cmd(["run", spec, "--out", run_dir, "-q"])
    latest = run_dir / "checkpoints" / "latest"
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             cwd=tmp_path, env=_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not latest.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert latest.exists(), "no checkpoint was written"
        assert first.poll() is None, "the run finished before it could be killed"
        os.kill(first.pid, signal.SIGKILL)
    finally:
        if first.poll() is None:
            first.kill()
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()

    proc = cli("run", spec, "--out", run_dir, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = RESUMED.search(proc.stderr)
    assert match, proc.stderr
    step, total = map(int, match.groups())
    assert 0 < step < total == 60
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 60
    assert BPB.search(proc.stdout)


# -- validate -------------------------------------------------------------------------------
def test_validate_valid_spec(tiny_spec):
    proc = cli("validate", tiny_spec())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is valid" in proc.stdout
    for slot, name in (("data.encoder", "parity9"), ("attention", "reference"),
                       ("sample.sampler", "autoregressive"), ("data.corpus", "file")):
        assert re.search(rf"{re.escape(slot)}\s.*\b{name}\b", proc.stdout), proc.stdout


def test_validate_missing_file_end_to_end(tmp_path):
    # In a real process: exit 2, one message, and no traceback anywhere.
    assert_user_error(cli("validate", tmp_path / "nope.yaml"), "spec file not found",
                      "nope.yaml")


BAD_SPECS = {
    "missing file": (None, ["spec file not found", "nope.yaml"]),
    "invalid yaml": ("data: [unclosed\nmodel: {d_model: 8\n", ["not valid YAML", "line"]),
    "not a mapping": ("- just\n- a list\n", ["must be a YAML mapping"]),
    "unknown section": ({"modle": {"d_model": 8}}, ["modle: unknown key", "did you mean 'model'"]),
    "unknown key": ({"train": {"stpes": 5}},
                    ["train.stpes: unknown key", "did you mean 'train.steps'"]),
    "wrong type": ({"train": {"steps": "many"}}, ["train.steps", "integer", "'many'"]),
    "unknown component": ({"attention": {"name": "refrence"}},
                          ["unknown attention 'refrence' at attention.name",
                           "did you mean: reference", "available attention backends",
                           "bitlm plugins list"]),
    "unaccepted option": ({"sample": {"sampler": {"name": "autoregressive",
                                                  "options": {"temprature": 0.5}}}},
                          ["does not accept option 'temprature'",
                           "sample.sampler.options.temprature", "did you mean: temperature"]),
    "wrongly typed option": ({"sample": {"sampler": {"name": "autoregressive",
                                                     "options": {"temperature": "hot"}}}},
                             ["sample.sampler.options.temperature", "float"]),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_validate_bad_input(case, tiny_spec, tmp_path, invoke):
    content, needles = BAD_SPECS[case]
    if content is None:
        path = tmp_path / "nope.yaml"
    elif isinstance(content, str):
        path = tmp_path / "bad.yaml"
        path.write_text(content, encoding="utf-8")
    else:
        path = tiny_spec(**content)
    assert_user_error(invoke("validate", path), *needles)


def test_bad_override_is_a_user_error(tiny_spec, invoke):
    assert_user_error(invoke("validate", tiny_spec(), "-o", "train.stpes=3"),
                      "did you mean 'train.steps'")
    assert_user_error(invoke("validate", tiny_spec(), "-o", "train.steps"), "key.path=value")


def test_debug_shows_the_traceback(tmp_path):
    proc = cli("--debug", "validate", tmp_path / "nope.yaml")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "SpecError" in proc.stderr
    assert "spec file not found" in proc.stderr


# -- plugins --------------------------------------------------------------------------------
def test_plugins_list_json():
    proc = cli("plugins", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert isinstance(data["plugins"], list)
    core = next(p for p in data["plugins"] if p["name"] == "core")
    assert core["status"] == "active" and core["distribution"] == "bitlm-core"
    assert "parity9" in core["provides"]["encoder"]
    assert "autoregressive" in core["provides"]["sampler"]
    for p in data["plugins"]:
        assert p["status"] in ("active", "disabled", "failed")
        assert {"name", "distribution", "version", "module", "error", "provides"} <= set(p)


def test_plugins_list(invoke):
    result = invoke("plugins", "list")
    assert result.exit_code == 0, result.stderr
    assert "bitlm plugins" in result.stdout
    assert "core" in result.stdout and "active" in result.stdout and "parity9" in result.stdout


def test_plugins_list_all(invoke):
    text = invoke("plugins", "list", "--all")
    assert text.exit_code == 0, text.stderr
    assert "components" in text.stdout
    assert "autoregressive" in text.stdout and "temperature" in text.stdout  # with options
    data = json.loads(invoke("plugins", "list", "--all", "--json").stdout)
    assert any(p["name"] == "core" for p in data["plugins"])
    names = {(c["kind"], c["name"]) for c in data["components"]}
    assert {("encoder", "parity9"), ("attention", "reference"),
            ("compressor", "identity")} <= names


@pytest.mark.parametrize("kind", ["attention", "backends"])
def test_plugins_show(kind, invoke):
    result = invoke("plugins", "show", kind)
    assert result.exit_code == 0, result.stderr
    assert "reference" in result.stdout and "core" in result.stdout
    assert "parity9" not in result.stdout  # only the kind asked for


def test_plugins_show_unknown_kind(invoke):
    proc = cli("plugins", "show", "nonsense")  # one in a real process, for the traceback check
    msg = assert_user_error(proc, "unknown component kind", "'nonsense'")
    for kind in ("encoder", "attention", "compressor", "sampler"):
        assert kind in msg
    assert_user_error(invoke("plugins", "show", "attension"), "did you mean", "attention")


def test_broken_plugin_is_listed_as_failed(broken_plugin_env):
    proc, table = cli_parallel(["plugins", "list", "--json"], ["plugins", "list"],
                               env=broken_plugin_env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    plugins = {p["name"]: p for p in json.loads(proc.stdout)["plugins"]}
    assert plugins["fakebroken"]["status"] == "failed"
    assert plugins["fakebroken"]["distribution"] == "fakebroken"
    assert "ModuleNotFoundError" in plugins["fakebroken"]["error"]
    assert plugins["core"]["status"] == "active"

    assert table.returncode == 0
    assert re.search(r"fakebroken.*failed.*ModuleNotFoundError", table.stdout), table.stdout


def test_unknown_name_error_mentions_the_broken_plugin(broken_plugin_env, tiny_spec):
    proc = cli("validate", tiny_spec(compression={"name": "nosuchcodec"}), env=broken_plugin_env)
    msg = assert_user_error(proc, "unknown compressor 'nosuchcodec' at compression.name",
                            "failed to load", "fakebroken", warnings_first=True)
    assert "available compressors" in msg and "identity" in msg


def test_an_unknown_command_mentions_the_plugins_that_failed(broken_plugin_env):
    unknown, helped = cli_parallel(["hello", "moon"], ["--help"], env=broken_plugin_env)
    assert unknown.returncode == 2
    assert "No such command 'hello'" in unknown.stderr
    assert "plugins that failed to load (one may provide it): fakebroken" in unknown.stderr
    assert helped.returncode == 0 and "1 plugin(s) failed to load (fakebroken)" in helped.stderr


def test_run_works_with_a_broken_plugin_installed(broken_plugin_env, tiny_spec, tmp_path):
    proc = cli("run", tiny_spec(steps=2), "--out", tmp_path / "run", env=broken_plugin_env,
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert BPB.search(proc.stdout)
    assert "fakebroken" in proc.stderr  # the failure is reported...
    assert "Traceback" not in proc.stderr  # ...as a warning, not a crash
    assert (tmp_path / "run" / "summary.json").is_file()


@pytest.mark.needs("objective:diffusion", "sampler:diffusion", "telemetry:lz_complexity",
                   "compressor:rle")
def test_validate_builds_every_component_as_run_would(tmp_path, tiny_spec, invoke):
    cases = {  # each passed validate while `bitlm run` refused it
        "sampler": ({"objective": {"name": "diffusion"},
                     "sample": {"sampler": {"name": "autoregressive"}}}, "disagree"),
        "weight": ({"telemetry": {"metrics": [{"name": "lz_complexity",
                                               "options": {"weight": 0.1}}]}},
                   "not differentiable"),
        "factory": ({"compression": {"name": "rle", "options": {"max_bits": -1}}},
                    "compressor 'rle' at compression rejected its options"),
    }
    for case, (sections, needle) in cases.items():
        assert_user_error(invoke("validate", tiny_spec(**sections)), needle)


def test_strict_mode_makes_a_broken_plugin_an_error_and_keeps_bitlms_commands(
        broken_plugin_env, tmp_path):
    env = {**broken_plugin_env, "BITLM_STRICT_PLUGINS": "1"}
    (tmp_path / "in.txt").write_bytes(b"abc" * 10)
    helped, stats = cli_parallel(["--help"], ["codec", "stats", tmp_path / "in.txt"], env=env)
    assert helped.returncode == 0 and "codec" in helped.stdout and "quantize" in helped.stdout
    assert_user_error(stats, "fakebroken", "unset BITLM_STRICT_PLUGINS")


TORCH_SPY = """
import sys, traceback

class _Spy:  # records who imports torch first
    culprit = None

    def find_spec(self, name, path=None, target=None):
        if name == "torch" and _Spy.culprit is None:
            _Spy.culprit = "".join(traceback.format_stack(limit=14)[:-1])
        return None

sys.meta_path.insert(0, _Spy())
sys.argv = ["bitlm", *ARGV]
from bitlm_core.cli import main
try:
    main()
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
print("TORCH_IMPORTED", "torch" in sys.modules)
print(_Spy.culprit or "")
"""


@pytest.mark.parametrize("argv,env", [
    (["--help"], {}),
    (["plugins", "list"], {"BITLM_DISABLE_PLUGINS": "all"}),  # core alone
    (["plugins", "list", "--json"], {}),  # with every installed plugin
    (["codec", "--help"], {}),
    (["quantize", "--help"], {}),
], ids=["help", "plugins-list-core", "plugins-list-installed", "codec-help", "quantize-help"])
def test_fast_commands_never_import_torch(argv, env):
    code = TORCH_SPY.replace("ARGV", repr(argv))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(env), timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    marker = next(line for line in proc.stdout.splitlines() if line.startswith("TORCH_IMPORTED"))
    culprit = proc.stdout.split(marker, 1)[1]
    assert marker == "TORCH_IMPORTED False", f"torch was imported by:\n{culprit}"
    if argv == ["--help"]:
        for command in ("run", "validate", "plugins", "eval", "sample", "codec", "quantize"):
            assert command in proc.stdout


# -- eval -----------------------------------------------------------------------------------
def test_quantize_writes_a_run_that_eval_and_sample_read(trained, tmp_path):
    q = tmp_path / "q"
    made = cli("quantize", trained.run_dir, "--out", q, "--json")
    assert made.returncode == 0, made.stderr
    report = json.loads(made.stdout)
    assert report["scheme"] == "int8-rowwise" and report["bytes_after"] < report["bytes_before"]
    original, quantized, sampled, again = cli_parallel(
        ["eval", trained.run_dir, "--text", trained.corpus, "--json"],
        ["eval", q, "--text", trained.corpus, "--json"],
        ["sample", q, "--prompt", "the ", "--bytes", "8"],
        ["quantize", trained.run_dir, "--out", q],
    )
    assert original.returncode == quantized.returncode == sampled.returncode == 0, (
        quantized.stderr + sampled.stderr)
    delta = (json.loads(quantized.stdout)["bits_per_byte"]
             - json.loads(original.stdout)["bits_per_byte"])
    assert abs(delta) < 0.01
    assert again.returncode != 0 and "--force" in again.stderr and "Traceback" not in again.stderr


def test_eval(trained, tmp_path):
    text = tmp_path / "text.txt"
    text.write_bytes("the cat sat on the mat. héllo wörld — ✓ ünïcode\n".encode() * 3)
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("the caf\u00e9 sat on the mat".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    not_a_run = tmp_path / "not-a-run"
    not_a_run.mkdir()
    as_json, plain, seen, bad, nothing, no_run = cli_parallel(
        ["eval", trained.run_dir, "--text", text, "--json"],
        ["eval", trained.run_dir, "--text", text],
        ["eval", trained.run_dir, "--text", trained.corpus, "--json"],
        ["eval", trained.run_dir, "--text", not_utf8, "--json"],
        ["eval", trained.run_dir, "--text", empty],
        ["eval", not_a_run, "--text", text],
    )
    assert as_json.returncode == 0, as_json.stdout + as_json.stderr
    result = json.loads(as_json.stdout)
    assert set(result) >= {"bits_per_byte", "bytes"}
    # bytes, not characters: the text has multi-byte UTF-8 characters
    assert result["bytes"] == len(text.read_bytes()) != len(text.read_text(encoding="utf-8"))
    assert 0 < result["bits_per_byte"] < 12
    assert plain.returncode == 0, plain.stderr
    assert f"{result['bits_per_byte']:.4f}" in plain.stdout and "bits per byte" in plain.stdout

    # The model was trained on this text: it beats the 9 bits per byte of a uniform guess.
    assert seen.returncode == 0, seen.stderr
    seen_result = json.loads(seen.stdout)
    assert seen_result["bytes"] == trained.corpus.stat().st_size
    assert seen_result["bits_per_byte"] < 9.0

    assert_user_error(bad, "not valid UTF-8", "latin1.txt")
    assert_user_error(nothing, "empty")
    assert_user_error(no_run, "not a bitlm run folder")


# -- sample ---------------------------------------------------------------------------------
def test_sample_is_seeded_and_continues_the_prompt(trained, tmp_path):
    args = ["sample", trained.run_dir, "--prompt", "the ", "--bytes", "20"]
    one, again, tuned, no_run = cli_parallel(
        [*args, "--seed", "1"],
        [*args, "--seed", "1"],
        [*args, "--seed", "2", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "1"],
        ["sample", tmp_path, "--prompt", "the "],
    )
    for proc in (one, again, tuned):
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stdout.startswith("the ")
        assert len(proc.stdout.rstrip("\n")) > len("the ")
    assert one.stdout == again.stdout  # same seed, same text
    assert_user_error(no_run, "not a bitlm run folder")


def test_sample_text_is_printed_as_generated_whatever_the_terminal_width(trained):
    args = ["sample", trained.run_dir, "--prompt", "the ", "--bytes", "150", "--seed", "4"]
    narrow, wide, judged = cli_parallel(args, args, [*args, "--gate", "none"],
                                        env={"COLUMNS": "30"})
    wide = cli(*args, env={"COLUMNS": "300"})
    assert narrow.returncode == wide.returncode == judged.returncode == 0, narrow.stderr
    assert narrow.stdout == wide.stdout  # no line wrapped at the console's width
    assert len(narrow.stdout.rstrip("\n")) >= len("the ") + 40  # longer than 30 columns
    assert judged.stdout == narrow.stdout  # streamed as made, or printed once judged: the same
    too_many = cli("sample", trained.run_dir, "--bytes", "1000001")
    assert too_many.returncode == 2 and "--bytes" in too_many.stderr


@pytest.mark.needs("safety:kcs", "objective:diffusion", "sampler:diffusion")
def test_sample_with_a_gate_retries_and_reports(trained):
    args = ["sample", trained.run_dir, "--prompt", "the ", "--bytes", "30"]
    gated, bad_gate, bad_fallback = cli_parallel(
        [*args, "--gate", "kcs", "--strict", "--max-retries", "1"],
        [*args, "--gate", "nosuch"],
        [*args, "--fallback", "diffusion"],
    )
    # The tiny model's samples may pass or not; either way the outcome must be reported right.
    assert gated.returncode in (0, 3), gated.stdout + gated.stderr
    if gated.returncode == 3:
        assert "safety gate blocked all 2 attempts" in gated.stderr
        assert "attempt 1/2 (autoregressive, seed 0): blocked" in gated.stderr
        assert "below its floor" in gated.stderr and gated.stdout == ""
    else:
        assert gated.stdout.startswith("the ") and "allowed" in gated.stderr
    assert_user_error(bad_gate, "unknown safety 'nosuch' at --gate")
    assert_user_error(bad_fallback, "--fallback diffusion", "non-causal", "causal objective")


# -- codec ----------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", [pytest.param("rle", marks=pytest.mark.needs("compressor:rle")),
                                   pytest.param("pack", marks=pytest.mark.needs("compressor:pack")),
                                   "identity"])
def test_codec_compress_decompress_round_trip(codec, tmp_path, invoke):
    src = tmp_path / "in.txt"
    src.write_bytes("Emma Woodhouse, handsome, clever, and rich — 0\n".encode() * 20)
    stream, back = tmp_path / "s.bin", tmp_path / "back.txt"
    done = invoke("codec", "compress", "--codec", codec, src, stream)
    assert done.exit_code == 0, done.output
    assert f"{len(src.read_bytes()) * 9:,} bits (parity9)" in done.stdout
    done = invoke("codec", "decompress", stream, back)  # the codec comes from the header
    assert done.exit_code == 0, done.output
    assert f"{codec} stream" in done.stdout
    assert back.read_bytes() == src.read_bytes()


@pytest.mark.needs("compressor:rle")
def test_codec_raw8_and_ratio_says_when_it_expands(tmp_path, invoke):
    src = tmp_path / "in.txt"
    src.write_bytes(b"plain text expands under run-length coding\n" * 10)
    done = invoke("codec", "compress", "-c", "rle", "--encoder", "raw8", src, tmp_path / "s")
    assert done.exit_code == 0 and "expands" in done.stdout
    assert invoke("codec", "decompress", "--encoder", "raw8", tmp_path / "s",
                  tmp_path / "o").exit_code == 0
    assert (tmp_path / "o").read_bytes() == src.read_bytes()
    sparse = tmp_path / "zeros.bin"
    sparse.write_bytes(bytes(4000))  # parity9 bits of zero bytes: all zeros
    done = invoke("codec", "compress", "-c", "rle", sparse, tmp_path / "z")
    assert done.exit_code == 0 and "expands" not in done.stdout


@pytest.mark.needs("compressor:rle", "compressor:pack")
def test_codec_stats_json_measures_every_installed_codec(tmp_path, invoke):
    from bitlm_core.registry import get_registry

    src = tmp_path / "in.txt"
    src.write_bytes(b"It is a truth universally acknowledged\n" * 30)
    done = invoke("codec", "stats", src, "--json", "--repeats", "1")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    rows = {r["codec"]: r for r in report["codecs"]}
    assert set(rows) == set(get_registry().names("compressor"))
    n = len(src.read_bytes()) * 9
    for r in rows.values():
        assert r["input_bits"] == n
        assert r["ratio"] == pytest.approx(n / r["output_bits"])
        assert r["encode_bits_per_s"] > 0 and r["decode_bits_per_s"] > 0
    assert rows["rle"]["expands"] and rows["identity"]["ratio"] < 0.2
    table = invoke("codec", "stats", src, "-c", "pack", "-c", "rle")
    assert table.exit_code == 0 and "rle" in table.stdout and "identity" not in table.stdout


@pytest.mark.needs("compressor:rle", "compressor:pack")
def test_codec_bad_input(tmp_path, invoke):
    src = tmp_path / "in.txt"
    src.write_bytes(b"abc" * 50)
    assert_user_error(invoke("codec", "compress", "-c", "nope", src, tmp_path / "s"),
                      "unknown compressor 'nope'", "available compressors")
    assert_user_error(invoke("codec", "compress", "-c", "rle", tmp_path / "missing", tmp_path / "s"),
                      "no such file")
    assert_user_error(invoke("codec", "decompress", src, tmp_path / "o"),
                      "no installed codec recognises this stream", "pack (b'BPAK')")
    stream = tmp_path / "s"
    assert invoke("codec", "compress", "-c", "pack", src, stream).exit_code == 0
    before = stream.read_bytes()
    assert_user_error(invoke("codec", "compress", "-c", "rle", src, stream), "--force")
    assert stream.read_bytes() == before  # nothing overwritten
    assert_user_error(invoke("codec", "decompress", "--max-bits", "100", stream, tmp_path / "o"),
                      "over the limit max_bits=100")
    damaged = tmp_path / "damaged"
    damaged.write_bytes(before[:-7])
    assert_user_error(invoke("codec", "decompress", damaged, tmp_path / "o"), "pack")
    assert not (tmp_path / "o").exists()
    assert_user_error(invoke("codec", "stats", src, "-c", "nope"), "unknown codec 'nope'")


# -- commands from plugins ----------------------------------------------------------------------
COMMAND_PLUGIN = """
import typer

from bitlm_core.errors import DataError
from bitlm_core.hookspecs import hookimpl
from bitlm_core.records import CommandSpec

group = typer.Typer(help="Greetings from a plugin.")


@group.command()
def greet(name: str = typer.Option("world", "--name")) -> None:
    \"\"\"Say hello.\"\"\"
    print(f"hello, {name}")


@group.command()
def refuse() -> None:
    \"\"\"Fail as bad input does.\"\"\"
    raise DataError("refused on purpose: give another name")


def shout(word: str = typer.Argument(...)) -> None:
    print(word.upper())


@hookimpl
def bitlm_commands():
    yield CommandSpec("hello", lambda: group, "greetings, from the record")
    yield CommandSpec("shout", lambda: shout, "print a word in capitals")
"""

BROKEN_COMMAND_PLUGINS = {
    "raising": "@hookimpl\ndef bitlm_commands():\n    raise RuntimeError('command hook down')\n",
    "junk": "@hookimpl\ndef bitlm_commands():\n    yield CommandSpec('junk', lambda: 42, 'x')\n",
    "taken": "@hookimpl\ndef bitlm_commands():\n"
             "    yield CommandSpec('run', lambda: (lambda: None), 'x')\n",
    "shadow": "@hookimpl\ndef bitlm_commands():\n"
              "    yield CommandSpec('codec', lambda: (lambda: None), 'x')\n",
    "halfway": "def fine():\n    print('fine')\n\n\n@hookimpl\ndef bitlm_commands():\n"
               "    yield CommandSpec('fine', lambda: fine, 'works alone')\n"
               "    yield CommandSpec('broken', lambda: 42, 'x')\n",
}


def fake_site(root: Path, plugins: dict[str, str]) -> dict[str, str]:
    """Install each ``{entry point: module source}`` as a distribution in ``root``; return the
    environment that puts it on the path."""
    for name, source in plugins.items():
        info = root / f"{name}-0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
                                       encoding="utf-8")
        (info / "entry_points.txt").write_text(f"[bitlm]\n{name} = {name}_plugin\n",
                                               encoding="utf-8")
        header = ("from bitlm_core.hookspecs import hookimpl\n"
                  "from bitlm_core.records import CommandSpec\n")
        (root / f"{name}_plugin.py").write_text(header + source, encoding="utf-8")
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


def test_a_plugin_adds_commands_that_help_lists_and_errors_report(tmp_path):
    env = fake_site(tmp_path / "site", {"fakecmd": COMMAND_PLUGIN})
    helped, greeted, shouted, refused, listed = cli_parallel(
        ["--help"], ["hello", "greet", "--name", "Emma"], ["shout", "quiet"],
        ["hello", "refuse"], ["plugins", "list", "--json"], env=env)
    assert helped.returncode == 0, helped.stderr
    assert re.search(r"hello\s+greetings, from the record", helped.stdout), helped.stdout
    assert re.search(r"shout\s+print a word in capitals", helped.stdout), helped.stdout
    assert greeted.returncode == 0 and greeted.stdout == "hello, Emma\n", greeted.stderr
    assert shouted.returncode == 0 and shouted.stdout == "QUIET\n", shouted.stderr
    assert_user_error(refused, "refused on purpose")  # a plugin's BitlmError: exit 2, one line
    plugins = {p["name"]: p for p in json.loads(listed.stdout)["plugins"]}
    assert plugins["fakecmd"]["status"] == "active"
    assert plugins["fakecmd"]["provides"]["command"] == ["hello", "shout"]


def test_plugins_whose_commands_break_are_failed_and_the_cli_still_works(tmp_path):
    env = fake_site(tmp_path / "site", BROKEN_COMMAND_PLUGINS)
    helped, listed, codec, run_help = cli_parallel(
        ["--help"], ["plugins", "list", "--json"], ["codec", "--help"], ["run", "--help"],
        env=env)
    for proc in (helped, listed, codec, run_help):
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
    assert "junk" not in helped.stdout and "quantize" in helped.stdout
    assert "Train a model from a spec" in run_help.stdout  # bitlm's own run, not the plugin's
    plugins = {p["name"]: p for p in json.loads(listed.stdout)["plugins"]}
    assert plugins["raising"]["status"] == "failed"
    assert "command hook down" in plugins["raising"]["error"]
    assert plugins["junk"]["status"] == "failed"
    assert "returned int; return a typer.Typer" in plugins["junk"]["error"]
    assert plugins["taken"]["status"] == "failed"
    assert "command name 'run' is bitlm's own" in plugins["taken"]["error"]
    assert plugins["shadow"]["status"] == "failed"  # bitlm's codec stays bitlm's
    assert "command 'codec' is also provided by plugin 'core'" in plugins["shadow"]["error"]
    assert "Compress, decompress and measure" in codec.stdout
    assert plugins["halfway"]["status"] == "failed"  # all of a plugin's commands, or none
    assert plugins["halfway"]["provides"] == {} and not re.search(r"\bfine\b", helped.stdout)


def test_two_plugins_with_one_command_name_fail_the_later_and_the_cli_works(tmp_path, tiny_spec):
    twin = ("def hi():\n    print('{who}')\n\n\n@hookimpl\ndef bitlm_commands():\n"
            "    yield CommandSpec('hello', lambda: hi, 'greets')\n")
    env = fake_site(tmp_path / "site", {"twin_a": twin.format(who="a"),
                                        "twin_b": twin.format(who="b")})
    hello, listed, valid = cli_parallel(["hello"], ["plugins", "list", "--json"],
                                        ["validate", tiny_spec()], env=env)
    assert hello.returncode == 0 and hello.stdout == "a\n", hello.stderr
    plugins = {p["name"]: p for p in json.loads(listed.stdout)["plugins"]}
    assert plugins["twin_a"]["status"] == "active" and plugins["twin_b"]["status"] == "failed"
    assert "also provided by plugin 'twin_a'" in plugins["twin_b"]["error"]
    assert json.loads(listed.stdout)["conflicts"] == []
    assert valid.returncode == 0, valid.stderr  # no conflict left to stop other commands
