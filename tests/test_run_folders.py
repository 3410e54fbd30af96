"""A user's data under faults: what --restart may delete, checkpoint pruning, the run lock,
damaged checkpoints (issue 14, items 1, 2, 3 and 5). Each test reproduces a reported defect."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitlm_core.app.loading import load_run
from bitlm_core.app.run import execute
from bitlm_core.errors import CheckpointError
from bitlm_core.spec import load_spec
from bitlm_core.store.checkpoint import latest_checkpoint, save_checkpoint, step_folders
from bitlm_core.store.lock import run_lock


def quiet(spec, folder, **kw):
    return execute(spec, folder, log=lambda m: None, **kw)


# -- item 1: --restart deletes only what bitlm wrote --------------------------------------------
def test_restart_refuses_a_folder_whose_spec_yaml_is_someone_elses(tmp_path, tiny_spec):
    project = tmp_path / "p"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.c").write_text("x\n")
    (project / "spec.yaml").write_text("openapi: 3\n")
    for restart in (True, False):
        with pytest.raises(CheckpointError, match="is not a bitlm run folder"):
            quiet(load_spec(tiny_spec(steps=2)), project, restart=restart)
    assert (project / "src" / "main.c").read_text() == "x\n"
    assert (project / "spec.yaml").read_text() == "openapi: 3\n"
    assert sorted(p.name for p in project.iterdir()) == ["spec.yaml", "src"]  # nothing written


def test_restart_deletes_what_bitlm_wrote_and_keeps_the_rest(tmp_path, tiny_spec):
    run = tmp_path / "run"
    quiet(load_spec(tiny_spec(steps=2, attention={"full_attn_logging": True})), run)
    theirs = [run / "notes.txt", run / "data" / "README", run / "checkpoints" / "mine.txt",
              run / "checkpoints" / "step-000002" / "comment.txt"]
    for path in theirs:
        path.write_text("mine")
    summary = quiet(load_spec(tiny_spec(steps=3)), run, restart=True)
    assert summary["steps"] == 3  # trained again from scratch
    assert all(path.read_text() == "mine" for path in theirs)
    assert [p.name for p in step_folders(run)] == ["step-000002", "step-000003"]
    # the new run saved its step 2 beside the file bitlm did not write
    from bitlm_core.store.checkpoint import damage, read_state

    step2 = run / "checkpoints" / "step-000002"
    assert read_state(step2)["spec"]["train"]["steps"] == 3 and damage(step2) is None
    assert not (run / "attention").exists()  # the old run's maps went with it


# -- item 2: pruning sorts by step number -------------------------------------------------------
def test_pruning_keeps_the_newest_checkpoints_across_the_digit_boundary(tmp_path):
    model = torch.nn.Linear(2, 2)
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        save_checkpoint(tmp_path, step, model, None, {}, keep=2)
        latest = latest_checkpoint(tmp_path)
        assert latest is not None and latest.name == f"step-{step:06d}"
    assert [p.name for p in step_folders(tmp_path)] == ["step-1000000", "step-1000001"]
    (tmp_path / "checkpoints" / "latest").unlink()  # the fallback also orders by number
    assert latest_checkpoint(tmp_path).name == "step-1000001"


def test_pruning_counts_checkpoints_only_and_never_the_one_just_written(tmp_path):
    model = torch.nn.Linear(2, 2)
    theirs = tmp_path / "checkpoints" / "step-999999"
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine")  # a step folder holding no checkpoint
    for step in (5, 6):
        save_checkpoint(tmp_path, step, model, None, {}, keep=1)
        assert latest_checkpoint(tmp_path).name == f"step-{step:06d}"
    assert [p.name for p in step_folders(tmp_path)] == ["step-000006", "step-999999"]
    assert (theirs / "notes.txt").read_text() == "mine"


# -- item 3: one run per folder -----------------------------------------------------------------
def test_a_second_run_on_a_folder_in_use_stops_at_once_naming_the_holder(tmp_path, tiny_spec):
    spec = tiny_spec(steps=2)
    run = tmp_path / "run"
    quiet(load_spec(spec), run)
    before = (run / "metrics.jsonl").read_bytes()
    with run_lock(run, "bitlm run (the test holds it)"):
        proc = subprocess.run([sys.executable, "-m", "bitlm_core.cli", "run", str(spec), "--out",
                               str(run), "-q"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert f"is in use by another bitlm process (PID {os.getpid()}, bitlm run (the test " \
               "holds it))" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert load_run(run).step == 2  # reading a folder in use is fine
    assert (run / "metrics.jsonl").read_bytes() == before  # the refused run wrote nothing
    assert quiet(load_spec(spec), run)["steps"] == 2  # released: the folder resumes again


# -- item 5: a damaged checkpoint -----------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_newest_checkpoint_gives_way_to_the_one_before(tmp_path, tiny_spec, damage):
    spec = load_spec(tiny_spec(steps=4, train={"checkpoint_every": 2}))
    run = tmp_path / "run"
    quiet(spec, run)
    weights = run / "checkpoints" / "step-000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncated":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one bit, deep inside a tensor: the file still parses
        data[-100] ^= 0x10
        weights.write_bytes(bytes(data))
    logs = []
    loaded = load_run(run, log=logs.append)
    assert loaded.step == 2
    assert logs == [f"checkpoint step-000004 is damaged (model.safetensors "
                    f"{'has' if damage == 'truncated' else 'does not match'}"
                    + logs[0].split(damage == "truncated" and "has" or "does not match", 1)[1]]
    assert "using step-000002 instead" in logs[0]
    resumed = []
    quiet_log = execute(spec, run, log=resumed.append)
    assert any("resuming from step-000002" in m for m in resumed)
    assert quiet_log["steps"] == 4  # trained the lost steps again


def test_a_run_whose_checkpoints_are_all_damaged_says_so(tmp_path, tiny_spec):
    run = tmp_path / "run"
    quiet(load_spec(tiny_spec(steps=2)), run)
    for folder in step_folders(run):
        (folder / "state.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(CheckpointError, match=r"every checkpoint of .* is damaged: step-000002 "
                                              r"is damaged .*Train again with --restart"):
        load_run(run)
