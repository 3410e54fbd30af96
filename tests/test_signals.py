"""SIGINT and SIGTERM at any moment leave a run that resumes to the uninterrupted run's weights
(issue 14, item 4).

In-process tests send the signal from inside a step (during the objective's forward pass) and a
second one during the rescue save, so where it lands is certain. Subprocess tests send signals
to a real ``bitlm run`` at random moments, then run the same command again and compare the
final weights with an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bitlm_core.app.run import execute
from bitlm_core.engine.runtime import Interrupted
from bitlm_core.spec import load_spec
from bitlm_core.store.checkpoint import latest_checkpoint, read_state


def final_weights(run_dir: Path) -> dict:
    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def straight(tmp_path, tiny_spec):
    """The spec file and the weights of an uninterrupted run of it."""
    spec = tiny_spec(steps=8, train={"checkpoint_every": 3, "eval_every": 4})
    execute(load_spec(spec), tmp_path / "straight", log=lambda m: None)
    return spec, final_weights(tmp_path / "straight")


def signal_during(monkeypatch, calls: dict[int, int]):
    """Make the causal objective send ``calls[n]`` to this process during the n-th training
    step's forward pass."""
    from bitlm_core.builtins import objectives

    original, count = objectives.CausalObjective.__call__, {"n": 0}

    def call(self, model, bits):
        if model.training:  # one call per training step (grad_accum 1); evaluations not counted
            count["n"] += 1
            if count["n"] in calls:
                os.kill(os.getpid(), calls[count["n"]])
        return original(self, model, bits)

    monkeypatch.setattr(objectives.CausalObjective, "__call__", call)


def signal_after_update(monkeypatch, step: int, signum: int):
    """Send ``signum`` right after the optimizer's ``step``-th update, before the loop counts
    it: where a KeyboardInterrupt once left a checkpoint holding one update more than its
    name."""
    count = {"n": 0}
    update = torch.optim.AdamW.step

    def counted(self, *args, **kwargs):
        out = update(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] == step:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)


