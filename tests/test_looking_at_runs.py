"""Reading run folders for the report, the dashboard and the MCP server (bitlm_core.app.runs),
and what servers may do with them (bitlm_core.app.control): bounded, incremental reads; names
kept inside the runs folder; specs for new runs validated, their corpus and folder fixed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitlm_core.app import control
from bitlm_core.app.run import execute, write_reports
from bitlm_core.app.runs import (curves, list_runs, lock_holder, read_metrics, resolve_run,
                                 run_info)
from bitlm_core.errors import DataError, SpecError
from bitlm_core.spec import load_spec
from bitlm_core.store.lock import run_lock


def quiet(spec, folder, **kw):
    return execute(spec, folder, log=lambda m: None, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A runs folder with one finished tiny run, ``base``."""
    import yaml

    from tests.conftest import TINY_TEXT, tiny_spec_dict

    tmp = tmp_path_factory.mktemp("looking")
    corpus = tmp / "tiny.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec_dict(corpus, steps=4)), encoding="utf-8")
    (tmp / "runs").mkdir()
    quiet(load_spec(spec), tmp / "runs" / "base")
    return tmp / "runs"


# -- metrics.jsonl, read incrementally ---------------------------------------------------------
def test_a_line_still_being_written_waits_for_the_next_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"split": "train", "step": 1}\n{"split": "tr')
    records, offset = read_metrics(tmp_path)
    assert records == [{"split": "train", "step": 1}] and offset == 30
    with open(path, "ab") as f:
        f.write(b'ain", "step": 2}\nnot json\n[1, 2]\n' + b'{"x": "' + b"y" * 70000 + b'"}\n')
    records, offset = read_metrics(tmp_path, offset)
    assert records == [{"split": "train", "step": 2}]  # junk and oversized lines skipped
    assert offset == path.stat().st_size
    path.write_bytes(b'{"split": "val", "step": 3}\n')  # rewritten (a resumed run): from 0
    assert read_metrics(tmp_path, offset)[0] == [{"split": "val", "step": 3}]
    assert read_metrics(tmp_path / "missing") == ([], 0)


records_strategy = st.lists(st.fixed_dictionaries({
    "split": st.sampled_from(["train", "val", "telemetry", "alert"]),
    "step": st.integers(0, 10 ** 6),
    "bits_per_byte": st.floats(allow_nan=False, allow_infinity=False, width=32)}), max_size=30)


@settings(max_examples=60, deadline=None)
@given(records=records_strategy, cuts=st.lists(st.integers(0, 4000), max_size=6),
       chunk=st.integers(1, 300))
def test_reading_in_pieces_gives_every_record_once(tmp_path_factory, records, cuts, chunk):
    folder = tmp_path_factory.mktemp("m")
    data = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    got, offset = [], 0
    path = folder / "metrics.jsonl"
    path.write_bytes(b"")
    for cut in sorted(c % (len(data) + 1) for c in cuts) + [len(data)]:
        path.write_bytes(data[:cut])  # the file as a live run has written it so far
        while True:
            part, new = read_metrics(folder, offset, max_bytes=max(chunk, 200))
            got += part
            if new == offset:
                break
            offset = new
    assert got == records


def test_curves_name_every_series_and_keep_events():
    got = curves([
        {"split": "train", "step": 10, "time": 1.5, "loss": 0.5, "bits_per_byte": 4.0,
         "lr": 1e-3, "raw/bits_per_byte": 4.1, "compressed/ratio": 0.7, "raw/batches": 10},
        {"split": "val", "step": 10, "bits_per_byte": 3.9, "bytes": 100},
        {"split": "telemetry", "step": 10, "telemetry/val/symbiosis": 0.8},
        {"split": "scaling", "step": 10, "change": "depth 2 -> 3"},
        {"split": "val", "step": 20, "final": True, "bits_per_byte": float("nan")},
        {"split": "val", "step": 20, "final": True, "bits_per_byte": 3.5},
    ])
    series = got["series"]
    assert series["train/bits_per_byte"] == {"step": [10], "value": [4.0]}
    assert {"train/lr", "train/raw/bits_per_byte", "train/compressed/ratio", "train/loss",
            "val/bits_per_byte", "telemetry/val/symbiosis", "final/bits_per_byte"} <= set(series)
    assert "train/raw/batches" not in series
    assert series["final/bits_per_byte"]["value"] == [3.5]  # NaN dropped
    assert got["time"] == {"step": [10], "seconds": [1.5]}
    assert got["events"] == [{"step": 10, "kind": "growth", "text": "change depth 2 -> 3"}]


# -- names from clients --------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(name=st.one_of(st.text(max_size=40), st.sampled_from(
    ["..", ".", "../x", "a/b", "/etc", "base", "base/..", "%2e%2e", "a\x00b", "", "-x"])))
def test_a_client_name_resolves_inside_the_runs_folder_or_not_at_all(runs, name):
    try:
        path = resolve_run(runs, name, must_exist=False)
    except DataError:
        return
    assert path.parent == runs.resolve() and path.name == name


def test_links_and_folders_that_are_not_runs_are_refused(runs, tmp_path):
    (runs / "elsewhere").symlink_to(tmp_path)
    (runs / "plain").mkdir()
    try:
        with pytest.raises(DataError, match="symbolic link"):
            resolve_run(runs, "elsewhere")
        with pytest.raises(DataError, match="no run named"):
            resolve_run(runs, "plain")
        assert [p.name for p in list_runs(runs)] == ["base"]
    finally:
        (runs / "elsewhere").unlink()
        (runs / "plain").rmdir()
    with pytest.raises(DataError, match="not a folder"):
        list_runs(runs / "base" / "spec.yaml")


def test_a_run_is_running_while_its_lock_is_held(runs):
    assert lock_holder(runs / "base") is None
    assert run_info(runs / "base")["status"] == "finished"
    with run_lock(runs / "base"):
        assert lock_holder(runs / "base") == os.getpid()
        assert run_info(runs / "base")["status"] == "running"
    assert lock_holder(runs / "base") is None


def test_a_runs_row_has_its_settings_and_figures(runs):
    row = run_info(runs / "base")
    summary = json.loads((runs / "base" / "summary.json").read_text())
    assert row["name"] == "base" and row["layout"] == "framed" and row["d_model"] == 32
    assert row["steps"] == 4 and row["last_step"] == 4
    assert row["held_out_bits_per_byte"] == summary["held_out_bits_per_byte"]
    # the summary keeps each sample's verdict and the gate's floors for the report
    assert summary["gate"]["name"] == "none" and summary["gate"]["floors"] == {}
    assert summary["sample_verdicts"][0]["allowed"] is True
    assert summary["sample_verdicts"][0]["seed"] == 0


# -- specs for new runs --------------------------------------------------------------------------
def test_a_new_runs_spec_keeps_the_corpus_and_stays_in_the_runs_folder(runs):
    spec, out = control.new_run_spec(runs, "base", "again", {"train.steps": 3})
    base = load_spec(runs / "base" / "spec.yaml")
    assert out == runs.resolve() / "again" and spec.output.dir == str(out)
    assert spec.train.steps == 3 and spec.data == base.data
    for key in ("data.corpus.options.path", "data.corpus.name", "output.dir", "output"):
        with pytest.raises(SpecError, match="cannot be changed"):
            control.new_run_spec(runs, "base", "again", {key: "/etc/passwd"})
    with pytest.raises(SpecError, match="stepz"):
        control.new_run_spec(runs, "base", "again", {"train.stepz": 3})
    with pytest.raises(SpecError, match="single value"):
        control.new_run_spec(runs, "base", "again", {"train.steps": {"__class__": 1}})
    with pytest.raises(DataError, match="exists already"):
        control.new_run_spec(runs, "base", "base", {})
    with pytest.raises(DataError, match="no run named"):
        control.new_run_spec(runs, "nothing", "again", {})
    with pytest.raises(SpecError, match="larger than"):
        control.parse_spec_text("x: " + "y" * (control.MAX_SPEC_TEXT + 1))
    # no path outside the runs folder, under any key (a distillation teacher, say)
    for value in ("/etc", "../elsewhere", "~/.ssh", str(runs.parent)):
        with pytest.raises(SpecError, match="outside the runs folder"):
            control.new_run_spec(runs, "base", "again", {"objective.name": "distill",
                                                         "objective.options.teacher": value})
    spec, _ = control.new_run_spec(runs, "base", "student", {
        "objective.name": "distill", "objective.options.teacher": str(runs / "base")})
    assert spec.objective.options["teacher"] == str(runs / "base")  # a run of the folder
    with pytest.raises(SpecError, match="data.corpus.options.path.*outside the runs folder"):
        control.check_submitted(runs, "data: {corpus: {name: file, options: {path: /etc/hosts}}}")
    assert control.check_submitted(runs, "train: {steps: 3}\n").spec.train.steps == 3