@pytest.mark.parametrize("where", ["forward", "after the update"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_a_step_stops_after_it_with_a_checkpoint_of_that_step(
        tmp_path, monkeypatch, straight, signum, where):
    spec_path, expected = straight
    if where == "forward":
        signal_during(monkeypatch, {3: signum})  # inside the third optimizer step
    else:
        signal_after_update(monkeypatch, 3, signum)
    logs = []
    with pytest.raises(Interrupted) as stopped:
        execute(load_spec(spec_path), tmp_path / "r", log=logs.append)
    assert stopped.value.signum == signum
    assert "stopped at step 3" in str(stopped.value) and "run the same command again" in str(
        stopped.value)
    assert read_state(latest_checkpoint(tmp_path / "r"))["step"] == 3  # named for what it holds
    assert any(m.endswith("stopping after this step, with a checkpoint") for m in logs)
    monkeypatch.undo()
    execute(load_spec(spec_path), tmp_path / "r", log=lambda m: None)
    assert same(final_weights(tmp_path / "r"), expected)


def test_a_second_sigint_waits_for_the_save_instead_of_breaking_it(tmp_path, monkeypatch,
                                                                   straight):
    from bitlm_core.engine.trainer import Trainer

    spec_path, expected = straight
    signal_during(monkeypatch, {2: signal.SIGINT})
    save = Trainer.checkpoint

    def impatient(self, state):  # the user presses Ctrl-C again while it saves
        os.kill(os.getpid(), signal.SIGINT)
        return save(self, state)

    monkeypatch.setattr(Trainer, "checkpoint", impatient)
    logs = []
    with pytest.raises(Interrupted):
        execute(load_spec(spec_path), tmp_path / "r", log=logs.append)
    assert any("again: still saving the checkpoint" in m for m in logs)
    ckpt = latest_checkpoint(tmp_path / "r")
    assert ckpt.name == "step-000002" and not list((tmp_path / "r" / "checkpoints").glob(".tmp*"))
    monkeypatch.undo()
    execute(load_spec(spec_path), tmp_path / "r", log=lambda m: None)
    assert same(final_weights(tmp_path / "r"), expected)


def test_resume_drops_the_metrics_of_steps_it_trains_again(tmp_path, monkeypatch, straight):
    spec_path, _ = straight
    signal_during(monkeypatch, {5: signal.SIGINT})
    with pytest.raises(Interrupted):
        execute(load_spec(spec_path), tmp_path / "r", log=lambda m: None)
    metrics = tmp_path / "r" / "metrics.jsonl"
    with open(metrics, "a") as f:  # as if killed later: records past the checkpoint, cut short
        f.write(json.dumps({"split": "train", "step": 7, "loss": 1.0}) + "\n" + '{"split": "tr')
    monkeypatch.undo()
    logs = []
    execute(load_spec(spec_path), tmp_path / "r", log=logs.append)
    assert any("dropped 2 records of metrics.jsonl past step 5" in m for m in logs)
    steps = [json.loads(line)["step"] for line in metrics.open()
             if json.loads(line)["split"] == "train"]
    assert steps == list(range(1, 9))  # every step once, in order


# -- a real `bitlm run`, signalled at random moments ---------------------------------------------
def cli(args, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("BITLM_DEBUG",)}
    return subprocess.Popen([sys.executable, "-m", "bitlm_core.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            **kw)


def interrupt_and_resume(spec: Path, run_dir: Path, signals: list[int], delay: float):
    """Start a run, wait until it trains, send ``signals`` after ``delay`` seconds (20 ms
    apart), then run the same command again; returns (the first run's exit status, its stderr,
    whether it had finished: a signal after the command's end kills the exiting process, as
    for any program)."""
    first = cli(["run", spec, "--out", run_dir, "-q"], cwd=run_dir.parent)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not metrics.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    for signum in signals:
        if first.poll() is None:
            first.send_signal(signum)
        time.sleep(0.02)
    _, err = first.communicate(timeout=120)
    finished = (run_dir / "summary.json").is_file()
    second = cli(["run", spec, "--out", run_dir, "-q"], cwd=run_dir.parent)
    _, err2 = second.communicate(timeout=120)
    assert second.returncode == 0, err2
    return first.returncode, err, finished


def test_signals_at_random_moments_always_leave_a_run_that_resumes_exactly(tmp_path, tiny_spec):
    spec = tiny_spec(steps=40, train={"checkpoint_every": 5, "eval_every": 20})
    base = cli(["run", spec, "--out", tmp_path / "straight", "-q"], cwd=tmp_path)
    assert base.wait(timeout=120) == 0, base.stderr.read()
    expected = final_weights(tmp_path / "straight")
    rng = random.Random(os.getpid())
    trials = [([signal.SIGINT], 130), ([signal.SIGINT], 130), ([signal.SIGINT, signal.SIGINT], 130),
              ([signal.SIGTERM], 143)]
    results: dict[int, tuple] = {}

    def trial(i, signals, delay):
        results[i] = (*interrupt_and_resume(spec, tmp_path / f"r{i}", signals, delay), delay)

    threads = [threading.Thread(target=trial, args=(i, s, rng.uniform(0.0, 0.4)))
               for i, (s, _) in enumerate(trials)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    interrupted = sum(not results[i][2] for i in range(len(trials)))
    assert interrupted >= 3, f"only {interrupted} of {len(trials)} runs were interrupted: {results}"
    for i, (signals, code) in enumerate(trials):
        first_code, err, finished, delay = results[i]
        where = f"trial {i} ({[signal.Signals(s).name for s in signals]} after {delay:.3f} s)"
        assert "Traceback" not in err, f"{where}:\n{err}"
        assert same(final_weights(tmp_path / f"r{i}"), expected), where
        if finished:  # it ended before the signal (or the signal ended the exiting process)
            assert first_code in (0, -signals[0]), f"{where}: exit {first_code}\n{err}"
            continue
        assert first_code == code, f"{where}: exit {first_code}\n{err}"
        assert "interrupted: stopped" in err, f"{where}:\n{err}"