def test_a_server_samples_and_evaluates_with_bounded_arguments(runs):
    models = control.LoadedRuns()
    got = control.sample_run(models, runs, "base", prompt="the ", n_bytes=8, max_retries=1)
    assert got["text"].startswith("the ") and got["allowed"] and got["step"] == 4
    assert [a["number"] for a in got["attempts"]] == [1]
    for bad in ({"n_bytes": 10 ** 6}, {"n_bytes": "8"}, {"seed": -1}, {"max_retries": 99},
                {"floors": {"c_floor": "high"}}, {"prompt": 5}):
        with pytest.raises(DataError):
            control.sample_run(models, runs, "base", **bad)
    figures = control.evaluate_text(models, runs, "base", "the cat sat on the mat. " * 3)
    assert figures["bytes"] == 72 and figures["bits_per_byte"] > 0
    with pytest.raises(DataError):
        control.evaluate_text(models, runs, "base", "")


# -- reports at the end of a run -----------------------------------------------------------------
def test_reports_are_written_when_a_run_ends_unless_switched_off(tmp_path, tiny_spec,
                                                                 monkeypatch):
    import bitlm_core.app.run as run_module

    calls = []
    monkeypatch.setattr(run_module, "write_reports",
                        lambda runs, out, log: calls.append((runs, out)) or [])
    quiet(load_spec(tiny_spec(steps=2, output={"report": True})), tmp_path / "a")
    assert calls == [([tmp_path / "a"], tmp_path / "a")]
    quiet(load_spec(tiny_spec(steps=2, output={"report": False})), tmp_path / "b")
    assert len(calls) == 1


def test_a_failing_reporter_is_a_warning_not_a_failed_run(monkeypatch, tmp_path):
    import bitlm_core.registry as registry_module

    class Broken:
        def write(self, runs, out):
            raise RuntimeError("no fonts")

    class Stub:
        def names(self, kind):
            return ["broken"] if kind == "reporter" else []

        def build(self, kind, name):
            return Broken()

    monkeypatch.setattr(registry_module, "get_registry", lambda: Stub())
    said = []
    assert write_reports([tmp_path], tmp_path, said.append) == []
    assert "reporter 'broken' failed" in said[0] and "no fonts" in said[0]


def test_restart_deletes_reports_by_name_and_keeps_other_plots(tmp_path, tiny_spec):
    from bitlm_core.store.rundir import foreign_files

    run = tmp_path / "run"
    quiet(load_spec(tiny_spec(steps=2)), run)
    (run / "plots").mkdir(exist_ok=True)
    for name in ("report.html", "plots/lr.png", "plots/telemetry.png", "plots/mine.png"):
        (run / name).write_bytes(b"x")
    assert foreign_files(run) == ["plots/mine.png"]
    quiet(load_spec(tiny_spec(steps=2)), run, restart=True)
    assert not (run / "report.html").exists() and not (run / "plots" / "lr.png").exists()
    assert (run / "plots" / "mine.png").read_bytes() == b"x"


HOLD = ("import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n")


def holding(path: Path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks")
def test_stopping_signals_only_the_process_holding_the_runs_lock(runs, tmp_path):
    from bitlm_core.app.runs import interrupt_holder

    assert interrupt_holder(runs / "base") is None  # nobody trains there
    proc = holding(runs / "base" / ".bitlm-lock")
    try:
        assert lock_holder(runs / "base") == proc.pid
        assert interrupt_holder(runs / "base") == proc.pid
        assert proc.wait(30) != 0 and "KeyboardInterrupt" in proc.stderr.read()
    finally:
        proc.kill()
    # a lock file that is a link to a file someone holds is nobody's lock
    elsewhere = tmp_path / "other.lock"
    proc = holding(elsewhere)
    fake = runs / "linked"
    fake.mkdir()
    try:
        (fake / ".bitlm-lock").symlink_to(elsewhere)
        assert lock_holder(fake) is None and interrupt_holder(fake) is None
        assert proc.poll() is None  # not signalled
    finally:
        proc.kill()
        (fake / ".bitlm-lock").unlink()
        fake.rmdir()
